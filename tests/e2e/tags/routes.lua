-- Routes per listener tag for tests/e2e/test_tags_e2e.py, run by both
-- mcproxy (--listen=tag_x_:... --listen=tag[y]:... --listen=...) and
-- memcached 1.6.45 (-l tag_x_:...,tag[y]:...,...): V2 funcgens and a
-- router, attached untagged and under the tags "x" and "y".
local A = tonumber(os.getenv("TAGS_A"))
local B = tonumber(os.getenv("TAGS_B"))

function mcp_config_pools()
    return { a = mcp.pool({ mcp.backend("a", "127.0.0.1", A) }),
             b = mcp.pool({ mcp.backend("b", "127.0.0.1", B) }) }
end

-- A funcgen that sends each request to `pool` and answers its reply.
local function direct(pool, name)
    local fg = mcp.funcgen_new()
    local h = fg:new_handle(pool)
    fg:ready{ n = name, f = function(rctx)
        return function(r) return rctx:enqueue_and_wait(r, h) end
    end }
    return fg
end

-- A funcgen that answers `name` as an error, naming who answered.
local function answer(name)
    local fg = mcp.funcgen_new()
    fg:ready{ n = name, f = function()
        return function() return "SERVER_ERROR " .. name .. "\r\n" end
    end }
    return fg
end

function mcp_config_routes(p)
    -- untagged listeners: these four commands to pool a; the rest local
    for _, cmd in ipairs({ mcp.CMD_GET, mcp.CMD_SET, mcp.CMD_MG, mcp.CMD_MS }) do
        mcp.attach(cmd, direct(p.a, "untagged"))
    end
    -- tag x: every storage command by prefix (b/ to pool b), else an error
    mcp.attach(mcp.CMD_ANY_STORAGE,
               mcp.router_new{ map = { b = direct(p.b, "x-b") }, default = answer("x-default") },
               "x")
    -- tag y: its get to pool b and its delete answered here; the other
    -- commands fall back to the untagged routes (or to the local cache)
    mcp.attach(mcp.CMD_GET, direct(p.b, "y-get"), "y")
    mcp.attach(mcp.CMD_DELETE, answer("y-delete"), "y")
    -- a tag no listener has: attached, and never reached
    mcp.attach(mcp.CMD_GET, answer("nobody"), "nobody")
end
