-- Route config for the benchmark's mcproxy-lib system: a route of the route
-- library that runs in Lua, every command.
--
-- routes.config builds the pools from their description (pools{} as data, as
-- in mcp_routelib.lua, the routelib config memcached's own proxy runs) and a
-- failover over two pools serves every command, as a user of the library
-- would write it (with its default route introspection). Both pools hold the
-- one benchmark backend, so the failover never fails over; a failover of one
-- pool would take the direct path and measure nothing new. bench/run.py
-- passes the memcached port in MCPROXY_BENCH_BACKEND_PORT.

local routes = require("mcproxy.routes")

local port = os.getenv("MCPROXY_BENCH_BACKEND_PORT") or "11211"

mcp_config_pools, mcp_config_routes = routes.config{
    -- The in-flight memory test holds requests against a stopped memcached
    -- for a few seconds; the default 3 s read timeout could fire first.
    tunables = { backend_read_timeout = 30 },
    pools = {
        main = { backends = { "127.0.0.1:" .. port } },
        spare = { backends = { "127.0.0.1:" .. port } },
    },
    routes = routes.failover{ "main", "spare" },
}
