-- A V2 route config (a function generator attached to every storage
-- command) run unchanged by mcproxy and by memcached 1.6.45's proxy
-- (tests/e2e/test_wire_differential.py). WIRE_BACKEND: the backend's port.

function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", assert(os.getenv("WIRE_BACKEND"))) })
end

function mcp_config_routes(pool)
    local fgen = mcp.funcgen_new()
    local handle = fgen:new_handle(pool)
    fgen:ready({ n = "direct", f = function(rctx)
        return function(r)
            return rctx:enqueue_and_wait(r, handle)
        end
    end })
    mcp.attach(mcp.CMD_ANY_STORAGE, fgen)
end
