-- A route library file for tests/e2e/test_routelib_e2e.py, run by both
-- mcproxy (--config=routelib) and memcached 1.6.45 (proxy_config=routelib).
local A = "127.0.0.1:" .. os.getenv("RL_A")
local B = "127.0.0.1:" .. os.getenv("RL_B")
local DOWN = "127.0.0.1:" .. os.getenv("RL_DOWN")

local_zone("zb")

pools{
    a = { backends = { A } },
    b = { backends = { { host = "127.0.0.1", port = tonumber(os.getenv("RL_B")) } } },
    down = { backend_options = { connecttimeout = 1 }, backends = { DOWN } },
    set_zones = {
        za = { backends = { A } },
        zb = { backends = { B } },
    },
}

routes{
    cmap = { [mcp.CMD_TOUCH] = route_direct{ child = "b" } },
    map = {
        a = route_direct{ child = "a" },
        b = route_direct{ child = "b" },
        fo = route_failover{ children = { "down", "a", "b" } },
        fomiss = route_failover{ children = { "a", "b" }, miss = true },
        fonomiss = route_failover{ children = { "a", "b" } },
        focount = route_failover{ children = { "down", "down", "a" }, failover_count = 2 },
        sync = route_allsync{ children = { "a", "b" } },
        syncdown = route_allsync{ children = { "a", "down" } },
        fast = route_allfastest{ children = { "a", "b" } },
        fastdown = route_allfastest{ children = { "down", "a" } },
        fastnone = route_allfastest{ children = { "down", "down" } },
        syncm = cmdmap{ [mcp.CMD_SET] = route_direct{ child = "a" },
                        [mcp.CMD_GET] = route_allsync{ children = { "a", "b" } },
                        [mcp.CMD_MG] = route_allsync{ children = { "b", "a" } },
                        [mcp.CMD_DELETE] = route_allsync{ children = { "a", "b" } } },
        split = route_split{ child_a = "a", child_b = "b" },
        splitsub = route_split{ child_a = route_direct{ child = "b" }, child_b = "a" },
        ttl = route_ttl{ ttl = 100, child = "a" },
        null = route_null{},
        z = route_zfailover{ children = "set_zones", miss = true },
        cmd = cmdmap{ [mcp.CMD_GET] = route_direct{ child = "b" },
                      [mcp.CMD_SET] = route_direct{ child = "a" } },
    },
    default = route_direct{ child = "a" },
}
