-- The V1 route config of the same route (tests/e2e/wire/v2.lua), run by
-- mcproxy and by memcached 1.6.15's proxy.

function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", assert(os.getenv("WIRE_BACKEND"))) })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
