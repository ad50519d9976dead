-- A route config in memcached's V2 API, run unchanged by mcproxy and by
-- memcached 1.6.45's proxy (tests/e2e/test_v2_differential.py). The
-- backends' ports come from the environment: V2_A, V2_B, V2_DOWN.

local function port(name)
    return assert(os.getenv(name), name .. " is not set")
end

function mcp_config_pools()
    local function pool(label, name)
        return mcp.pool({ mcp.backend({ label = label, host = "127.0.0.1", port = port(name),
                                        connecttimeout = 1, retrywaittime = 1 }) })
    end
    return { a = pool("a", "V2_A"), b = pool("b", "V2_B"), down = pool("down", "V2_DOWN") }
end

-- A funcgen over `pools` whose slots run make(rctx, handles).
local function funcgen(name, make, pools)
    local fgen = mcp.funcgen_new()
    local handles = {}
    for i, pool in ipairs(pools or {}) do
        handles[i] = fgen:new_handle(pool)
    end
    fgen:ready({ n = name, a = handles, f = make })
    return fgen
end

local function direct(rctx, h)
    return function(r)
        return rctx:enqueue_and_wait(r, h[1])
    end
end

-- Every handle's judgement as text.
local function results(rctx, h, n)
    local parts = { "n=" .. tostring(n) }
    for i = 1, #h do
        local res, mode = rctx:result(h[i])
        parts[#parts + 1] = string.format("%d:%s:%s:%s:%s%s%s", h[i], tostring(mode),
            tostring(res and res:ok()), tostring(res and res:hit()),
            tostring(rctx:res_good(h[i]) ~= nil), tostring(rctx:res_ok(h[i]) ~= nil),
            tostring(rctx:res_any(h[i]) ~= nil))
    end
    return "SERVER_ERROR " .. table.concat(parts, " ") .. "\r\n"
end

function mcp_config_routes(p)
    local map = {
        a = funcgen("a", direct, { p.a }),
        b = funcgen("b", direct, { p.b }),
        down = funcgen("down", direct, { p.down }),
        err = funcgen("err", function() return function(r) error("boom") end end),
        none = funcgen("none", function() return function(r) return nil end end),
        all = funcgen("all", function(rctx, h) return function(r)
            rctx:enqueue(r, h)
            return results(rctx, h, rctx:wait_cond(#h, mcp.WAIT_ANY))
        end end, { p.a, p.b, p.down }),
        good = funcgen("good", function(rctx, h) return function(r)
            rctx:enqueue(r, h)
            local n = rctx:wait_cond(2, mcp.WAIT_GOOD)
            return rctx:res_good(h[1]) or rctx:res_good(h[2])
                or "SERVER_ERROR none good n=" .. n .. "\r\n"
        end end, { p.a, p.b }),
        ok = funcgen("ok", function(rctx, h) return function(r)
            rctx:enqueue(r, h)
            return results(rctx, h, rctx:wait_cond(2, mcp.WAIT_OK))
        end end, { p.a, p.down }),
        -- replicate: write to both, answer with the first pool's reply
        both = funcgen("both", function(rctx, h) return function(r)
            rctx:enqueue(r, h)
            rctx:wait_cond(#h, mcp.WAIT_ANY)
            return rctx:res_any(h[1])
        end end, { p.a, p.b }),
        -- failover: the second pool when the first fails or misses
        fo = funcgen("fo", function(rctx, h) return function(r)
            local res = rctx:enqueue_and_wait(r, h[1])
            if res:hit() then
                return res
            end
            return rctx:enqueue_and_wait(r, h[2])
        end end, { p.down, p.a }),
        zero = funcgen("zero", function(rctx, h) return function(r)
            rctx:enqueue(r, h[1])
            return "SERVER_ERROR zero n=" .. rctx:wait_cond(0) .. "\r\n"
        end end, { p.a }),
        wh = funcgen("wh", function(rctx, h) return function(r)
            rctx:enqueue(r, h)
            return rctx:wait_handle(h[2])
        end end, { p.a, p.b }),
        cb = funcgen("cb", function(rctx, h)
            rctx:handle_set_cb(h[1], function(res, req)
                return mcp.WAIT_GOOD
            end)
            return function(r)
                rctx:enqueue(r, h)
                return results(rctx, h, rctx:wait_cond(1, mcp.WAIT_GOOD))
            end
        end, { p.a }),
        cmd = {
            [mcp.CMD_MG] = funcgen("cmd-mg", function() return function(r)
                return "SERVER_ERROR mg only\r\n"
            end end),
        },
        cmdany = {
            [mcp.CMD_MG] = funcgen("cmdany-mg", function() return function(r)
                return "SERVER_ERROR cmdany mg\r\n"
            end end),
            [mcp.CMD_ANY_STORAGE] = funcgen("cmdany", direct, { p.b }),
        },
    }
    -- funcgens as handles: a pool, a route to a pool, a string, an error
    local text = funcgen("text", function() return function(r)
        return "SERVER_ERROR text\r\n"
    end end)
    local broken = funcgen("broken", function() return function(r) error("sub boom") end end)
    local parent = mcp.funcgen_new()
    local subs = { parent:new_handle(p.a), parent:new_handle(map.b), parent:new_handle(text),
                   parent:new_handle(broken) }
    parent:ready({ n = "parent", f = function(rctx) return function(r)
        local which = tonumber(string.sub(r:key(), 5, 5))
        if which then
            return rctx:enqueue_and_wait(r, subs[which])
        end
        rctx:enqueue(r, subs)
        local n = rctx:wait_cond(#subs, mcp.WAIT_ANY)
        local parts = { "n=" .. n }
        for i = 1, #subs do
            local res, mode = rctx:result(subs[i])
            parts[#parts + 1] = subs[i] .. ":" .. tostring(mode)
        end
        return "SERVER_ERROR " .. table.concat(parts, " ") .. "\r\n"
    end end })
    map.sub = parent

    local default = funcgen("default", function() return function(r)
        return "SERVER_ERROR default " .. r:key() .. "\r\n"
    end end)
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({ map = map, mode = "prefix", stop = "/" }))
    local anchored = {
        x = funcgen("x", direct, { p.a }),
    }
    -- memcached's own direct route (routelib's route_direct): mcproxy runs
    -- it without Lua
    local plain = mcp.funcgen_new()
    plain:ready({ n = "plain", a = plain:new_handle(p.a), f = function(rctx, handle)
        return function(r) return rctx:enqueue_and_wait(r, handle) end
    end })
    mcp.attach(mcp.CMD_GAT, plain)
    mcp.attach(mcp.CMD_INCR, plain)
    mcp.attach(mcp.CMD_TOUCH, mcp.router_new({ map = anchored, mode = "anchor",
                                               start = "=?=", stop = "__", default = default }))
end
