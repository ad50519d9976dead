-- Route config for the benchmark's mcproxy-lib system: one pool of one
-- backend, every command, declared with the route library.
--
-- The closest equivalent of mcp_routelib.lua, the routelib config that
-- memcached's own proxy runs (pools{} and routes{} as data): routes.config
-- builds the pool from its description and a failover over that one pool
-- serves every command, as a user of the library would write it (with its
-- default route introspection). bench/run.py passes the memcached port in
-- MCPROXY_BENCH_BACKEND_PORT.

local routes = require("mcproxy.routes")

local port = os.getenv("MCPROXY_BENCH_BACKEND_PORT") or "11211"

mcp_config_pools, mcp_config_routes = routes.config{
    -- The in-flight memory test holds requests against a stopped memcached
    -- for a few seconds; the default 3 s read timeout could fire first.
    tunables = { backend_read_timeout = 30 },
    pools = { main = { backends = { "127.0.0.1:" .. port } } },
    routes = routes.failover{ "main" },
}
