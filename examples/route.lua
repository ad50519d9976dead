-- A first route config: two memcached servers, keys sharded between them.
--
-- mcp_config_pools runs first and builds the pools; whatever it returns is
-- handed to mcp_config_routes, which attaches a Lua function to the commands
-- the proxy should route. Commands without a route are answered by the
-- proxy's own embedded cache.

function mcp_config_pools()
    local main = mcp.pool({
        mcp.backend("main1", "127.0.0.1", os.getenv("MAIN1_PORT") or "11212"),
        mcp.backend("main2", "127.0.0.1", os.getenv("MAIN2_PORT") or "11213"),
    })
    return { main = main }
end

function mcp_config_routes(pools)
    local main = pools.main
    -- Every storage and retrieval command goes to the server that the pool's
    -- hash (jump hash over XXH3, as memcached's proxy) picks for its key.
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        return main(r)
    end)
end
