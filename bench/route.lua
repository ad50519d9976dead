-- Route config for the benchmark: one pool of one backend, every command,
-- in the route library's form (routes.direct, which the engine runs without
-- entering Lua).
--
-- bench/run.py starts mcproxy with this file and passes the memcached port
-- in MCPROXY_BENCH_BACKEND_PORT. nutcracker gets the equivalent setup: one
-- pool, one server, no timeouts that could fire during a run.

local routes = require("mcproxy.routes")

function mcp_config_pools()
    -- The in-flight memory test holds requests against a stopped memcached
    -- for a few seconds; the default 3 s read timeout could fire first.
    mcp.backend_read_timeout(30)
    local port = os.getenv("MCPROXY_BENCH_BACKEND_PORT") or "11211"
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", port) })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, routes.direct(pool))
end
