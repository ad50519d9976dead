-- The Lua side of the `mcp` module that route configs see.
--
-- This chunk returns a constructor: `build(host, phase)` makes the `mcp`
-- table for one Lua state. `host` is the Python object (mcproxy.lua.mcp.Host)
-- that owns backends, pools and counters; `phase` is "config" for the state
-- that runs mcp_config_pools and "routes" for the state that runs
-- mcp_config_routes and the route handlers.
--
-- Requests and responses cross into Lua as small tables holding the Python
-- object plus the plain values Lua asks for most (key, command, ok, hit), so
-- the common methods never call back into Python.
--
-- A route runs as a Lua coroutine. Calling a pool yields (POOL, pool, req) to
-- the Python driver, which queues the request on a backend and resumes the
-- coroutine with the response. Python callables cannot yield, which is why
-- the yield happens here.

local coroutine_create = coroutine.create
local coroutine_resume = coroutine.resume
local coroutine_status = coroutine.status
local coroutine_yield = coroutine.yield
local coroutine_isyieldable = coroutine.isyieldable
local getmetatable = getmetatable
local setmetatable = setmetatable
local type = type
local error = error
local pairs = pairs
local tostring = tostring

-- What a step of a route tells the Python driver (mirrors engine.py).
local DONE_RESPONSE <const> = 0
local DONE_STRING <const> = 1
local DONE_BAD <const> = 2
local DONE_ERROR <const> = 3
local YIELD_POOL <const> = 4

return function(host, phase)
    local mcp = {}
    local in_config = phase == "config"

    local REQUEST = { __name = "mcp.request" }
    REQUEST.__index = REQUEST
    local RESPONSE = { __name = "mcp.response" }
    RESPONSE.__index = RESPONSE
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
        return setmetatable({ _r = preq, _k = key, _c = cmd }, REQUEST)
    end

    local function check_request(r, what)
        if getmetatable(r) ~= REQUEST then
            error(what .. " must be passed a request object", 3)
        end
    end

    function REQUEST:key()
        return self._k
    end

    function REQUEST:command()
        return self._c
    end

    -- Responses ---------------------------------------------------------

    function RESPONSE:ok()
        return self._ok
    end

    function RESPONSE:hit()
        return self._hit
    end

    local function new_response(pres, ok, hit)
        return setmetatable({ _p = pres, _ok = ok, _hit = hit }, RESPONSE)
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
    -- backend the pool's distribution picks for the request's key.
    function POOL_PROXY.__call(pool, r)
        check_request(r, "pool")
        if not coroutine_isyieldable() then
            error("pools can only be called from inside a route", 2)
        end
        local res, err = coroutine_yield(YIELD_POOL, pool._p, r._r)
        if err then
            error(err, 2)
        end
        return res
    end

    local hooks = {}
    local ANY_LAST <const> = 34
    local ANY_STORAGE_LAST <const> = 20

    function mcp.attach(cmd, func)
        routes_only("mcp.attach")
        if type(func) ~= "function" then
            error("Must pass a function to mcp.attach", 2)
        end
        if math.type(cmd) ~= "integer" then
            error("mcp.attach: command must be an mcp.CMD_* constant", 2)
        end
        if cmd == mcp.CMD_ANY then
            for i = 1, ANY_LAST do hooks[i] = func end
        elseif cmd == mcp.CMD_ANY_STORAGE then
            for i = 1, ANY_STORAGE_LAST do hooks[i] = func end
        elseif cmd >= 1 and cmd <= ANY_LAST then
            hooks[cmd] = func
        else
            error("mcp.attach: unknown command id " .. cmd, 2)
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

    -- Tunables ----------------------------------------------------------

    for _, name in pairs({ "backend_connect_timeout", "backend_retry_timeout",
                           "backend_read_timeout", "backend_failure_limit",
                           "tcp_keepalive" }) do
        mcp[name] = function(value)
            local err = host.tunable(name, value)
            if err then
                error(err, 2)
            end
        end
    end

    -- Driving a route ---------------------------------------------------

    -- Turn what resume returned into what the Python driver needs.
    local function step(co, ok, a, b, c)
        if coroutine_status(co) == "dead" then
            if not ok then
                return DONE_ERROR, tostring(a)
            end
            local mt = getmetatable(a)
            if mt == RESPONSE then
                return DONE_RESPONSE, a._p
            elseif type(a) == "string" then
                return DONE_STRING, a
            end
            return DONE_BAD, nil
        end
        -- suspended: a pool call (a == YIELD_POOL) or a bare yield
        if a == YIELD_POOL then
            return YIELD_POOL, co, b, c
        end
        return DONE_ERROR, "route yielded outside of a pool call"
    end

    -- Start a route for a client request.
    local function start(handler, preq, key, cmd)
        local co = coroutine_create(handler)
        return step(co, coroutine_resume(co, new_request(preq, key, cmd)))
    end

    -- Resume a route with a backend's response (or an error to raise).
    local function resume(co, pres, ok, hit)
        return step(co, coroutine_resume(co, new_response(pres, ok, hit)))
    end

    local function resume_error(co, message)
        return step(co, coroutine_resume(co, nil, message))
    end

    -- Used by the engine when copying mcp_config_pools' result.
    local function kind(value)
        local mt = getmetatable(value)
        if mt == POOL then return "pool", value._p end
        if mt == BACKEND then return "backend", nil end
        return nil
    end

    local function pool_proxy(p)
        return setmetatable({ _p = p }, POOL_PROXY)
    end

    local engine = {
        hooks = hooks,
        start = start,
        resume = resume,
        resume_error = resume_error,
        kind = kind,
        pool_proxy = pool_proxy,
    }
    return mcp, engine
end
