-- A route library file with tagged route trees for
-- tests/e2e/test_tags_e2e.py, run by both mcproxy (--config=routelib) and
-- memcached 1.6.45 (proxy_config=routelib), each with listeners tagged
-- "x" and "y" and an untagged one.
local A = "127.0.0.1:" .. os.getenv("TAGS_A")
local B = "127.0.0.1:" .. os.getenv("TAGS_B")

pools{
    a = { backends = { A } },
    b = { backends = { B } },
}

-- tag x: by prefix, b/ to pool b, the rest answered as a miss
routes{
    tag = "x",
    map = { b = route_direct{ child = "b" } },
    default = route_null{},
}

-- tag y: a map and no default: what no prefix matches has no route; and
-- its mg by the command map
routes{
    tag = "y",
    cmap = { [mcp.CMD_MG] = route_direct{ child = "a" } },
    map = { b = route_direct{ child = "b" } },
}

-- untagged listeners: everything to pool a
routes{
    default = route_direct{ child = "a" },
}
