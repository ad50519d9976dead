-- memcached's V2 route API (1.6.30+): function generators, request
-- contexts and routers, next to the V1 hooks in the same routes state.
--
-- This chunk returns an installer, called by mcp.lua's constructor in the
-- routes phase with the `mcp` table and the internals it shares:
-- `install(mcp, internal)` adds mcp.funcgen_new, mcp.funcgenbare_new,
-- mcp.router_new and the WAIT_*/RES_* constants, and returns
--   entry(obj)     the route function mcp.attach installs for a funcgen or
--                  router (nil for anything else),
--   arrived(...)   what the engine calls with each backend reply of a
--                  dispatched handle (true: resume the waiting route),
--   sub_arrived(...) the same for the end of a funcgen handle's route,
--   attached()     whether mcp.attach was given a funcgen or router,
--   timed_out(rctx, seq) what the engine calls when the time of wait
--                  number `seq` of rctx is up (true: resume the route),
--   funcstats()    what `stats proxyfuncs` shows (see there).
--
-- A funcgen's generated function runs inside the route coroutine the engine
-- already made for the request. Waiting (rctx:wait_cond, enqueue_and_wait,
-- wait_handle) yields (WAIT_CALL, rctx, ready, handle, target, request) to
-- the engine for one handle queued since the last wait, or (WAIT_CALL,
-- rctx, ready, -1, sends, count) for `count` of them, `sends` holding their
-- (handle, target, request) flat; a target is a pool, or the route of a
-- funcgen handle; `ready` says whether the wait is satisfied already, or is
-- a number: the seconds after which the wait times out (see timed_out;
-- rctx:sleep is such a wait with nothing to send and nothing to end it). The
-- engine sends them (mcproxy.routing.rcontext) and resumes the coroutine
-- once arrived() or sub_arrived() says the wait is over; requests not
-- waited for keep going and are recorded in the context when they answer.
--
-- Each funcgen keeps request contexts ("slots") for reuse: a slot is made by
-- calling the generator `f(rctx, a)` when no free one is left, serves one
-- request at a time, and goes back to the free list once its function has
-- returned and every request it dispatched has answered.

local coroutine_yield = coroutine.yield
local coroutine_isyieldable = coroutine.isyieldable
local getmetatable = getmetatable
local setmetatable = setmetatable
local type = type
local error = error
local pcall = pcall
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local math_type = math.type
local string_find = string.find
local string_sub = string.sub

-- Handle states within one request.
local IDLE <const> = 0     -- nothing queued
local QUEUED <const> = 1   -- enqueued, not yet sent
local ACTIVE <const> = 2   -- sent, no answer yet
local COMPLETE <const> = 3 -- answered, not yet counted by a wait
local WAITED <const> = 4   -- answered and counted by a wait

-- Wait modes (memcached's numbering: mcp.WAIT_ANY ... WAIT_FASTGOOD).
local WAIT_IDLE <const> = 0
local WAIT_ANY <const> = 1
local WAIT_OK <const> = 2
local WAIT_GOOD <const> = 3
local WAIT_FASTGOOD <const> = 4
local WAIT_HANDLE <const> = 5
local WAIT_SLEEP <const> = 6 -- in rctx:sleep: answers are only recorded

-- What rctx:result() reports (mcp.RES_*).
local RES_GOOD <const> = 8
local RES_OK <const> = 16
local RES_ANY <const> = 32

-- Longest router start/stop string memcached accepts (KEY_HASH_FILTER_MAX).
local ROUTER_SEP_MAX <const> = 5

-- What a client gets when a router finds no route and has no default.
local START_FAILURE <const> = "SERVER_ERROR lua start failure\r\n"

return function(mcp, internal)
    -- the slots of a request table (mcp.lua)
    local R_KEY <const>, R_CMD <const>, R_REQ <const> = 1, 2, 3
    local POOL_PROXY = internal.POOL_PROXY
    local REQUEST = internal.REQUEST
    local new_response = internal.new_response
    local routes_only = internal.routes_only
    local log = internal.log
    local declare = internal.declare
    local declared = internal.declared
    local source_lines = internal.source_lines
    local WAIT_CALL = internal.WAIT_CALL
    local DONE_RESPONSE = internal.DONE_RESPONSE
    local DONE_STRING = internal.DONE_STRING
    local DONE_BAD = internal.DONE_BAD
    local DONE_ERROR = internal.DONE_ERROR
    local pool_logs = internal.pool_logs
    local internal_handler = internal.internal_handler

    local FUNCGEN = { __name = "mcp.funcgen" }
    FUNCGEN.__index = FUNCGEN
    local RCONTEXT = { __name = "mcp.rcontext" }
    RCONTEXT.__index = RCONTEXT
    local ROUTER = { __name = "mcp.router" }
    ROUTER.__index = ROUTER

    mcp.WAIT_ANY = WAIT_ANY
    mcp.WAIT_OK = WAIT_OK
    mcp.WAIT_GOOD = WAIT_GOOD
    mcp.WAIT_FASTGOOD = WAIT_FASTGOOD
    mcp.WAIT_RESUME = true
    mcp.RES_GOOD = RES_GOOD
    mcp.RES_OK = RES_OK
    mcp.RES_ANY = RES_ANY

    -- fgen:new_handle(mcp.internal_handler): a handle to the embedded cache
    -- (the request runs as mcp.internal(r) runs it).
    local INTERNAL = setmetatable({}, { __name = "mcp.internal_handler" })
    mcp.internal_handler = INTERNAL

    -- Function generators ----------------------------------------------

    -- Every funcgen of this state, in creation order, and how many routers
    -- it made (for `stats proxyfuncs`).
    local funcgens = {}
    local routers = 0

    function mcp.funcgen_new()
        routes_only("mcp.funcgen_new")
        -- targets: handle -> Python pool or route function (what is sent);
        -- proxies: handle -> the pool as Lua sees it, for pool handles;
        -- free: the slots not serving a request; slots: how many it made
        local fgen = setmetatable({ targets = {}, proxies = {}, count = 0, is_ready = false,
                                    free = {}, slots = 0, name = "anonymous" }, FUNCGEN)
        funcgens[#funcgens + 1] = fgen
        return fgen
    end

    -- `stats proxyfuncs`, as memcached 1.6.45: per funcgen name, how many
    -- funcgens have it and how many slots they made; routers count as
    -- funcgens named "mcp_router" without slots. A flat array of (name,
    -- funcs, slots), names in the order they first appeared.
    local function funcstats()
        local out, at = {}, {}
        local function add(name, slots)
            local i = at[name]
            if i == nil then
                i = #out + 1
                at[name] = i
                out[i], out[i + 1], out[i + 2] = name, 0, 0
            end
            out[i + 1] = out[i + 1] + 1
            out[i + 2] = out[i + 2] + slots
        end
        for _, fgen in ipairs(funcgens) do
            add(fgen.name, fgen.slots)
        end
        for _ = 1, routers do
            add("mcp_router", 0)
        end
        return out
    end

    local function check_fgen(fgen)
        if getmetatable(fgen) ~= FUNCGEN then
            error("function generator method called without a function generator", 3)
        end
        if fgen.is_ready then
            error("cannot modify function generator after calling ready", 3)
        end
    end

    local run

    -- fgen:new_handle(pool | funcgen): a handle (0, 1, ...) the generated
    -- functions enqueue requests on. A request queued on a funcgen's handle
    -- runs that funcgen's function as a route of its own (the engine starts
    -- it); what it returns is the handle's answer. The engine tells the two
    -- apart by what `targets` holds: a pool, or a route function.
    function FUNCGEN:new_handle(target)
        check_fgen(self)
        local mt = getmetatable(target)
        local handle = self.count
        if mt == POOL_PROXY then
            self.targets[handle] = target._p
            self.proxies[handle] = target
        elseif target == INTERNAL then
            self.targets[handle] = internal_handler
        elseif mt == FUNCGEN then
            if not target.is_ready then
                error("new_handle: the function generator is not ready", 2)
            end
            self.targets[handle] = function(r) return run(target, r) end
        elseif mt == ROUTER then
            error("cannot assign a router to a handle in new_handle", 2)
        else
            error("invalid argument to new_handle", 2)
        end
        self.count = handle + 1
        return handle
    end

    local new_slot

    -- fgen:ready{ f = generator, a = argument, n = name }
    function FUNCGEN:ready(opts)
        check_fgen(self)
        if type(opts) ~= "table" then
            error("fgen:ready: argument must be a table", 2)
        end
        if type(opts.f) ~= "function" then
            error("Must specify generator function ('f') to fgen:ready", 2)
        end
        self.generator = opts.f
        self.argument = opts.a
        if type(opts.n) == "string" then
            self.name = opts.n
        end
        -- Make the first slot now, so a broken generator fails the load.
        local free = self.free
        free[#free + 1] = new_slot(self, 2)
        self.is_ready = true
        return self
    end

    -- mcp.funcgenbare_new(func): a funcgen whose every slot runs func.
    function mcp.funcgenbare_new(func)
        routes_only("mcp.funcgenbare_new")
        if type(func) ~= "function" then
            error("Must pass a function to mcp.funcgenbare_new", 2)
        end
        local fgen = mcp.funcgen_new()
        return fgen:ready({ f = function() return func end })
    end

    -- Request contexts -------------------------------------------------

    local function reset(rctx)
        local state, res, req, flags = rctx.state, rctx.res, rctx.req, rctx.flags
        for h = 0, rctx.fgen.count - 1 do
            state[h] = IDLE
            res[h] = nil
            req[h] = nil
            flags[h] = 0
        end
        local sends = rctx.sends
        for i = 1, rctx.queued * 3 do
            sends[i] = nil
        end
        rctx.queued = 0
        rctx.pending = 0
        rctx.running = false
        rctx.wait_mode = WAIT_IDLE
    end

    -- Make a slot: a context and the function its generator returns.
    function new_slot(fgen, level)
        -- wait_seq counts the waits of the slot (never reset, so that the
        -- timer of an earlier wait cannot end a later one); waiting: yielded
        -- in a wait or sleep; timed_out: how the last one ended
        local rctx = setmetatable({ fgen = fgen, state = {}, res = {}, req = {},
                                    flags = {}, cbs = {}, sends = {}, queued = 0,
                                    wait_done = 0, wait_seq = 0, waiting = false,
                                    timed_out = false,
                                    wait_count = 0, awaited = -1 }, RCONTEXT)
        reset(rctx)
        fgen.slots = fgen.slots + 1
        local func = fgen.generator(rctx, fgen.argument)
        if type(func) ~= "function" then
            error("function generator didn't return a function", level + 1)
        end
        rctx.func = func
        return rctx
    end

    local function release(rctx)
        reset(rctx)
        local free = rctx.fgen.free
        free[#free + 1] = rctx
    end

    local function check_handle(rctx, handle, what)
        if math_type(handle) ~= "integer" or handle < 0 or handle >= rctx.fgen.count then
            error(what, 3)
        end
    end

    local function queue(rctx, r, handle)
        check_handle(rctx, handle, "invalid handle passed to queue")
        if rctx.state[handle] ~= IDLE then
            return -- already used by this request: memcached ignores it too
        end
        rctx.state[handle] = QUEUED
        rctx.req[handle] = r
        local sends = rctx.sends
        local n = rctx.queued * 3
        rctx.queued = rctx.queued + 1
        sends[n + 1] = handle
        sends[n + 2] = rctx.fgen.targets[handle]
        sends[n + 3] = r[R_REQ]
    end

    local function check_request(r)
        if getmetatable(r) ~= REQUEST then
            error("bad argument #1 (mcp.request expected)", 3)
        end
        if r[R_KEY] == nil or r[R_KEY] == "" then
            error("cannot queue requests without a key", 3)
        end
    end

    -- rctx:enqueue(r, handle | {handles}): queue without sending yet.
    function RCONTEXT:enqueue(r, handles)
        check_request(r)
        if math_type(handles) == "integer" then
            queue(self, r, handles)
        elseif type(handles) == "table" then
            for i = 1, #handles do
                local handle = handles[i]
                if math_type(handle) ~= "integer" then
                    error("invalid handle passed to queue via array table", 2)
                end
                queue(self, r, handle)
            end
        else
            error("must pass a handle or a table to queue", 2)
        end
    end

    -- Count handle h toward the current wait; true if the wait is over.
    local function counts(rctx, h, resume)
        local mode = rctx.wait_mode
        local flag = rctx.flags[h]
        local counted
        if mode == WAIT_ANY then
            counted = true
        elseif mode == WAIT_OK then
            counted = flag == RES_GOOD or flag == RES_OK
        elseif mode == WAIT_GOOD then
            counted = flag == RES_GOOD
        elseif mode == WAIT_FASTGOOD then
            counted = flag == RES_GOOD or flag == RES_OK
            resume = resume or flag == RES_GOOD
        else -- WAIT_HANDLE: only the awaited handle ends the wait
            return h == rctx.awaited
        end
        if counted then
            rctx.state[h] = WAITED
            rctx.wait_done = rctx.wait_done + 1
        end
        return resume or rctx.wait_done >= rctx.wait_count or rctx.pending == 0
    end

    local function check_timeout(timeout)
        if timeout ~= nil and type(timeout) ~= "number" then
            error("timeout argument to wait or sleep must be a number", 3)
        end
    end

    -- Yield to the engine; true if the wait timed out.
    local function suspend(rctx, ready, a, b, c)
        rctx.wait_seq = rctx.wait_seq + 1
        rctx.waiting = true
        rctx.timed_out = false
        coroutine_yield(WAIT_CALL, rctx, ready, a, b, c)
        rctx.waiting = false
        return rctx.timed_out
    end

    -- Start a wait: send what is queued, count what already answered, and
    -- yield until the wait is over or, with a `timeout` (seconds), that
    -- time is up; true if it was.
    local function wait(rctx, timeout)
        if not coroutine_isyieldable() then
            error("request context waits can only be made from inside a route", 3)
        end
        local sends, queued = rctx.sends, rctx.queued
        for i = 1, queued * 3, 3 do
            rctx.state[sends[i]] = ACTIVE
        end
        rctx.pending = rctx.pending + queued
        local ready = rctx.wait_count == 0 and rctx.wait_mode ~= WAIT_HANDLE
        if not ready then
            local state = rctx.state
            for h = 0, rctx.fgen.count - 1 do
                if state[h] == COMPLETE and counts(rctx, h, false) then
                    ready = true
                    break
                end
            end
            -- nothing left that could end it: do not wait for ever
            ready = ready or rctx.pending == 0
        end
        if ready then
            rctx.wait_mode = WAIT_IDLE
        elseif timeout ~= nil then
            ready = timeout
        end
        local timed_out
        if queued == 1 then
            -- the common case, without the engine reading a table
            timed_out = suspend(rctx, ready, sends[1], sends[2], sends[3])
        else
            timed_out = suspend(rctx, ready, -1, sends, queued)
        end
        -- the engine has sent them: forget them (the table is reused)
        for i = 1, queued * 3 do
            sends[i] = nil
        end
        rctx.queued = 0
        return timed_out
    end

    -- The time of wait number `seq` of rctx is up: end it, if it is still
    -- going on (true: resume the route). A timed-out wait returns its
    -- count so far (a handle's wait nil) and true; requests still out
    -- keep going and are recorded when they answer.
    local function timed_out(rctx, seq)
        if not rctx.waiting or rctx.wait_seq ~= seq then
            return false
        end
        rctx.wait_mode = WAIT_IDLE
        rctx.timed_out = true
        return true
    end

    -- rctx:sleep(seconds): suspend the request function for that long
    -- (nothing queued is sent); returns true, as memcached's does.
    function RCONTEXT:sleep(seconds)
        if self.wait_mode ~= WAIT_IDLE then
            error("sleep: cannot call while already in wait mode", 2)
        end
        if type(seconds) ~= "number" then
            error("timeout argument to wait or sleep must be a number", 2)
        end
        if not coroutine_isyieldable() then
            error("rctx:sleep can only be called from inside a route", 2)
        end
        self.wait_mode = WAIT_SLEEP
        suspend(self, seconds, -1, self.sends, 0)
        self.wait_mode = WAIT_IDLE
        return true
    end

    -- rctx:wait_cond(count [, mode [, timeout]]): send what is queued and
    -- wait until `count` answers pass `mode` (default WAIT_ANY), or nothing
    -- is left outstanding; returns how many passed (and true if the
    -- timeout, in seconds, ended the wait).
    function RCONTEXT:wait_cond(count, mode, timeout)
        if type(count) ~= "number" then
            error("must pass number to wait_cond", 2)
        end
        count = math.tointeger(count) or math.floor(count)
        if count < 0 then
            error("wait count for wait_cond must be positive", 2)
        end
        mode = mode or WAIT_ANY
        if mode ~= WAIT_ANY and mode ~= WAIT_OK and mode ~= WAIT_GOOD
                and mode ~= WAIT_FASTGOOD then
            error("invalid mode sent to wait_cond", 2)
        end
        check_timeout(timeout)
        self.wait_done = 0
        self.wait_count = count
        self.wait_mode = mode
        if wait(self, timeout) then
            return self.wait_done, true
        end
        return self.wait_done
    end

    local function wait_for(rctx, handle, timeout)
        rctx.wait_done = 0
        rctx.wait_count = 1
        rctx.wait_mode = WAIT_HANDLE
        rctx.awaited = handle
        local state = rctx.state[handle]
        if state == WAITED then
            -- answered and waited for before: memcached would wait for ever
            rctx.wait_mode = WAIT_IDLE
            return rctx.res[handle]
        end
        if wait(rctx, timeout) then
            return nil, true
        end
        rctx.state[handle] = WAITED
        return rctx.res[handle]
    end

    -- rctx:enqueue_and_wait(r, handle [, timeout]): queue, send, and return
    -- its answer (nil and true if `timeout` seconds passed first).
    function RCONTEXT:enqueue_and_wait(r, handle, timeout)
        check_request(r)
        if math_type(handle) ~= "integer" then
            error("invalid handle passed to wait_handle", 2)
        end
        check_timeout(timeout)
        queue(self, r, handle)
        return wait_for(self, handle, timeout)
    end

    -- rctx:wait_handle(handle [, timeout]): wait for a handle queued before.
    function RCONTEXT:wait_handle(handle, timeout)
        check_handle(self, handle, "invalid handle passed to wait_handle")
        if self.state[handle] == IDLE then
            error("wait_handle called on unqueued handle", 2)
        end
        check_timeout(timeout)
        return wait_for(self, handle, timeout)
    end

    -- Names of memcached 1.6.45's request context that mcproxy does not
    -- have: calling one is an error that says so, not a missing method.
    local REFUSED <const> = {
        cfd = "mcproxy does not hand the client connection to routes",
        tls_peer_cn = "mcproxy does not hand the client connection to routes",
        request_new = "it serves memcached's request mutators, which mcproxy does not have",
        response_new = "it serves memcached's response mutators, which mcproxy does not have",
    }
    for name, why in pairs(REFUSED) do
        RCONTEXT[name] = function()
            error("rctx:" .. name .. " is not supported: " .. why, 2)
        end
    end

    -- rctx:handle_set_cb(handle, cb): cb(res, req) runs as each answer of
    -- the handle arrives; it may return a WAIT_* mode to judge the answer
    -- by, and a true second value to end the current wait at once.
    function RCONTEXT:handle_set_cb(handle, cb)
        check_handle(self, handle, "invalid handle passed to queue_set_cb")
        if type(cb) ~= "function" then
            error("bad argument #2 to handle_set_cb (function expected)", 2)
        end
        self.cbs[handle] = cb
    end

    local function result_of(rctx, handle, mask)
        check_handle(rctx, handle, "invalid queue handle passed to :good/:ok:/:any")
        local flag = rctx.flags[handle]
        if flag & mask ~= 0 then
            return rctx.res[handle], flag
        end
        return nil
    end

    function RCONTEXT:res_good(handle)
        return (result_of(self, handle, RES_GOOD))
    end

    function RCONTEXT:res_ok(handle)
        return (result_of(self, handle, RES_GOOD | RES_OK))
    end

    function RCONTEXT:res_any(handle)
        return (result_of(self, handle, RES_GOOD | RES_OK | RES_ANY))
    end

    -- rctx:result(handle): the answer and its RES_* judgement, or nil, nil.
    function RCONTEXT:result(handle)
        local res, flag = result_of(self, handle, RES_GOOD | RES_OK | RES_ANY)
        return res, flag
    end

    -- The first answer among `handles` judged best (rank 1) or worst
    -- (rank -1) by RES_GOOD > RES_OK > RES_ANY, and its judgement.
    local RANK <const> = { [RES_GOOD] = 3, [RES_OK] = 2, [RES_ANY] = 1 }

    local function pick(rctx, handles, sign, what)
        if type(handles) ~= "table" then
            error(what .. ": must pass a table of handles", 3)
        end
        local found, found_flag, found_rank
        for i = 1, #handles do
            local handle = handles[i]
            check_handle(rctx, handle, "invalid handle passed to " .. what)
            local flag = rctx.flags[handle]
            local rank = RANK[flag]
            if rank ~= nil and (found_rank == nil or rank * sign > found_rank * sign) then
                found, found_flag, found_rank = rctx.res[handle], flag, rank
            end
        end
        return found, found_flag
    end

    -- rctx:best_result({handles}) / rctx:worst_result({handles})
    function RCONTEXT:best_result(handles)
        return pick(self, handles, 1, "best_result")
    end

    function RCONTEXT:worst_result(handles)
        return pick(self, handles, -1, "worst_result")
    end

    -- Handle h of rctx has its answer `res`, judged `flag`: run its
    -- callback (`callback` false: none, as memcached for a string); true if
    -- the route waiting on it is to resume now.
    local function record(rctx, h, res, flag, callback)
        rctx.res[h] = res
        rctx.state[h] = COMPLETE
        rctx.pending = rctx.pending - 1
        local resume = false
        local cb = callback and rctx.cbs[h]
        if cb then
            local called, mode, early = pcall(cb, res, rctx.req[h])
            if not called then
                log("handle callback failed: " .. tostring(mode))
            elseif math_type(mode) == "integer" then
                if mode == WAIT_GOOD then
                    flag = RES_GOOD
                elseif mode == WAIT_OK then
                    flag = RES_OK
                else
                    flag = RES_ANY
                end
                resume = early and true or false
            end
        end
        rctx.flags[h] = flag
        if rctx.wait_mode ~= WAIT_IDLE and rctx.wait_mode ~= WAIT_SLEEP then
            if counts(rctx, h, resume) then
                rctx.wait_mode = WAIT_IDLE
                return true
            end
            return false
        end
        if not rctx.running and rctx.pending == 0 then
            release(rctx)
        end
        return false
    end

    -- A backend answered handle h of rctx (see record).
    local function arrived(rctx, h, pres, ok, hit)
        return record(rctx, h, new_response(pres, ok, hit),
                      hit and RES_GOOD or (ok and RES_OK or RES_ANY), true)
    end

    -- The route a funcgen handle h of rctx ran is over: its last step's
    -- kind and value (mcp.lua's DONE_*; a pool call or mcp.await, which
    -- such a route cannot make, counts as an error), and the response that
    -- stands for an error (see record).
    local function sub_arrived(rctx, h, kind, value, failure)
        if kind == DONE_RESPONSE then
            local res = new_response(value, value.ok, value.hit)
            return record(rctx, h, res, value.hit and RES_GOOD or (value.ok and RES_OK or RES_ANY),
                          true)
        elseif kind == DONE_STRING then
            return record(rctx, h, value, RES_ANY, false)
        end
        if kind == DONE_ERROR then
            log("route error in a function generator handle: " .. tostring(value))
        elseif kind ~= DONE_BAD then
            log("a function generator used as a handle called a pool or mcp.await")
        end
        return record(rctx, h, new_response(failure, false, false), RES_ANY, true)
    end

    -- Run a request through a funcgen, in the route's coroutine.
    function run(fgen, r)
        local free = fgen.free
        local n = #free
        local rctx
        if n > 0 then
            rctx = free[n]
            free[n] = nil
        else
            rctx = new_slot(fgen, 1)
        end
        rctx.running = true
        local ok, result = pcall(rctx.func, r)
        rctx.running = false
        if rctx.pending == 0 then
            release(rctx)
        end
        if not ok then
            -- the log says which funcgen failed (as `stats proxyfuncs`
            -- names them)
            error("funcgen " .. fgen.name .. ": " .. tostring(result), 0)
        end
        return result
    end

    -- Routers -------------------------------------------------------------

    local function sep_option(opts, name)
        local value = opts[name]
        if value == nil then
            return nil
        elseif type(value) ~= "string" then
            error("must pass a string to " .. name .. " in mcp.router_new", 3)
        elseif #value == 0 then
            error("must pass a non-zero length string to " .. name .. " in mcp.router_new", 3)
        elseif #value > ROUTER_SEP_MAX then
            error(name .. " is too long in mcp.router_new", 3)
        end
        return value
    end

    local function check_map(map)
        if type(map) ~= "table" then
            error("Must pass a table to map argument of router_new", 3)
        end
        for _, target in pairs(map) do
            if type(target) == "table" and getmetatable(target) == nil then
                for cmd, fgen in pairs(target) do
                    if math_type(cmd) ~= "integer" then
                        error("Non integer key in router command map in router_new", 3)
                    end
                    if (cmd <= 0 or cmd >= mcp.CMD_END_STORAGE) and cmd ~= mcp.CMD_ANY_STORAGE then
                        error("Bad command in router command map in router_new", 3)
                    end
                    if getmetatable(fgen) ~= FUNCGEN then
                        error("bad argument to router_new (mcp.funcgen expected)", 3)
                    end
                end
            elseif getmetatable(target) ~= FUNCGEN then
                error("unhandled data in router_new map", 3)
            end
        end
    end

    -- The part of a key before `stop`, found only where memcached finds it
    -- (a stop of several characters ending the key is not seen).
    local function before(key, first, stop)
        local at = string_find(key, stop, first, true)
        if at == nil or (#stop > 1 and at > #key - #stop) then
            return nil
        end
        return string_sub(key, first, at - 1)
    end

    -- mcp.router_new{ map = {...}, mode = "prefix"|"anchor", start =,
    -- stop =, default = funcgen }: picks a funcgen by part of the key.
    function mcp.router_new(opts)
        routes_only("mcp.router_new")
        if type(opts) ~= "table" then
            error("Must pass a table of arguments to mcp.router_new", 2)
        end
        local map = opts.map or {}
        check_map(map)
        local start, stop = nil, "/"
        local mode = opts.mode
        if mode == "prefix" then
            stop = sep_option(opts, "stop") or "/"
        elseif mode == "anchor" then
            local s, e = sep_option(opts, "start"), sep_option(opts, "stop")
            if s == nil and e == nil then
                start, stop = "/", "/"
            elseif s == nil or e == nil then
                error("must specify start and stop if mode is anchor in mcp.router_new", 2)
            else
                start, stop = s, e
            end
        elseif type(mode) == "string" then
            error("unknown type passed to mcp.router_new", 2)
        end
        local default = opts.default
        if default ~= nil and getmetatable(default) ~= FUNCGEN then
            error("bad argument to router_new: default must be an mcp.funcgen", 2)
        end
        local copy = {}
        for name, target in pairs(map) do
            if getmetatable(target) == FUNCGEN then
                copy[name] = target
            else
                local cmap = {}
                for cmd, fgen in pairs(target) do cmap[cmd] = fgen end
                copy[name] = cmap
            end
        end
        routers = routers + 1
        return setmetatable({ map = copy, start = start, stop = stop,
                              default = default }, ROUTER)
    end

    -- The funcgen a router gives request r, or nil.
    local function route(router, r)
        local key = r[R_KEY]
        if key == nil or key == "" then
            return nil
        end
        local start, stop = router.start, router.stop
        local name
        if start == nil then
            name = before(key, 1, stop)
        elseif #start == 1 and #stop == 1 then
            if string_sub(key, 1, 1) == start then
                name = before(key, 2, stop)
            end
        elseif #start + 2 <= #key and string_sub(key, 1, #start) == start then
            -- memcached always matches a long anchor's stop as a long one
            local at = string_find(key, stop, #start + 1, true)
            if at ~= nil and at <= #key - #stop then
                name = string_sub(key, #start + 1, at - 1)
            end
        end
        if name == nil or name == "" then
            return router.default
        end
        local target = router.map[name]
        if target == nil then
            return router.default
        elseif getmetatable(target) == FUNCGEN then
            return target
        end
        return target[r[R_CMD]] or target[mcp.CMD_ANY_STORAGE] or router.default
    end

    -- Direct funcgens ---------------------------------------------------
    --
    -- A funcgen whose function is `function(r) return rctx:enqueue_and_wait(r,
    -- h) end` (any names), `h` a handle to a pool and no callback set, sends
    -- each request to that pool and answers with its reply: what a route
    -- declared "direct" does, so its attached route declares that shape and
    -- the engine runs it without Lua (shapes.py, direct.py). As for a
    -- hand-written `return pool(r)` (mcp.lua), it is recognised from the
    -- debug library and the function's source text, never its bytecode: one
    -- fixed parameter, two upvalues (the slot's context and the handle),
    -- and lines that read exactly that.
    local debug_getinfo = debug.getinfo
    local debug_getupvalue = debug.getupvalue
    local string_match = string.match
    local next = next

    local FUNCTION_WORD <const> = "%f[%w_]function%f[^%w_]"
    local NAME <const> = "([%a_][%w_]*)"
    local ENQUEUE_AND_WAIT <const> = "^function%s*%(%s*" .. NAME .. "%s*%)%s*return%s+"
        .. NAME .. "%s*:%s*enqueue_and_wait%s*%(%s*" .. NAME .. "%s*,%s*" .. NAME
        .. "%s*%)%s*;?%s*end%f[^%w_]"

    -- The pool proxy a ready funcgen's function sends every request to,
    -- as above, or nil.
    local function direct_pool(fgen)
        local rctx = fgen.free[1] -- the slot fgen:ready made
        if rctx == nil or next(rctx.cbs) ~= nil then
            return nil
        end
        local f = rctx.func
        local info = debug_getinfo(f, "Su")
        if info.what ~= "Lua" or info.nparams ~= 1 or info.isvararg or info.nups ~= 2 then
            return nil
        end
        local name1, value1 = debug_getupvalue(f, 1)
        local name2, value2 = debug_getupvalue(f, 2)
        local ctx, hname, handle
        if value1 == rctx then
            ctx, hname, handle = name1, name2, value2
        elseif value2 == rctx then
            ctx, hname, handle = name2, name1, value1
        else
            return nil
        end
        local proxy = math_type(handle) == "integer" and fgen.proxies[handle]
        if not proxy or pool_logs(proxy._p) then
            return nil -- (the direct path logs nothing: see backend `log`)
        end
        local text = source_lines(info.source, info.linedefined, info.lastlinedefined)
        local at = text and string_find(text, FUNCTION_WORD)
        if at == nil or string_find(text, FUNCTION_WORD, at + 1) then
            return nil
        end
        local param, called_on, arg, passed = string_match(text, ENQUEUE_AND_WAIT, at)
        if param == nil or called_on ~= ctx or arg ~= param or passed ~= hname then
            return nil
        end
        return proxy
    end

    -- What mcp.attach installs -----------------------------------------

    local attached = false

    -- The route that runs ready funcgen fgen, declared as what it is: direct
    -- when its function is, else its generator's shape (routelib.lua
    -- declares its generators); undeclared (Lua) for any other.
    local function fgen_route(fgen)
        local route = function(r) return run(fgen, r) end
        local pool = direct_pool(fgen)
        if pool ~= nil then
            declare(route, { kind = "direct", children = { pool } })
        else
            local shape = declared(fgen.generator)
            if shape ~= nil then
                declare(route, shape)
            end
        end
        return route
    end

    -- A router's shape: how it finds a key's route name (start nil: prefix
    -- mode; see route above), and the routes of its map (name -> route, or
    -- name -> { command -> route }) and default, each declared as
    -- fgen_route declares it. The engine runs the router natively
    -- (routerkey.py, routing/native/router.py); these child routes are
    -- never called, only read. A funcgen not ready yet is false: Lua runs it.
    local function router_shape(router)
        local routes = {}
        local function child(fgen)
            local route = routes[fgen]
            if route == nil then
                route = fgen.is_ready and fgen_route(fgen) or false
                routes[fgen] = route
            end
            return route
        end
        local map = {}
        for name, target in pairs(router.map) do
            if getmetatable(target) == FUNCGEN then
                map[name] = child(target)
            else
                local cmap = {}
                for cmd, fgen in pairs(target) do cmap[cmd] = child(fgen) end
                map[name] = cmap
            end
        end
        return { kind = "router", start = router.start, stop = router.stop, map = map,
                 default = router.default and child(router.default) }
    end

    local function entry(obj)
        local mt = getmetatable(obj)
        if mt == FUNCGEN or mt == ROUTER then
            attached = true
        end
        if mt == FUNCGEN then
            if not obj.is_ready then
                error("cannot attach a function generator before calling ready", 3)
            end
            return fgen_route(obj)
        elseif mt == ROUTER then
            return declare(function(r)
                local fgen = route(obj, r)
                if fgen == nil then
                    return START_FAILURE
                end
                return run(fgen, r)
            end, router_shape(obj))
        end
        return nil
    end

    return entry, arrived, sub_arrived, function() return attached end, timed_out, funcstats
end
