-- The V2 route API: keys "main/..." go to one pool; keys "repl/..." are
-- written to both zones and read from the near one, then the far one on a
-- miss or failure. Anything else answers SERVER_ERROR no route.
function mcp_config_pools()
    local function zone(label, port)
        return mcp.pool({ mcp.backend(label, "127.0.0.1", os.getenv(port) or "11212") })
    end
    return { near = zone("near", "NEAR_PORT"), far = zone("far", "FAR_PORT") }
end

-- A funcgen: handles to its pools are made once; f makes one request
-- function per request context ("slot"), reused from request to request.
local function funcgen(name, pools, f)
    local fgen = mcp.funcgen_new()
    local handles = {}
    for i, pool in ipairs(pools) do
        handles[i] = fgen:new_handle(pool)
    end
    fgen:ready({ n = name, a = handles, f = f })
    return fgen
end

local function direct(rctx, h)
    return function(r)
        return rctx:enqueue_and_wait(r, h[1])
    end
end

local function replicated_write(rctx, h)
    return function(r)
        rctx:enqueue(r, h)                  -- queued: nothing sent yet
        rctx:wait_cond(#h, mcp.WAIT_ANY)    -- send to both, wait for both
        return rctx:res_ok(h[1]) or rctx:res_any(h[2])
    end
end

local function near_then_far(rctx, h)
    return function(r)
        local res = rctx:enqueue_and_wait(r, h[1])
        if res:hit() then
            return res
        end
        return rctx:enqueue_and_wait(r, h[2])
    end
end

function mcp_config_routes(p)
    local zones = { p.near, p.far }
    local repl = {
        [mcp.CMD_GET] = funcgen("repl_get", zones, near_then_far),
        [mcp.CMD_MG] = funcgen("repl_mg", zones, near_then_far),
        [mcp.CMD_ANY_STORAGE] = funcgen("repl_write", zones, replicated_write),
    }
    local none = mcp.funcgenbare_new(function(r)
        return "SERVER_ERROR no route\r\n"
    end)
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({
        map = { main = funcgen("main", { p.near }, direct), repl = repl },
        mode = "prefix", stop = "/", default = none,
    }))
end
