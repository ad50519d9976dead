-- The Lua side of the `mcp` module that route configs see.
--
-- This chunk returns a constructor: `build(host, phase)` makes the `mcp`
-- table for one Lua state. `host` is the Python object (mcproxy.routing.host.Host)
-- that owns backends, pools and counters; `phase` is "config" for the state
-- that runs mcp_config_pools and "routes" for the state that runs
-- mcp_config_routes and the route handlers.
--
-- Requests and responses cross into Lua as small tables holding the Python
-- object plus the plain values Lua asks for most (key, command, ok, hit), so
-- the common methods never call back into Python.
--
-- A route runs as a Lua coroutine. Calling a pool yields (POOL_CALL, pool,
-- req) to the driver, and the Python driver queues the request on a backend
-- and resumes the coroutine with the response. Python callables cannot
-- yield, which is why the yield happens here.

local coroutine_create = coroutine.create
local coroutine_resume = coroutine.resume
local coroutine_yield = coroutine.yield
local coroutine_isyieldable = coroutine.isyieldable
local getmetatable = getmetatable
local setmetatable = setmetatable
local type = type
local error = error
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local math = math

-- What a step of a route tells the Python driver (mirrors engine.py).
local DONE_RESPONSE <const> = 0
local DONE_STRING <const> = 1
local DONE_BAD <const> = 2
local DONE_ERROR <const> = 3
local YIELD_POOL <const> = 4
local YIELD_AWAIT <const> = 5
local YIELD_WAIT <const> = 6

-- What a route's coroutine yields first for a pool call, an await and a
-- request context's wait (v2.lua): tables only this chunk holds, so that
-- no value a route yields itself passes for one of them (the drivers take
-- any other yield for a route that "yielded outside of a pool call").
local POOL_CALL <const> = {}
local AWAIT_CALL <const> = {}
local WAIT_CALL <const> = {}

-- The slots of a request table: its key and command (as Lua reads them
-- most), its Python Request, and for a lazy one (see start_keys) its batch
-- and index there. Array slots: a table of them is built without hashing.
local R_KEY <const> = 1
local R_CMD <const> = 2
local R_REQ <const> = 3
local R_BATCH <const> = 4
local R_INDEX <const> = 5

-- The slots of a response table: ok, hit, its Python Response, and for a
-- lazy one the unit that answered it and its position there.
local S_OK <const> = 1
local S_HIT <const> = 2
local S_RES <const> = 3
local S_UNIT <const> = 4
local S_POS <const> = 5

local AWAIT_GOOD <const> = 0
local AWAIT_BACKGROUND <const> = 5

return function(host, phase, v2, loops)
    local mcp = {}
    local in_config = phase == "config"

    local REQUEST = { __name = "mcp.request" }
    local RESPONSE = { __name = "mcp.response" }

    -- The keys of a client multiget routed in one call (start_keys) get
    -- lazy requests: { key, command, nil, their batch, index } without a
    -- Python Request (R_REQ) until something asks for it, and their answers
    -- lazy responses: { ok, hit, nil, the Python KeyFetch or ReplyRun,
    -- position } without a Python Response (S_RES) until asked. Reading
    -- the missing slot makes the Python object once, from the batch's
    -- Python requests (`requests`, held as long as a request of the batch
    -- is: the same object Python uses for the key while its batch is
    -- routed), and sets the batch's (or unit's) slot to false: the
    -- drivers read that slot, not the missing one, to know a request or
    -- response is still lazy (unedited), without a call to rawget.
    local rawget = rawget
    local rawset = rawset

    REQUEST.__index = function(r, name)
        local method = REQUEST[name]
        if method ~= nil or name ~= R_REQ then
            return method
        end
        local batch = rawget(r, R_BATCH)
        if not batch then
            return nil
        end
        local preq = host.key_request(batch.requests, rawget(r, R_INDEX))
        rawset(r, R_REQ, preq)
        rawset(r, R_BATCH, false)
        return preq
    end

    RESPONSE.__index = function(res, name)
        local method = RESPONSE[name]
        if method ~= nil or name ~= S_RES then
            return method
        end
        local fetch = rawget(res, S_UNIT)
        if not fetch then
            return nil
        end
        local pres = host.key_response(fetch, rawget(res, S_POS))
        rawset(res, S_RES, pres)
        rawset(res, S_UNIT, false)
        return pres
    end
    local BACKEND = { __name = "mcp.backend" }
    local POOL = { __name = "mcp.pool" }
    local POOL_PROXY = { __name = "mcp.pool_proxy" }
    POOL_PROXY.__index = POOL_PROXY

    local function routes_only(name)
        if in_config then
            error(name .. " can only be called from mcp_config_routes or a route", 3)
        end
    end

    local function config_only(name)
        if not in_config then
            error(name .. " can only be called from mcp_config_pools", 3)
        end
    end

    -- Requests ----------------------------------------------------------

    local function new_request(preq, key, cmd)
        return setmetatable({ key, cmd, preq }, REQUEST)
    end

    local function check_request(r, what)
        if getmetatable(r) ~= REQUEST then
            error(what .. " must be passed a request object", 3)
        end
    end

    -- Run a request edit in Python; refresh the cached key afterwards.
    local function edit(r, err, key)
        if err then
            error(err, 3)
        end
        r[R_KEY] = key
    end

    function REQUEST:key()
        return self[R_KEY]
    end

    function REQUEST:command()
        return self[R_CMD]
    end

    function REQUEST:ltrimkey(n)
        if math.type(n) ~= "integer" then
            error("ltrimkey: argument must be an integer", 2)
        end
        edit(self, host.ltrimkey(self[R_REQ], n))
        return n
    end

    function REQUEST:rtrimkey(n)
        if math.type(n) ~= "integer" then
            error("rtrimkey: argument must be an integer", 2)
        end
        edit(self, host.rtrimkey(self[R_REQ], n))
        return n
    end

    function REQUEST:token(i, replacement)
        if i == nil then
            return nil
        end
        if math.type(i) ~= "integer" then
            error("token: index must be an integer", 2)
        end
        if replacement == nil then
            return host.token(self[R_REQ], i)
        end
        if type(replacement) ~= "string" and type(replacement) ~= "number" then
            error("token: replacement must be a string", 2)
        end
        edit(self, host.set_token(self[R_REQ], i, tostring(replacement)))
    end

    function REQUEST:token_int(i)
        if i == nil then
            return nil
        end
        if math.type(i) ~= "integer" then
            error("token_int: index must be an integer", 2)
        end
        local token = host.token(self[R_REQ], i)
        return token and math.tointeger(tonumber(token))
    end

    function REQUEST:ntokens()
        return host.ntokens(self[R_REQ])
    end

    function REQUEST:has_flag(flag)
        local found, err = host.has_flag(self[R_REQ], flag)
        if err then
            error(err, 2)
        end
        return found
    end

    -- (false) | (true) | (true, token without the flag letter); with a
    -- replacement the whole flag token is replaced (the old one returned).
    function REQUEST:flag_token(flag, replacement)
        if replacement ~= nil and type(replacement) ~= "string" then
            error("flag_token: replacement must be a string", 2)
        end
        local found, value, err, key = host.flag_token(self[R_REQ], flag, replacement)
        if err then
            error(err, 2)
        end
        if replacement ~= nil and found then
            self[R_KEY] = key
        end
        if value == nil then
            return found
        end
        return found, value
    end

    -- memcached 1.6.45's flag methods check their arguments as it does,
    -- with its messages; a bad one is luaL_checklstring's "bad argument
    -- #n to 'name' (string expected, got ...)", n counted as in a method
    -- call (r:flag_add(...)), the way routes call them.
    local flag_byte = string.byte

    local function bad_argument(n, name, expected, value, absent)
        return ("bad argument #%d to '%s' (%s expected, got %s)"):format(
            n, name, expected, absent and "no value" or type(value))
    end

    -- The flag letter argument `value` (the `n`th of method `name`).
    local function flag_letter(value, n, name, absent)
        local kind = type(value)
        if kind == "number" then
            value = tostring(value)
        elseif kind ~= "string" then
            error(bad_argument(n, name, "string", value, absent), 3)
        end
        if #value ~= 1 then
            error("request: meta flag must be a single character", 3)
        end
        local letter = flag_byte(value)
        if letter < 65 or letter > 122 then
            error("request: invalid flag, must be A-Z,a-z", 3)
        end
        return value
    end

    -- The token of a flag edit: a string, a number as Lua writes it,
    -- nothing (""), or false for anything else.
    local function flag_value(value)
        local kind = type(value)
        if kind == "string" then
            return value
        elseif kind == "number" then
            return tostring(value)
        elseif value == nil then
            return ""
        end
        return false
    end

    -- r:raw_line(): the request line without its CRLF; r:raw_value(): the
    -- payload with its CRLF, or nil.
    function REQUEST:raw_line()
        return host.raw_line(self[R_REQ])
    end

    function REQUEST:raw_value()
        return host.raw_value(self[R_REQ])
    end

    -- (false) for a flag that is absent, bare, or over 22 bytes; (true)
    -- for one whose value is no 64-bit number; (true, number).
    function REQUEST:flag_token_int(...)
        local flag = ...
        local kind = type(flag)
        if kind == "number" then
            flag = tostring(flag)
        elseif kind ~= "string" then
            error(bad_argument(1, "flag_token_int", "string", flag, select("#", ...) == 0), 2)
        end
        if #flag ~= 1 then
            error("has_flag(): meta flag must be a single character", 2)
        end
        local found, value = host.flag_token_int(self[R_REQ], flag)
        if value == nil then
            return found
        end
        return found, value
    end

    -- Flag edits: true once made; false if the flag is there already
    -- (flag_add), is not there (flag_del), or the edited line would not be
    -- one request memcached reads as one (wire/request.py append_flag).
    function REQUEST:flag_add(...)
        local flag, token = ...
        flag = flag_letter(flag, 1, "flag_add", select("#", ...) == 0)
        local done = host.flag_add(self[R_REQ], flag, flag_value(token))
        if done == nil then
            error("request: invalid flag argument", 2)
        end
        return done
    end

    function REQUEST:flag_set(...)
        local flag, token = ...
        flag = flag_letter(flag, 1, "flag_set", select("#", ...) == 0)
        token = flag_value(token)
        if token == false then
            error("request: invalid flag argument", 2)
        end
        return host.flag_set(self[R_REQ], flag, flag, token)
    end

    function REQUEST:flag_replace(...)
        local flag, new, token = ...
        local given = select("#", ...)
        flag = flag_letter(flag, 1, "flag_replace", given == 0)
        new = flag_letter(new, 2, "flag_replace", given < 2)
        token = flag_value(token)
        if token == false then
            error("request: invalid flag argument", 2)
        end
        return host.flag_set(self[R_REQ], flag, new, token)
    end

    function REQUEST:flag_del(...)
        local flag = flag_letter(..., 1, "flag_del", select("#", ...) == 0)
        return host.flag_del(self[R_REQ], flag)
    end

    -- (true, nil) when the response's k flag is the request's key and its
    -- O flag the request's opaque; (false, why) when not; (false, nil)
    -- when there was nothing to compare.
    function REQUEST:match_res(...)
        local res = ...
        if getmetatable(res) ~= RESPONSE then
            error(bad_argument(1, "match_res", "mcp.response", res, select("#", ...) == 0), 2)
        end
        return host.match_res(self[R_REQ], res[S_RES])
    end

    -- Responses ---------------------------------------------------------

    function RESPONSE:ok()
        return self[S_OK]
    end

    function RESPONSE:hit()
        return self[S_HIT]
    end

    function RESPONSE:code()
        return self[S_RES].code
    end

    function RESPONSE:vlen()
        return self[S_RES].vlen
    end

    function RESPONSE:elapsed()
        return self[S_RES].elapsed
    end

    function RESPONSE:line()
        return host.response_line(self[S_RES])
    end

    -- res:raw_string(): the reply's bytes (a VALUE with its END), nil for
    -- a failure.
    function RESPONSE:raw_string()
        return host.raw_string(self[S_RES])
    end

    -- res:flag_blank(f): overwrite the first flag token of f in a meta
    -- reply with spaces (the client gets the line so); false if none.
    function RESPONSE:flag_blank(...)
        local flag = flag_letter(..., 1, "flag_blank", select("#", ...) == 0)
        return host.flag_blank(self[S_RES], flag)
    end

    -- res:close(), and `local res <close> = ...`: let go of the response
    -- (its value) before the route ends. A closed response returned from
    -- a route is a bad response (memcached 1.6.45 sends nothing for it).
    function RESPONSE:close()
        self[S_RES] = nil
        self[S_UNIT] = nil
    end
    RESPONSE.__close = RESPONSE.close

    local function new_response(pres, ok, hit)
        return setmetatable({ ok, hit, pres }, RESPONSE)
    end

    -- Backends and pools (config phase) ---------------------------------

    function mcp.backend(label, hostname, port)
        config_only("mcp.backend")
        local b, err
        if type(label) == "table" then
            b, err = host.backend_from_table(label)
        else
            if type(label) ~= "string" and type(label) ~= "number" then
                error("mcp.backend: label must be a string", 2)
            end
            if type(hostname) ~= "string" then
                error("mcp.backend: host must be a string", 2)
            end
            if type(port) ~= "string" and type(port) ~= "number" then
                error("mcp.backend: port must be a string or a number", 2)
            end
            b, err = host.backend(tostring(label), hostname, tostring(port))
        end
        if err then
            error(err, 2)
        end
        return setmetatable({ _b = b }, BACKEND)
    end

    function mcp.pool(backends, opts)
        config_only("mcp.pool")
        if type(backends) ~= "table" then
            error("mcp.pool: first argument must be a table of backends", 2)
        end
        if opts ~= nil and type(opts) ~= "table" then
            error("mcp.pool: options must be a table", 2)
        end
        local list = {}
        for i = 1, #backends do
            local b = backends[i]
            if getmetatable(b) ~= BACKEND then
                error("mcp.pool: element " .. i .. " is not an mcp.backend", 2)
            end
            list[i] = b._b
        end
        local p, err = host.pool(list, opts)
        if err then
            error(err, 2)
        end
        return setmetatable({ _p = p }, POOL)
    end

    -- Routes phase ------------------------------------------------------

    -- A pool as a route sees it: calling it sends the request to the
    -- backend the pool's distribution picks for the request's key. Every
    -- route calls this, so it only yields: the driver checks `r` (step,
    -- start_keys) and resumes with an error for what is not a request.
    -- Outside a route coroutine the yield fails, as in memcached's proxy.
    function POOL_PROXY.__call(pool, r)
        local res, err = coroutine_yield(POOL_CALL, pool._p, r)
        if err then
            error(err, 2)
        end
        return res
    end

    -- mcp.pool_backend(pool, key): the label of the backend the pool picks
    -- for the key, without sending anything (for route introspection).
    function mcp.pool_backend(pool, key)
        routes_only("mcp.pool_backend")
        if getmetatable(pool) ~= POOL_PROXY then
            error("mcp.pool_backend: first argument must be a pool", 2)
        end
        if type(key) ~= "string" then
            error("mcp.pool_backend: key must be a string", 2)
        end
        local label, err = host.pool_backend(pool._p, key)
        if err then
            error(err, 2)
        end
        return label
    end

    function mcp.request(line, value)
        routes_only("mcp.request")
        if type(line) ~= "string" then
            error("mcp.request: request line must be a string", 2)
        end
        local vtype = getmetatable(value)
        if vtype == RESPONSE then
            value = value[S_RES]
            if value == nil then
                error("mcp.request: the response is closed", 2)
            end
        elseif vtype == REQUEST then
            value = value[R_REQ]
        elseif value ~= nil and type(value) ~= "string" then
            error("mcp.request: value must be a string, request or response", 2)
        end
        local preq, err = host.request(line, value)
        if err then
            error(err, 2)
        end
        return new_request(preq, preq.key, preq.command)
    end

    -- mcp.await(r, pools [, wait_for [, mode]]): send r to every pool in
    -- the table and wait; returns the responses in arrival order.
    function mcp.await(r, pools, wait_for, mode)
        routes_only("mcp.await")
        check_request(r, "mcp.await")
        if type(pools) ~= "table" then
            error("mcp.await must be supplied with a table of pools", 2)
        end
        if wait_for ~= nil and type(wait_for) ~= "number" then
            error("mcp.await: wait_for must be a number", 2)
        end
        mode = mode or AWAIT_GOOD
        if math.type(mode) ~= "integer" or mode < AWAIT_GOOD or mode > AWAIT_BACKGROUND then
            error("invalid type argument tp mcp.await", 2)
        end
        local list = {}
        for _, p in pairs(pools) do
            if getmetatable(p) ~= POOL_PROXY then
                error("mcp.await must be supplied with a pool", 2)
            end
            list[#list + 1] = p._p
        end
        if #list == 0 then
            error("mcp.await arguments must have at least one pool", 2)
        end
        if not coroutine_isyieldable() then
            error("mcp.await can only be called from inside a route", 2)
        end
        local raw, err = coroutine_yield(AWAIT_CALL, r[R_REQ], list,
                                         math.tointeger(wait_for) or 0, mode)
        if err then
            error(err, 2)
        end
        local results = {}
        for i = 1, #raw do
            local p = raw[i]
            results[i] = new_response(p, p.ok, p.hit)
        end
        return results
    end

    -- Run the request against the proxy's embedded cache.
    function mcp.internal(r)
        routes_only("mcp.internal")
        check_request(r, "mcp.internal")
        local p, ok, hit = host.internal(r[R_REQ])
        return new_response(p, ok, hit)
    end

    function mcp.log_req(r, res, detail)
        routes_only("mcp.log_req")
        check_request(r, "mcp.log_req")
        host.log_req(r[R_REQ], res and res[S_RES], detail and tostring(detail) or "")
    end

    function mcp.log_reqsample(ms, rate, allerr, r, res, detail)
        routes_only("mcp.log_reqsample")
        check_request(r, "mcp.log_reqsample")
        host.log_reqsample(ms, rate, allerr, r[R_REQ], res and res[S_RES],
                           detail and tostring(detail) or "")
    end

    -- The V2 API (v2.lua): funcgens and routers, installed for the routes
    -- phase once the shapes section below is defined.
    local v2_entry, v2_arrived, v2_sub_arrived, v2_attached, v2_timed_out, v2_funcstats

    -- The routes of untagged listeners, and per listener tag those
    -- attached under it (a tagged listener falls back to the untagged
    -- route of a command it has none for, as memcached's proxy does).
    local hooks = {}
    local tagged = {}
    local ANY_LAST <const> = 34
    local ANY_STORAGE_LAST <const> = 20
    local MAX_TAG <const> = 8

    function mcp.attach(cmd, func, tag)
        routes_only("mcp.attach")
        if tag ~= nil then
            -- memcached takes what Lua reads as a string (numbers too) and
            -- ignores anything else; mcproxy refuses it rather than serve
            -- the route on every listener.
            if type(tag) ~= "string" and type(tag) ~= "number" then
                error("mcp.attach: tag must be a string, not a " .. type(tag), 2)
            end
            tag = tostring(tag)
            if #tag < 1 or #tag > MAX_TAG then
                error("mcp.attach: tag must be 1 to 8 characters", 2)
            end
        end
        if type(func) ~= "function" then
            func = v2_entry and v2_entry(func)
            if func == nil then
                error("Must pass a function to mcp.attach", 2)
            end
        end
        if math.type(cmd) ~= "integer" then
            error("mcp.attach: command must be an mcp.CMD_* constant", 2)
        end
        if cmd ~= mcp.CMD_ANY and cmd ~= mcp.CMD_ANY_STORAGE and (cmd < 1 or cmd > ANY_LAST) then
            error("mcp.attach: unknown command id " .. cmd, 2)
        end
        local into = hooks
        if tag ~= nil then
            into = tagged[tag]
            if into == nil then
                into = {}
                tagged[tag] = into
            end
        end
        if cmd == mcp.CMD_ANY then
            -- Not flush_all and verbosity: they address whole servers, and
            -- a route written for keys would reach one pool where the
            -- proxy's default reaches all. They are attached by name.
            for i = 1, ANY_LAST do
                if i ~= mcp.CMD_FLUSH_ALL and i ~= mcp.CMD_VERBOSITY then
                    into[i] = func
                end
            end
        elseif cmd == mcp.CMD_ANY_STORAGE then
            for i = 1, ANY_STORAGE_LAST do into[i] = func end
        else
            into[cmd] = func
        end
    end

    -- User stats and logging --------------------------------------------

    function mcp.add_stat(idx, name)
        config_only("mcp.add_stat")
        local err = host.add_stat(idx, name)
        if err then
            error(err, 2)
        end
    end

    function mcp.stat(idx, delta)
        routes_only("mcp.stat")
        local err = host.stat(idx, delta)
        if err then
            error(err, 2)
        end
    end

    function mcp.log(msg)
        host.log(tostring(msg))
    end

    mcp.time_real_millis = host.time_real_millis
    mcp.time_mono_millis = host.time_mono_millis

    -- Tunables ----------------------------------------------------------

    for _, name in pairs({ "backend_connect_timeout", "backend_retry_timeout",
                           "backend_retry_waittime", "backend_read_timeout",
                           "backend_failure_limit", "tcp_keepalive",
                           "backend_depth_limit", "backend_use_tls",
                           "backend_use_iothread", "active_req_limit",
                           "stat_limit" }) do
        mcp[name] = function(value)
            local err = host.tunable(name, value)
            if err then
                error(err, 2)
            end
        end
    end

    -- mcp.init_tls(): memcached sets up its TLS context here; ours is made
    -- per backend, so this only checks that TLS is available.
    function mcp.init_tls()
        local err = host.init_tls()
        if err then
            error(err, 2)
        end
    end

    -- Names of memcached 1.6.45's API that mcproxy does not have: calling
    -- one is an error that names it and says why (host.refusal).
    local index = 1
    while true do
        local name, why = host.refusal(index)
        if name == nil then
            break
        end
        local message = "mcp." .. name .. " is not supported by mcproxy: " .. why
        mcp[name] = function() error(message, 2) end
        index = index + 1
    end

    -- Crons (config) ----------------------------------------------------

    -- mcp.register_cron(name, { every = s, rerun = bool, func = f }):
    -- run f every s seconds (mcproxy.routing.crons).
    function mcp.register_cron(name, opts)
        config_only("mcp.register_cron")
        local err = host.register_cron(name, opts)
        if err then
            error(err, 2)
        end
    end

    -- mcp.schedule_config_reload(): reload the config once the running
    -- code is done, as SIGHUP does.
    function mcp.schedule_config_reload()
        config_only("mcp.schedule_config_reload")
        host.schedule_config_reload()
    end

    -- Rate limits -------------------------------------------------------
    --
    -- A token bucket (mcproxy.routing.ratelimits) is called with the
    -- tokens to take: `if tbf(15) then ... end`. mcp.ratelim_tbf makes one
    -- for the routes state; mcp.ratelim_global_tbf one in the config phase,
    -- returned from mcp_config_pools and callable in the routes.
    local RATELIM = { __name = "mcp.ratelim_tbf" }
    local RATELIM_GLOBAL = { __name = "mcp.ratelim_global_tbf" }
    local RATELIM_PROXY = { __name = "mcp.ratelim_proxy_tbf" }

    local function take(limiter, count)
        if math.type(count) ~= "integer" or count < 0 then
            error("rate limit: tokens to take must be an integer >= 0", 2)
        end
        return limiter._take(count)
    end
    RATELIM.__call = take
    RATELIM_PROXY.__call = take

    function mcp.ratelim_tbf(opts)
        routes_only("mcp.ratelim_tbf")
        local bucket, err = host.ratelim(opts, "mcp.ratelim_tbf")
        if err then
            error(err, 2)
        end
        return setmetatable({ _take = bucket.take }, RATELIM)
    end

    function mcp.ratelim_global_tbf(opts)
        config_only("mcp.ratelim_global_tbf")
        local bucket, err = host.ratelim(opts, "mcp.ratelim_global_tbf")
        if err then
            error(err, 2)
        end
        return setmetatable({ _t = bucket }, RATELIM_GLOBAL)
    end

    -- Driving a route ---------------------------------------------------

    -- Route coroutines are reused: each runs `body`, which runs a handler
    -- for a request, leaves what it returned in `returned` and yields
    -- FINISHED, idle until resumed with the next handler and request. A
    -- coroutine whose route failed is dead, and one that stopped elsewhere
    -- (a pool call never answered) is left to the collector; only idle ones
    -- wait in `idle`: at most IDLE_MAX, about 1 KB each, enough for the
    -- keys of 50 clients' 16 pipelined gets in flight at once.
    local FINISHED = {}
    local IDLE_MAX <const> = 1024
    local idle, idle_count = {}, 0
    local returned = {}

    -- `body` comes from a chunk without line information: a route's
    -- error(message, 2) then adds no position, as when the route is the
    -- coroutine's own function.
    local body = load(string.dump(function(yield, finished_mark, out)
        return function(handler, r)
            while true do
                out[1] = handler(r)
                -- idle coroutines hold no request or handler
                handler, r = nil, nil
                handler, r = yield(finished_mark)
            end
        end
    end, true), "=route", "b")(coroutine_yield, FINISHED, returned)

    local function route_coroutine()
        local n = idle_count
        if n == 0 then
            return coroutine_create(body)
        end
        local co = idle[n]
        idle[n] = nil
        idle_count = n - 1
        return co
    end

    -- What the route of coroutine `co` returned (it has yielded FINISHED).
    local function finished(co)
        local a = returned[1]
        returned[1] = nil
        if idle_count < IDLE_MAX then
            idle_count = idle_count + 1
            idle[idle_count] = co
        end
        return a
    end

    -- What a route returned, as the Python driver needs it.
    local function done(a)
        if getmetatable(a) == RESPONSE then
            local pres = a[S_RES]
            if pres == nil then
                return DONE_BAD, nil
            end
            return DONE_RESPONSE, pres
        elseif type(a) == "string" then
            return DONE_STRING, a
        end
        return DONE_BAD, nil
    end

    -- Turn what resume returned into what the Python driver needs.
    local function step(co, ok, a, b, c, d, e, f)
        if not ok then
            return DONE_ERROR, tostring(a)
        end
        if a == FINISHED then
            return done(finished(co))
        end
        -- suspended: a pool call, an await, or a bare yield
        if a == POOL_CALL then
            if getmetatable(c) ~= REQUEST then
                return step(co, coroutine_resume(co, nil, "pool must be passed a request object"))
            end
            return YIELD_POOL, co, b, c[R_REQ]
        elseif a == AWAIT_CALL then
            return YIELD_AWAIT, co, b, c, d, e
        elseif a == WAIT_CALL then
            return YIELD_WAIT, co, b, c, d, e, f
        end
        return DONE_ERROR, "route yielded outside of a pool call"
    end

    -- Start a route for a client request.
    local function start(handler, preq, key, cmd)
        local co = route_coroutine()
        return step(co, coroutine_resume(co, handler, new_request(preq, key, cmd)))
    end

    -- The keys of a client multiget (or the requests of a run of plain
    -- gets), routed in one call into Lua. Each key runs its own coroutine
    -- with a lazy request (see REQUEST.__index); the batch is a table
    -- { id = the number Python knows it by, multiget = ..., cos = the
    -- coroutines by index from 1, pending = how many wait in a pool call },
    -- kept in `batches` while any does. What each step gives Python is
    -- three values per key, in `out`:
    --   KEY_POOL, pool, index: the key's route sent the lazy request of
    --     key `index` of this batch, unedited, to the pool;
    --   DONE_RESPONSE, response, false, or DONE_RESPONSE, fetch, index for
    --     a lazy response; DONE_STRING, text, false;
    --   KEY_STEP, false, false: anything else; `full[i]` holds the step as
    --     `start` would have returned it, for Python to drive as it drives
    --     any route (`full` is false while there is none).
    local KEY_POOL <const> = 7
    local KEY_STEP <const> = 8
    local batches = {}
    -- The compiled loops (mcproxy.routing._keyloops), where built: they
    -- take the keys as far as the loops below would take them on the
    -- common step, and leave the rest to those.
    local start_loop = loops and loops.start
    local resume_loop = loops and loops.resume
    local string_byte = string.byte

    local function key_step(out, full, batch, i, co, ok, a, b, c, d, e, f)
        local n = #out
        local packed
        if ok and a == FINISHED then
            a = finished(co)
            if getmetatable(a) == RESPONSE then
                local pres = rawget(a, S_RES)
                if pres ~= nil then
                    out[n + 1], out[n + 2], out[n + 3] = DONE_RESPONSE, pres, false
                    return full
                end
                local fetch = rawget(a, S_UNIT)
                if fetch ~= nil then
                    out[n + 1], out[n + 2], out[n + 3] = DONE_RESPONSE, fetch, rawget(a, S_POS)
                    return full
                end
            elseif type(a) == "string" then
                out[n + 1], out[n + 2], out[n + 3] = DONE_STRING, a, false
                return full
            end
            packed = table.pack(done(a))
        elseif a == POOL_CALL and getmetatable(c) == REQUEST and rawget(c, R_BATCH) == batch then
            -- (a lazy request, still without a Python Request: its slots are its own)
            out[n + 1], out[n + 2], out[n + 3] = KEY_POOL, b, c[R_INDEX]
            batch.pending = batch.pending + 1
            return full
        else
            packed = table.pack(step(co, ok, a, b, c, d, e, f))
        end
        if not full then
            full = {}
        end
        full[i] = packed
        out[n + 1], out[n + 2], out[n + 3] = KEY_STEP, false, false
        return full
    end

    -- Write into `out` the steps of the first `count` keys, which all took
    -- step `kind` with `value` and their own index: sent their own request,
    -- unedited, to the pool `value` (KEY_POOL); returned the response the
    -- unit `value` gave them (DONE_RESPONSE).
    local function all_took(out, count, kind, value)
        for k = 0, count - 1 do
            local at = 3 * k
            out[at + 1], out[at + 2], out[at + 3] = kind, value, k
        end
    end

    -- Keep a batch while any of its keys waits in a pool call.
    local function keep(batch)
        if batch.pending > 0 then
            batches[batch.id] = batch
        else
            batches[batch.id] = nil
        end
    end

    -- Start a route for each key (the varargs) of batch `id`, whose Python
    -- requests are `requests`: the key's command is `cmd`, routed by
    -- `handler`, or where its byte in `kinds` is 1 (`kinds` false: none),
    -- `other_cmd`, routed by `other`. Returns `full`, then `out`; or, when
    -- every key sent its own request to one pool, unedited, false and
    -- that pool (most routes: then `out` is never written).
    local function start_keys(handler, other, id, requests, cmd, other_cmd, multiget, kinds, ...)
        -- `cos` starts as the keys: each is read before its coroutine takes its slot
        local cos, full, out = { ... }, false, nil
        local batch = { id = id, requests = requests, multiget = multiget, cos = cos,
                        pending = 0 }
        -- `out` stays nil while every key sent its own request to `pool`:
        -- `sent` of them
        local pool, sent = nil, 0
        local count, first = #cos, 0
        if start_loop then  -- as far as every key takes that step; then as below
            local ok, a, b, c, d, e, f
            first, pool, idle_count, ok, a, b, c, d, e, f = start_loop(
                cos, batch, handler, cmd, REQUEST, idle, idle_count, body, kinds, other,
                other_cmd, count, POOL_CALL)
            sent = first
            if first < count then
                out = {}
                all_took(out, first, KEY_POOL, pool)
                full = key_step(out, full, batch, first, cos[first + 1], ok, a, b, c, d, e, f)
                first = first + 1
            end
        end
        for i = first, count - 1 do
            local route, command = handler, cmd
            if kinds and string_byte(kinds, i + 1) == 1 then
                route, command = other, other_cmd
            end
            local r = setmetatable({ cos[i + 1], command, nil, batch, i }, REQUEST)
            local co, n = nil, idle_count  -- route_coroutine(), inlined
            if n == 0 then
                co = coroutine_create(body)
            else
                co = idle[n]
                idle[n] = nil
                idle_count = n - 1
            end
            cos[i + 1] = co
            local ok, a, b, c, d, e, f = coroutine_resume(co, route, r)
            if out == nil and a == POOL_CALL and c == r and r[R_BATCH] == batch
                    and (b == pool or pool == nil) then
                pool = b
                sent = sent + 1
            else
                if out == nil then
                    out = {}
                    all_took(out, i, KEY_POOL, pool)
                end
                full = key_step(out, full, batch, i, co, ok, a, b, c, d, e, f)
            end
        end
        batch.pending = batch.pending + sent
        keep(batch)
        if out == nil then
            if pool ~= nil then
                return false, pool
            end
            return full  -- no keys
        end
        return full, table.unpack(out)
    end

    -- Resume the coroutines of batch `id` whose pool calls a KeyFetch (or ReplyRun)
    -- answered: `fetch` the unit, `flags` a byte per key (0 failed,
    -- 1 missed, 2 hit), then the index of each key's coroutine (none:
    -- every key of the batch, in order). Returns
    -- `full`, then `out`; or, when every key returned the response it was
    -- given (`out` never written), false and true.
    local FLAG_OK <const> = { [0] = false, true, true }
    local FLAG_HIT <const> = { [0] = false, false, true }
    local function resume_keys(id, fetch, flags, ...)
        local batch = batches[id]
        local cos, full, out = batch.cos, false, nil
        local count = select("#", ...)
        local waiting = false
        if count == 0 then  -- every key of the batch, in order
            count = #cos
        else
            waiting = { ... }
        end
        batch.pending = batch.pending - count
        local first = 1
        if resume_loop then  -- as far as every key returns its response; then as below
            local i, co, ok, a, b, c, d, e, f
            first, idle_count, i, co, ok, a, b, c, d, e, f = resume_loop(
                cos, waiting, count, fetch, flags, RESPONSE, FINISHED, returned, idle,
                idle_count, IDLE_MAX)
            if first < count then
                out = {}
                all_took(out, first, DONE_RESPONSE, fetch)
                full = key_step(out, full, batch, i, co, ok, a, b, c, d, e, f)
            end
            first = first + 2
        end
        if first <= count then
            flags = { string_byte(flags, 1, count) }
        end
        for j = first, count do
            local i = waiting and waiting[j] or j - 1
            local co = cos[i + 1]
            local flag = flags[j]
            local res = setmetatable({ FLAG_OK[flag], FLAG_HIT[flag], nil, fetch, j - 1 },
                                     RESPONSE)
            local ok, a, b, c, d, e, f = coroutine_resume(co, res)
            -- (only a finished route yields FINISHED; S_UNIT is the unit
            -- while the response is lazy, so no __index)
            if out == nil and a == FINISHED and returned[1] == res and res[S_UNIT] == fetch then
                returned[1] = nil  -- finished(co), inlined
                if idle_count < IDLE_MAX then
                    idle_count = idle_count + 1
                    idle[idle_count] = co
                end
            else
                if out == nil then
                    out = {}
                    all_took(out, j - 1, DONE_RESPONSE, fetch)
                end
                full = key_step(out, full, batch, i, co, ok, a, b, c, d, e, f)
            end
        end
        keep(batch)
        if out == nil then
            return false, true
        end
        return full, table.unpack(out)
    end

    -- The coroutine of key `i` of batch `id`, no longer waiting in a pool
    -- call there (Python drives it on alone).
    local function key_alone(id, i)
        local batch = batches[id]
        batch.pending = batch.pending - 1
        keep(batch)
        return batch.cos[i + 1]
    end

    -- Forget batch `id` (after an internal error).
    local function drop_keys(id)
        batches[id] = nil
    end

    -- The full step start_keys or resume_keys kept for key `i`.
    local function key_full(full, i)
        local packed = full[i]
        return table.unpack(packed, 1, packed.n)
    end

    -- Resume a route with a backend's response (or an error to raise).
    local function resume(co, pres, ok, hit)
        return step(co, coroutine_resume(co, new_response(pres, ok, hit)))
    end

    local function resume_error(co, message)
        return step(co, coroutine_resume(co, nil, message))
    end

    -- Resume an await with a table of Python responses.
    local function resume_await(co, responses)
        return step(co, coroutine_resume(co, responses))
    end

    -- Resume a route whose request context wait is over (v2.lua).
    local function resume_wait(co)
        return step(co, coroutine_resume(co))
    end

    -- A reply for a request context's handle; the route's next step if it
    -- ends the wait the route is in, else nil (v2.lua's arrived).
    local function arrive(co, rctx, handle, pres, ok, hit)
        if v2_arrived(rctx, handle, pres, ok, hit) then
            return step(co, coroutine_resume(co))
        end
        return nil
    end

    -- The same for the end of a funcgen handle's route (v2.lua).
    local function sub_arrive(co, rctx, handle, kind, value, failure)
        if v2_sub_arrived(rctx, handle, kind, value, failure) then
            return step(co, coroutine_resume(co))
        end
        return nil
    end

    -- Used by the engine when copying mcp_config_pools' result.
    local function kind(value)
        local mt = getmetatable(value)
        if mt == POOL then return "pool", value._p end
        if mt == BACKEND then return "backend", nil end
        if mt == RATELIM_GLOBAL then return "ratelim", value._t end
        return nil
    end

    local function pool_proxy(p)
        return setmetatable({ _p = p }, POOL_PROXY)
    end

    -- A global token bucket as the routes state sees it.
    local function ratelim_proxy(bucket)
        return setmetatable({ _take = bucket.take }, RATELIM_PROXY)
    end

    -- Route shapes ------------------------------------------------------
    --
    -- A route built by the route library declares what it is (as
    -- memcached's routelib declares its route handles to the C side): a
    -- table with a `kind` ("direct", "failover", ...), the very tables of
    -- children its body calls, and its options (see routes.lua). The engine
    -- reads the declarations of the attached routes once they are built, and
    -- runs the shapes it knows (mcproxy/routing/direct.py) without entering
    -- Lua. Routes stay plain functions, so mcp.attach, composition and
    -- calling a route by hand work as before; the registry is weak-keyed so
    -- routes nobody holds are collected. Only the library declares:
    -- `declare` is handed to its chunk when it is loaded, and is neither
    -- in `mcp` nor a global.
    local shapes = setmetatable({}, { __mode = "k" })

    local function declare(fn, shape)
        if type(fn) ~= "function" or type(shape) ~= "table" or type(shape.kind) ~= "string" then
            error("declare: expected a route function and a table with a kind", 2)
        end
        if shapes[fn] ~= nil then
            error("declare: a route is declared once, where it is built", 2)
        end
        shapes[fn] = shape
        return fn
    end

    -- A route written by hand as `function(r) return pool(r) end` (any
    -- names; also `local function f(r) ... end`) is recognised from what
    -- the debug library says of it and from its source text, never from its
    -- bytecode: one fixed parameter; one upvalue, holding a pool; the
    -- source lines the function spans (of its chunk's string, or of the
    -- file it was loaded from, as that file is now) hold the word
    -- `function` once, and from there read exactly `function(p) return
    -- u(p) end`, `p` the parameter and `u` that upvalue's name. Comments or
    -- a second function on those lines, or a chunk whose text is unknown
    -- (a name given to load with "="), leave it to Lua.
    local debug_getinfo = debug.getinfo
    local debug_getupvalue = debug.getupvalue
    local io_open = io.open
    local string_find = string.find
    local string_match = string.match
    local string_gmatch = string.gmatch
    local string_sub = string.sub
    local table_concat = table.concat

    local FUNCTION_WORD <const> = "%f[%w_]function%f[^%w_]"
    local NAME <const> = "([%a_][%w_]*)"
    local HAND_DIRECT <const> = "^function%s*[%a_]?[%w_.]*%s*%(%s*" .. NAME .. "%s*%)%s*return%s+"
        .. NAME .. "%s*%(%s*" .. NAME .. "%s*%)%s*;?%s*end%f[^%w_]"

    -- The text of lines first..last of a function's chunk, or nil.
    local function source_lines(source, first, last)
        local lead = string_sub(source, 1, 1)
        local text = source
        if lead == "=" then
            return nil
        elseif lead == "@" then
            local f = io_open(string_sub(source, 2), "rb")
            if f == nil then
                return nil
            end
            text = f:read("a")
            f:close()
            if text == nil then
                return nil
            end
        end
        local lines, n = {}, 0
        for line in string_gmatch(text .. "\n", "([^\n]*)\n") do
            n = n + 1
            if n > last then
                break
            end
            if n >= first then
                lines[#lines + 1] = line
            end
        end
        return table_concat(lines, "\n")
    end

    local function hand_direct(f)
        local info = debug_getinfo(f, "Su")
        if info.what ~= "Lua" or info.nparams ~= 1 or info.isvararg or info.nups ~= 1 then
            return nil
        end
        local upvalue, pool = debug_getupvalue(f, 1)
        if getmetatable(pool) ~= POOL_PROXY then
            return nil
        end
        local text = source_lines(info.source, info.linedefined, info.lastlinedefined)
        local at = text and string_find(text, FUNCTION_WORD)
        if at == nil or string_find(text, FUNCTION_WORD, at + 1) then
            return nil
        end
        local param, called, arg = string_match(text, HAND_DIRECT, at)
        if param == nil or called ~= upvalue or arg ~= param then
            return nil
        end
        return pool
    end

    -- What the engine knows of a route: its declaration; for a recognised
    -- hand-written direct route, the declaration routes.direct makes;
    -- else nil.
    local function shape(f)
        local declared = shapes[f]
        if declared ~= nil then
            return declared
        end
        local pool = hand_direct(f)
        if pool ~= nil then
            return { kind = "direct", children = { pool } }
        end
        return nil
    end

    if not in_config then
        v2_entry, v2_arrived, v2_sub_arrived, v2_attached, v2_timed_out, v2_funcstats = v2(mcp, {
            POOL_PROXY = POOL_PROXY,
            REQUEST = REQUEST,
            new_response = new_response,
            routes_only = routes_only,
            log = host.log,
            pool_logs = host.pool_logs,
            internal_handler = host.internal_handler,
            declare = declare,
            declared = function(f) return shapes[f] end,
            source_lines = source_lines,
            WAIT_CALL = WAIT_CALL,
            DONE_RESPONSE = DONE_RESPONSE,
            DONE_STRING = DONE_STRING,
            DONE_BAD = DONE_BAD,
            DONE_ERROR = DONE_ERROR,
        })
    end

    -- The Python pool behind a routes-phase pool, or nil for anything else.
    local function pool_of(value)
        if getmetatable(value) == POOL_PROXY then
            return value._p
        end
        return nil
    end

    local engine = {
        declare = declare,
        shape = shape,
        pool_of = pool_of,
        hooks = hooks,
        tagged = tagged,
        start = start,
        start_keys = start_keys,
        resume_keys = resume_keys,
        key_full = key_full,
        key_alone = key_alone,
        drop_keys = drop_keys,
        resume = resume,
        resume_error = resume_error,
        resume_await = resume_await,
        resume_wait = resume_wait,
        arrived = v2_arrived,
        arrive = arrive,
        sub_arrived = v2_sub_arrived,
        sub_arrive = sub_arrive,
        v2_attached = v2_attached,
        kind = kind,
        pool_proxy = pool_proxy,
        ratelim_proxy = ratelim_proxy,
        timed_out = v2_timed_out,
        funcstats = v2_funcstats,
    }
    return mcp, engine
end
