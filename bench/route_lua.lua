-- Route config for the benchmark's mcproxy-lua system: the setup of
-- route.lua (one pool of one backend, every command), through a route
-- written in Lua that keeps the pool's result before returning it.
--
-- A route that looks at what a pool answered is what most hand-written
-- routes do; this one is the least of them, so the figures are the cost of
-- running a route in Lua at all. bench/run.py passes the memcached port in
-- MCPROXY_BENCH_BACKEND_PORT.

function mcp_config_pools()
    -- The in-flight memory test holds requests against a stopped memcached
    -- for a few seconds; the default 3 s read timeout could fire first.
    mcp.backend_read_timeout(30)
    local port = os.getenv("MCPROXY_BENCH_BACKEND_PORT") or "11211"
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", port) })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        local res = pool(r)
        return res
    end)
end
