-- The second file: routes over what pools.lua made. Each answers a line that
-- shows what the API names returned, so that the two proxies can be compared.
local function funcgen(name, handles, body)
    local fgen = mcp.funcgen_new()
    local h = {}
    for i, pool in ipairs(handles) do
        h[i] = fgen:new_handle(pool)
    end
    fgen:ready({ n = name, f = function(rctx)
        return function(r) return body(rctx, h, r) end
    end })
    return fgen
end

local function line(...)
    local parts = {}
    for i = 1, select("#", ...) do
        parts[#parts + 1] = tostring((select(i, ...)))
    end
    return "HD " .. table.concat(parts, " ") .. "\r\n"
end

function mcp_config_routes(c)
    local tbf = mcp.ratelim_tbf({ limit = 50, fillrate = 4, tickrate = 1000000 })
    local map = {
        rl = funcgen("rl", {}, function(rctx, h, r)
            if tbf(15) then return line("ok") end
            return "SERVER_ERROR slow down\r\n"
        end),
        grl = funcgen("grl", {}, function(rctx, h, r)
            return line(c.lim(1))
        end),
        sleep = funcgen("sleep", { c.a }, function(rctx, h, r)
            local slept = rctx:sleep(0.1)
            local res = rctx:enqueue_and_wait(r, h[1])
            return line(slept, res:hit())
        end),
        cond = funcgen("cond", { c.hole }, function(rctx, h, r)
            rctx:enqueue(r, h[1])
            return line(rctx:wait_cond(1, mcp.WAIT_ANY, 0.2))
        end),
        handle = funcgen("handle", { c.hole }, function(rctx, h, r)
            return line(rctx:enqueue_and_wait(r, h[1], 0.2))
        end),
        waith = funcgen("waith", { c.hole }, function(rctx, h, r)
            rctx:enqueue(r, h[1])
            return line(rctx:wait_handle(h[1], 0.2))
        end),
        intime = funcgen("intime", { c.a }, function(rctx, h, r)
            rctx:enqueue(r, h[1])
            local done, timeout = rctx:wait_cond(1, mcp.WAIT_ANY, 2)
            return line(done, timeout, rctx:res_any(h[1]):hit())
        end),
        int = funcgen("int", { mcp.internal_handler }, function(rctx, h, r)
            return rctx:enqueue_and_wait(r, h[1])
        end),
        direct = funcgen("direct", { c.a }, function(rctx, h, r)
            return rctx:enqueue_and_wait(r, h[1])
        end),
    }
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({ map = map }))
end
