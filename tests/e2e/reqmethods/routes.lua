-- Request and response methods of memcached 1.6.45's proxy (r:raw_line,
-- r:raw_value, r:flag_token_int, r:flag_add/set/replace/del, r:match_res,
-- res:flag_blank, res:raw_string), run by mcproxy and by the 1.6.45
-- binary alike (tests/e2e/test_reqmethods_differential.py). The key's
-- first segment names a case; a key with "/send" also sends the edited
-- request to the backend and answers with the backend's reply.

function mcp_config_pools()
    return {
        main = mcp.pool({ mcp.backend("m1", "127.0.0.1", tonumber(os.getenv("RM_MAIN"))) }),
        down = mcp.pool({ mcp.backend("d1", "127.0.0.1", tonumber(os.getenv("RM_DOWN"))) }),
    }
end

-- Values as text: strings quoted, the rest by tostring, joined by "|".
local function show(...)
    local parts = {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        parts[i] = type(v) == "string" and ("'" .. v .. "'") or tostring(v)
    end
    return table.concat(parts, "|")
end

-- What f(...) returns, or its error without the position Lua prefixes.
local function attempt(f, ...)
    local got = table.pack(pcall(f, ...))
    if not got[1] then
        return "ERR " .. (tostring(got[2]):gsub("^[^:]*:%d+: ", ""))
    end
    return show(table.unpack(got, 2, got.n))
end

-- Edits: each returns what the method returned.
local EDITS = {
    add = function(r) return r:flag_add("F") end,
    addstr = function(r) return r:flag_add("F", "1234") end,
    addnum = function(r) return r:flag_add("F", 5678) end,
    addneg = function(r) return r:flag_add("F", -5) end,
    addfloat = function(r) return r:flag_add("F", 1.5) end,
    addbool = function(r) return r:flag_add("F", true) end,
    addtable = function(r) return r:flag_add("F", {}) end,
    addempty = function(r) return r:flag_add("F", "") end,
    addexist = function(r) return r:flag_add("v", "x") end,
    addlong = function(r) return r:flag_add("F", string.rep("x", 600)) end,
    add400 = function(r) return r:flag_add("F", string.rep("x", 480)) end,
    addspace = function(r) return r:flag_add("F", "a b") end,
    addcrlf = function(r) return r:flag_add("F", "a\r\nmn") end,
    addnul = function(r) return r:flag_add("F", "a\0b") end,
    addk = function(r) return r:flag_add("k") end,
    addO = function(r) return r:flag_add("O", "opq") end,
    addq = function(r) return r:flag_add("q") end,
    adddigit = function(r) return r:flag_add("1") end,
    addtwo = function(r) return r:flag_add("FF") end,
    addnone = function(r) return r:flag_add() end,
    addlow = function(r) return r:flag_add("@") end,
    addbrace = function(r) return r:flag_add("z") end,
    set = function(r) return r:flag_set("F") end,
    setstr = function(r) return r:flag_set("F", "4321") end,
    setnum = function(r) return r:flag_set("F", 8765) end,
    setexist = function(r) return r:flag_set("O", "over") end,
    setflag = function(r) return r:flag_set("O") end,
    setv = function(r) return r:flag_set("v", "x") end,
    setlong = function(r) return r:flag_set("O", string.rep("x", 600)) end,
    setbool = function(r) return r:flag_set("O", false) end,
    repl = function(r) return r:flag_replace("F", "O", "foo") end,
    repl2 = function(r) return r:flag_replace("F", "O") end,
    replO = function(r) return r:flag_replace("O", "N", 30) end,
    replbad = function(r) return r:flag_replace("O", "9") end,
    del = function(r) return r:flag_del("O") end,
    delv = function(r) return r:flag_del("v") end,
    delnone = function(r) return r:flag_del("Z") end,
    delbad = function(r) return r:flag_del("") end,
    delkey = function(r) return r:flag_del("d") end,
    fti = function(r)
        local out = {}
        for _, f in ipairs({ "T", "N", "O", "v", "Z", "s" }) do
            out[#out + 1] = show(r:flag_token_int(f))
        end
        return table.concat(out, ",")
    end,
    ftibad = function(r) return r:flag_token_int("TT") end,
    ftidigit = function(r) return r:flag_token_int("1") end,
    addn = function(r) return r:flag_add("F", string.rep("x", tonumber(r:key():match("/(%d+)$")))) end,
    setn = function(r) return r:flag_set("O", string.rep("x", tonumber(r:key():match("/(%d+)$")))) end,
    line = function(r) return r:raw_line(), r:raw_value() end,
    token = function(r) r:token(2, "token/changed") return r:raw_line() end,
}

function mcp_config_routes(pools)
    local fgen = mcp.funcgen_new()
    local main = fgen:new_handle(pools.main)
    local down = fgen:new_handle(pools.down)
    fgen:ready({ n = "reqmethods", f = function(rctx)
        return function(r)
            local key = r:key()
            local case = key:match("^([^/]+)/") or key
            local send = key:find("/send", 1, true) ~= nil
            local edit = EDITS[case]
            if edit ~= nil then
                local got = attempt(edit, r)
                if send then
                    return rctx:enqueue_and_wait(r, main)
                end
                return "R " .. got .. " " .. show(r:raw_line()) .. "\r\n"
            end
            local h = key:find("/down", 1, true) and down or main
            local res = rctx:enqueue_and_wait(r, h)
            if case == "raw" then
                return "R " .. attempt(res.raw_string, res) .. "\r\n"
            elseif case == "match" then
                return "R " .. attempt(r.match_res, r, res) .. "\r\n"
            elseif case == "matchO" then
                r:flag_set("O", "999")
                return "R " .. attempt(r.match_res, r, res) .. "\r\n"
            elseif case == "matchadd" then
                r:flag_add("O", "5")
                return "R " .. attempt(r.match_res, r, res) .. "\r\n"
            elseif case == "matchk" then
                r:ltrimkey(1)
                return "R " .. attempt(r.match_res, r, res) .. "\r\n"
            elseif case == "matchbad" then
                return "R " .. attempt(function() return r:match_res("x") end) .. "\r\n"
            elseif case == "blank" then
                res:flag_blank("O")
                return res
            elseif case == "blankk" then
                local got = attempt(res.flag_blank, res, "k")
                local again = attempt(res.flag_blank, res, "k")
                return "R " .. got .. " " .. again .. " " .. show(res:line()) .. "\r\n"
            elseif case == "blanks" then
                return "R " .. attempt(res.flag_blank, res, "s") .. " "
                    .. attempt(res.flag_blank, res, "") .. " "
                    .. attempt(res.flag_blank, res, "9") .. " " .. show(res:line()) .. "\r\n"
            elseif case == "blankv" then
                res:flag_blank("t")
                return res
            end
            return res
        end
    end })
    for _, cmd in ipairs({ mcp.CMD_MG, mcp.CMD_MS, mcp.CMD_MD, mcp.CMD_MA, mcp.CMD_GET,
                           mcp.CMD_GAT, mcp.CMD_SET, mcp.CMD_INCR, mcp.CMD_DELETE,
                           mcp.CMD_TOUCH }) do
        mcp.attach(cmd, fgen)
    end
end
