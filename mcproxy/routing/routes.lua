-- mcproxy's route library: ready-made routes built on the public mcp API.
--
--     local routes = require("mcproxy.routes")
--
-- A route is a plain Lua function `function(r) ... return res end`, as
-- mcp.attach takes. The constructors here (failover, all_sync, warmup ...)
-- return such functions, so they compose: wherever a route is expected, a
-- pool, a route built here, or a route written by hand will do. Where the
-- requests have to go out in parallel (all_sync, all_fastest, broadcast, the
-- background half of all_async and split, the remote zones of zfailover)
-- the children must be pools, because mcp.await sends to pools only; a
-- route function there is refused when the route is built.
--
-- Pools may also be given by name (a string). Names are resolved by
-- routes.bind(pools), which routes.config calls for you; this lets a whole
-- config be written as data at the top level of the file, before the pools
-- exist (see routes.config below).
--
-- Every route built here records what it is made of (in a weak-keyed
-- table), so routes.describe can say where a request would go without
-- sending it, and routes.introspect can answer
-- `get __mcproxy__.route(<command>,<key>)` with that path.
--
-- Every route built here also declares its shape to the engine (see
-- "Shapes" below), so that the engine can run the common shapes, such as
-- routes.direct and the routes.config of one pool, without entering Lua.
--
-- Nothing here is global: the module is this table of functions.

local mcp = mcp
-- The engine's declare(fn, shape), handed to this chunk when it is loaded
-- (mcp.lua); configs cannot reach it, so only this file declares routes.
local declare = ...
if type(declare) ~= "function" then
    error("mcproxy.routes must be loaded with require", 2)
end

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local getmetatable = getmetatable
local string_byte = string.byte
local string_find = string.find
local string_format = string.format
local string_gmatch = string.gmatch
local string_match = string.match
local string_sub = string.sub
local table_concat = table.concat
local table_sort = table.sort
local math_random = math.random
local math_tointeger = math.tointeger

local M = {}

-- What clients see from the library itself (defined once).
local NO_ROUTE <const> = "SERVER_ERROR no route\r\n"
local BAD_INTROSPECTION <const> = "CLIENT_ERROR bad route introspection request\r\n"
local INTROSPECTION_PREFIX <const> = "__mcproxy__.route("

-- memcached reads an exptime above 30 days as an absolute unix time.
local THIRTY_DAYS <const> = 60 * 60 * 24 * 30

-- A key no client can reach: with every storage command attached to routes,
-- the embedded cache holds only what routes put there with mcp.internal,
-- and nothing here stores this key. null() reads it to get a genuine miss
-- response (see null()).
local NULL_MISS_LINE <const> = "get __mcproxy__.null\r\n"

local CMD_GET <const> = mcp.CMD_GET
local CMD_GETS <const> = mcp.CMD_GETS
local CMD_GAT <const> = mcp.CMD_GAT
local CMD_GATS <const> = mcp.CMD_GATS
local CMD_MG <const> = mcp.CMD_MG
local CMD_MS <const> = mcp.CMD_MS
local CMD_MD <const> = mcp.CMD_MD
local CMD_MA <const> = mcp.CMD_MA
local CMD_ME <const> = mcp.CMD_ME
local CMD_DELETE <const> = mcp.CMD_DELETE

-- Command names, as used in by_command maps and introspection requests.
local COMMANDS <const> = {
    get = CMD_GET, gets = CMD_GETS, gat = CMD_GAT, gats = CMD_GATS,
    set = mcp.CMD_SET, add = mcp.CMD_ADD, cas = mcp.CMD_CAS,
    replace = mcp.CMD_REPLACE, append = mcp.CMD_APPEND,
    prepend = mcp.CMD_PREPEND, incr = mcp.CMD_INCR, decr = mcp.CMD_DECR,
    touch = mcp.CMD_TOUCH, delete = CMD_DELETE,
    mg = CMD_MG, ms = CMD_MS, md = CMD_MD, ma = CMD_MA, me = CMD_ME,
}
local COMMAND_NAMES <const> = {}
for name, id in pairs(COMMANDS) do
    COMMAND_NAMES[id] = name
end

-- Commands that only read; every other storage command writes.
local READS <const> = {
    [CMD_GET] = true, [CMD_GETS] = true, [CMD_GAT] = true, [CMD_GATS] = true,
    [CMD_MG] = true, [CMD_ME] = true,
}

-- Introspection builds a request of the named command for the key: the
-- line (%s is the key) and, for storage commands, an empty value.
local PROBES <const> = {
    get = { "get %s\r\n" }, gets = { "gets %s\r\n" },
    gat = { "gat 0 %s\r\n" }, gats = { "gats 0 %s\r\n" },
    set = { "set %s 0 0 0\r\n", "\r\n" }, add = { "add %s 0 0 0\r\n", "\r\n" },
    replace = { "replace %s 0 0 0\r\n", "\r\n" },
    append = { "append %s 0 0 0\r\n", "\r\n" },
    prepend = { "prepend %s 0 0 0\r\n", "\r\n" },
    cas = { "cas %s 0 0 0 1\r\n", "\r\n" },
    incr = { "incr %s 1\r\n" }, decr = { "decr %s 1\r\n" },
    touch = { "touch %s 0\r\n" }, delete = { "delete %s\r\n" },
    mg = { "mg %s\r\n" }, ms = { "ms %s 0\r\n", "\r\n" }, md = { "md %s\r\n" },
    ma = { "ma %s\r\n" }, me = { "me %s\r\n" },
}

-- Small helpers ---------------------------------------------------------

-- A pool, as a route sees it, is a callable table (its metatable has
-- __call); a route is a function. Both are called the same way: x(r).
local function is_pool(x)
    if type(x) ~= "table" then
        return false
    end
    local mt = getmetatable(x)
    return type(mt) == "table" and mt.__call ~= nil
end

-- A route may answer with a string, written to the client as is. The
-- routes here cannot look into one, so they take it as a final answer.
local function ok(res)
    return type(res) == "string" or res:ok()
end

local function hit(res)
    return type(res) == "string" or res:hit()
end

-- x as an integer, or nil (math.tointeger would also convert strings).
local function integer(x)
    if type(x) == "number" then
        return math_tointeger(x)
    end
    return nil
end

local function now_seconds()
    return mcp.time_real_millis() // 1000
end

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = k
    end
    table_sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    return keys
end

local function check_options(opts, where)
    if opts == nil then
        return {}
    end
    if type(opts) ~= "table" then
        error(where .. ": options must be a table", 3)
    end
    return opts
end

-- Route metadata for describe() -----------------------------------------

-- route function -> { name = string or nil, branches = function(r) }.
-- branches(r) lists the children a request would reach, in order, as
-- { label, child } pairs (label may be nil). A route with no name is
-- transparent: its children are described without a path segment.
local info = setmetatable({}, { __mode = "k" })
-- pool -> the name routes.bind/routes.named gave it.
local pool_names = setmetatable({}, { __mode = "k" })

-- Record a route for describe(); with a shape, also declare it to the
-- engine. Every constructor below passes the shape of the function it
-- builds in the same call, made of the same tables of children its body
-- calls, so a declaration cannot say other than what the body does.
-- routes.define records functions written by hand: it declares nothing.
local function register(fn, name, branches, shape)
    info[fn] = { name = name, branches = branches }
    if shape ~= nil then
        declare(fn, shape)
    end
    return fn
end

-- Shapes ----------------------------------------------------------------
--
-- A shape is a table: `kind` (the constructor's name), `children` (the
-- table of children the body calls, pools or routes; filled by bind() when
-- they were given by name) and the constructor's options; a route with
-- children in several roles names the other tables too (background,
-- shadows, cold, warm, default). The engine reads it after
-- mcp_config_routes, once every name is bound:
--   direct      { children = { child } }: the child, unchanged
--   introspect  { children = { child }, command =, prefix = }: the child,
--               but for requests of `command` whose key starts with prefix
--   by_command  { children =, choice = { [command id] = children key } }
--   failover    { children =, miss =, count =, shuffle = }
--   all_sync    { children =, strict = }     broadcast   { children = }
--   all_fastest { children =, miss = }
--   all_async   { children = { first }, background = }
--   split       { children = { primary }, shadows =, fraction = }
--   zfailover   { children = zones, local_zone =, miss = }
--   warmup      { cold = { c }, warm = { w }, ttl =, delete_warm = }
--   prefix_router { children =, default = { child }, stop = }
--   ttl_cap     { children = { child }, seconds = }
--   null, no_route { }

-- Branches over every slot, labelled by slot key (arrays: 1, 2, ...).
local function all_branches(slots)
    return function()
        local out = {}
        local keys = #slots > 0 and nil or sorted_keys(slots)
        for i = 1, keys and #keys or #slots do
            local k = keys and keys[i] or i
            out[i] = { tostring(k), slots[k] }
        end
        return out
    end
end

-- Pool names ------------------------------------------------------------

-- Names still to resolve: { slots, key, name, kind, where }, filled by
-- bind(). `bound` is the table names resolve in, once bind() ran.
local pending = {}
local bound = nil

local UNBOUND <const> = "%s: pool '%s' is not bound (pool names work inside "
    .. "routes.config, or after routes.bind(pools))"

-- A stand-in for a name not yet bound: fails clearly if ever called.
local function unbound(name, where)
    return register(function()
        error(string_format(UNBOUND, where, name), 0)
    end, "unbound(" .. name .. ")", function() return {} end)
end

-- The pool (or table of pools) a name stands for: a key of the bound
-- table, or a dotted path into nested tables ("zones.east"); or nil and
-- an error message.
local function lookup(name, where)
    local v = bound[name]
    if v == nil then
        v = bound
        for part in string_gmatch(name, "[^.]+") do
            if type(v) ~= "table" or is_pool(v) then
                v = nil
                break
            end
            local next_v = v[part]
            if next_v == nil then
                next_v = v[tonumber(part)]
            end
            v = next_v
        end
    end
    if v == nil or v == bound then
        return nil, string_format("%s: no pool named '%s'", where, name)
    end
    return v
end

-- Check a child against what its slot needs: "route" takes a pool or a
-- function, "pool" only a pool (its requests go through mcp.await).
-- Returns the child, or nil and an error message.
local function convert(x, kind, where)
    if is_pool(x) then
        return x
    end
    if type(x) == "function" then
        if kind == "pool" then
            return nil, where .. ": needs pools here (requests sent in parallel go "
                .. "through mcp.await, which takes pools), not a route"
        end
        return x
    end
    if kind == "pool" then
        return nil, where .. ": expected a pool or a pool name, got " .. type(x)
    end
    return nil, where .. ": expected a route, a pool or a pool name, got " .. type(x)
end

-- The helpers below fill a route's slots (the table its children live
-- in). They return an error message or nil, and whether a name was left
-- for bind() to resolve; constructors raise the error with must().
local function must(err, deferred)
    if err then
        error(err, 3) -- at the line that called the constructor
    end
    return deferred
end

-- slots[key] = the child x, or a stand-in until its name is bound.
local function fill(slots, key, x, kind, where)
    if type(x) == "string" then
        if bound == nil then
            slots[key] = unbound(x, where)
            pending[#pending + 1] = { slots, key, x, kind, where }
            return nil, true
        end
        local v, err = lookup(x, where)
        if err then
            return err
        end
        x = v
    end
    local v, err = convert(x, kind, where)
    if err then
        return err
    end
    slots[key] = v
    return nil, false
end

-- Copy a table of pools (a "set") into slots; `ordered` turns it into an
-- array sorted by name (for routes that try children in order).
local function fill_set(slots, set, kind, ordered, where)
    if is_pool(set) then
        slots[1] = set
        return nil
    end
    if type(set) ~= "table" then
        return where .. ": expected a table of pools"
    end
    for i, k in ipairs(sorted_keys(set)) do
        local v, err = convert(set[k], kind, where)
        if err then
            return err
        end
        slots[ordered and i or k] = v
    end
    return nil
end

-- Fill slots from a list argument: a table of children, one pool, or the
-- name of a table of pools. `ordered` routes need an array.
local function fill_list(slots, children, kind, ordered, where)
    if type(children) == "string" then
        if bound == nil then
            pending[#pending + 1] = { slots, nil, children, kind, where, ordered }
            return nil, true
        end
        local set, err = lookup(children, where)
        if err then
            return err
        end
        return fill_set(slots, set, kind, ordered, where), false
    end
    if is_pool(children) or type(children) == "function" then
        local v, err = convert(children, kind, where)
        slots[1] = v
        return err, false
    end
    if type(children) ~= "table" then
        return where .. ": expected a table of children, a pool or a pool name"
    end
    if ordered and #children == 0 then
        return where .. ": expected a list of children"
    end
    local deferred = false
    for k, v in pairs(children) do
        local err, later = fill(slots, k, v, kind, where)
        if err then
            return err
        end
        deferred = deferred or later
    end
    return nil, deferred
end

-- Routes that send through mcp.await call this first: a name that was
-- never bound would otherwise surface as mcp.await's "must be supplied
-- with a pool".
local function check_bound(where)
    if pending[1] then
        local name = pending[1][3]
        for _, p in ipairs(pending) do
            if p[5] == where then
                name = p[3]
                break
            end
        end
        error(string_format(UNBOUND, where, name), 0)
    end
end

-- Checks that can only run once names are bound (zfailover's local zone).
local after_bind = {}

-- Give every pool in a (nested) table the name of its key path, for
-- describe(). Returns the table.
local function name_pools(t, prefix)
    if is_pool(t) then
        pool_names[t] = prefix ~= "" and prefix or "pool"
        return t
    end
    for k, v in pairs(t) do
        if is_pool(v) then
            pool_names[v] = prefix .. tostring(k)
        elseif type(v) == "table" then
            name_pools(v, prefix .. tostring(k) .. ".")
        end
    end
    return t
end

--- routes.named(pools): name every pool in the table (nested tables give
--- dotted names) for routes.describe and introspection. Returns pools.
function M.named(pools)
    if type(pools) ~= "table" then
        error("routes.named: expected a table of pools", 2)
    end
    return name_pools(pools, "")
end

--- routes.bind(pools): resolve every pool name used so far (and from now
--- on) against this table, and name its pools. routes.config calls it.
function M.bind(pools)
    if type(pools) ~= "table" then
        error("routes.bind: expected a table of pools", 2)
    end
    name_pools(pools, "")
    bound = pools
    local list = pending
    pending = {}
    for _, p in ipairs(list) do
        local slots, key, name, kind, where, ordered = p[1], p[2], p[3], p[4], p[5], p[6]
        local v, err = lookup(name, where)
        if v ~= nil then
            if key == nil then
                err = fill_set(slots, v, kind, ordered, where)
            else
                v, err = convert(v, kind, where)
                slots[key] = v
            end
        end
        if err then
            error(err, 0)
        end
    end
    local checks = after_bind
    after_bind = {}
    for _, check in ipairs(checks) do
        check()
    end
    return pools
end

-- Describing routes -------------------------------------------------------

local MAX_DEPTH <const> = 32

local function describe_into(x, r, path, out, depth)
    if depth > MAX_DEPTH then
        out[#out + 1] = path .. "..."
        return
    end
    if is_pool(x) then
        out[#out + 1] = path .. (pool_names[x] or "pool") .. " > "
            .. mcp.pool_backend(x, r:key())
        return
    end
    local meta = info[x]
    if meta == nil then
        out[#out + 1] = path .. "route" -- written by hand, not described
        return
    end
    local branches = meta.branches(r)
    if #branches == 0 then
        out[#out + 1] = path .. (meta.name or "route")
        return
    end
    for _, b in ipairs(branches) do
        local label, child = b[1], b[2]
        local next_path = path
        if meta.name then
            next_path = path .. meta.name .. (label and "[" .. label .. "]" or "") .. " > "
        end
        describe_into(child, r, next_path, out, depth + 1)
    end
end

--- routes.describe(route, r) -> list of strings: one line per backend
--- that `r` would reach through `route` (in the order the route tries
--- them), each the path of routes taken and the pool's backend label,
--- e.g. "failover[2] > gutter > gutter1". Sends nothing.
function M.describe(route, r)
    local out = {}
    describe_into(route, r, "", out, 0)
    return out
end

--- routes.define(fn, name [, children]): record a hand-written route, so
--- that describe and introspection show it and its children (a table of
--- pools and routes) instead of an opaque "route". Returns fn.
function M.define(fn, name, children)
    if type(fn) ~= "function" then
        error("routes.define: expected a route function", 2)
    end
    if type(name) ~= "string" then
        error("routes.define: expected a name", 2)
    end
    local slots = {}
    if children ~= nil then
        must(fill_list(slots, children, "route", false, "routes.define"))
    end
    return register(fn, name, all_branches(slots))
end

-- The routes ------------------------------------------------------------

--- routes.as_route(x): a pool or a route as a route function.
function M.as_route(x)
    local slots = {}
    must(fill(slots, 1, x, "route", "routes.as_route"))
    return register(function(r)
        return slots[1](r)
    end, nil, all_branches(slots), { kind = "direct", children = slots })
end

--- routes.direct(pool): send every request to the pool.
function M.direct(pool)
    local slots = {}
    must(fill(slots, 1, pool, "route", "routes.direct"))
    return register(function(r)
        return slots[1](r)
    end, "direct", function() return { { nil, slots[1] } } end,
        { kind = "direct", children = slots })
end

-- Fisher-Yates over a copy: a fresh order per request.
local function shuffled(list)
    local out = {}
    for i = 1, #list do
        local j = math_random(i)
        out[i] = out[j]
        out[j] = list[i]
    end
    return out
end

--- routes.failover(children, { miss=, count=, shuffle= }): try the
--- children one after the other until one answers; with miss = true a
--- miss also moves on. count limits the tries; shuffle tries them in a
--- random order per request. Answers with the first good answer, else the
--- best one seen (a miss beats a failure), else the last failure.
function M.failover(children, opts)
    opts = check_options(opts, "routes.failover")
    local miss = opts.miss == true
    local count = opts.count
    if count ~= nil and (integer(count) == nil or count < 1) then
        error("routes.failover: count must be a positive integer", 2)
    end
    local shuffle = opts.shuffle == true
    local slots = {}
    must(fill_list(slots, children, "route", true, "routes.failover"))

    local function tries()
        local n = #slots
        if count and count < n then
            n = count
        end
        return n
    end

    return register(function(r)
        if slots[1] == nil then
            check_bound("routes.failover") -- given the name of unbound pools
        end
        local order = shuffle and shuffled(slots) or slots
        local best
        for i = 1, tries() do
            local res = order[i](r)
            if hit(res) or (not miss and ok(res)) then
                return res
            end
            if best == nil or ok(res) or not ok(best) then
                best = res
            end
        end
        return best
    end, shuffle and "failover(shuffled)" or "failover", function()
        local out = {}
        for i = 1, tries() do
            out[i] = { tostring(i), slots[i] }
        end
        return out
    end, { kind = "failover", children = slots, miss = miss, count = count, shuffle = shuffle })
end

-- The first hit, else the first ok answer, else the first answer, of
-- a list of responses (mcp.await's results, in arrival order).
local function best_of(results)
    local first_ok
    for _, res in ipairs(results) do
        if res:hit() then
            return res
        end
        if first_ok == nil and res:ok() then
            first_ok = res
        end
    end
    return first_ok or results[1]
end

-- cas through replication -------------------------------------------------
--
-- Each replica hands out cas uniques of its own, so a `gets` answered by
-- one replica and a `cas` checked on all of them succeeds on some and fails
-- on others. The replicated routes therefore send what reads or compares a
-- cas unique (gets, gats, mg with c; cas, and ms/md/ma with C) to one
-- replica, the primary: the first pool of a list, or of a table of named
-- pools the first name. A compare-and-swap that succeeded there is copied
-- to the other replicas as a plain write of the same value (cas becomes
-- set; the C flag is dropped), so they hold what the primary holds.

local CAS_READS <const> = { [CMD_GETS] = true, [CMD_GATS] = true }
local CAS_META_WRITES <const> = { [CMD_MS] = true, [CMD_MD] = true, [CMD_MA] = true }

-- "read", "write" or nil: how r depends on one replica's cas unique.
local function cas_use(r)
    local cmd = r:command()
    if CAS_READS[cmd] or (cmd == CMD_MG and r:has_flag("c")) then
        return "read"
    end
    if cmd == mcp.CMD_CAS or (CAS_META_WRITES[cmd] and r:has_flag("C")) then
        return "write"
    end
    return nil
end

-- The primary of a set of pool slots, and a table of the others.
local function primary_and_rest(slots)
    local first = slots[1] ~= nil and 1 or sorted_keys(slots)[1]
    local rest, n = {}, 0
    for k, pool in pairs(slots) do
        if k ~= first then
            n = n + 1
            rest[n] = pool
        end
    end
    return slots[first], rest, n
end

-- The plain write that copies r (a cas write that succeeded) to a replica.
local function cas_copy(r)
    if r:command() == mcp.CMD_CAS then
        return mcp.request(string_format("set %s %s %s %s\r\n", r:key(), r:token(3),
            r:token(4), r:token(5)), r)
    end
    local tokens = {}
    local first_flag = r:command() == CMD_MS and 4 or 3
    for i = 1, r:ntokens() do
        local token = r:token(i)
        if i < first_flag or string_sub(token, 1, 1) ~= "C" then
            tokens[#tokens + 1] = token
        end
    end
    local line = table_concat(tokens, " ") .. "\r\n"
    return r:command() == CMD_MS and mcp.request(line, r) or mcp.request(line)
end

-- Serve r at the primary if it uses a cas unique: the answer, or nil when
-- the route goes on as usual. A successful cas write is copied to the
-- other replicas, waited for when `wait` (a failure there is then the
-- answer when `strict`), else in the background.
local function cas_at_primary(r, slots, wait, strict)
    local use = cas_use(r)
    if use == nil then
        return nil
    end
    local primary, rest, n = primary_and_rest(slots)
    local res = primary(r)
    if use == "read" or n == 0 or not res:ok() then
        return res
    end
    local code = res:code()
    if code ~= mcp.MCMC_CODE_STORED and code ~= mcp.MCMC_CODE_OK then
        return res  -- EXISTS, NOT_FOUND: nothing changed at the primary
    end
    local copy = cas_copy(r)
    if not wait then
        mcp.await(copy, rest, 0, mcp.AWAIT_BACKGROUND)
        return res
    end
    for _, other in ipairs(mcp.await(copy, rest, 0, mcp.AWAIT_ANY)) do
        if strict and not other:ok() then
            return other
        end
    end
    return res
end

--- routes.all_sync(pools, { strict= }): send to every pool at once, wait
--- for all. Answers with the first hit, else the first ok answer (in
--- arrival order); with strict = true any failure is the answer instead,
--- as mcrouter's AllSyncRoute does.
function M.all_sync(pools, opts)
    opts = check_options(opts, "routes.all_sync")
    local strict = opts.strict == true
    local slots = {}
    must(fill_list(slots, pools, "pool", false, "routes.all_sync"))
    return register(function(r)
        check_bound("routes.all_sync")
        local answer = cas_at_primary(r, slots, true, strict)
        if answer ~= nil then
            return answer
        end
        local results = mcp.await(r, slots, 0, mcp.AWAIT_ANY)
        if strict then
            for _, res in ipairs(results) do
                if not res:ok() then
                    return res
                end
            end
        end
        return best_of(results)
    end, "all_sync", all_branches(slots), { kind = "all_sync", children = slots, strict = strict })
end

--- routes.broadcast(pools): for flush_all (and verbosity), which address
--- whole servers: the request goes to every backend of the pools, once to
--- a backend in several of them, and the answer is OK only if every
--- backend said OK, else "SERVER_ERROR <n> of <m> backends failed to
--- flush". Attach it by name: mcp.attach(mcp.CMD_FLUSH_ALL,
--- routes.broadcast{ "main", "gutter" }). Any other command goes to its
--- key's backend in every pool; the answer is the first failure, else the
--- first answer.
function M.broadcast(pools)
    local slots = {}
    must(fill_list(slots, pools, "pool", false, "routes.broadcast"))
    return register(function(r)
        check_bound("routes.broadcast")
        -- A broadcast command comes back as one response for all pools.
        local results = mcp.await(r, slots, 0, mcp.AWAIT_ANY)
        for _, res in ipairs(results) do
            if not res:ok() then
                return res
            end
        end
        return results[1]
    end, "broadcast", all_branches(slots), { kind = "broadcast", children = slots })
end

--- routes.all_fastest(pools, { miss= }): send to every pool at once and
--- answer with the first ok answer; with miss = true, the first hit (a
--- miss is answered only once every pool has answered).
function M.all_fastest(pools, opts)
    opts = check_options(opts, "routes.all_fastest")
    local miss = opts.miss == true
    local slots = {}
    must(fill_list(slots, pools, "pool", false, "routes.all_fastest"))
    return register(function(r)
        check_bound("routes.all_fastest")
        local answer = cas_at_primary(r, slots, false, false)
        if answer ~= nil then
            return answer
        end
        local results
        if miss then
            local n = 0
            for _ in pairs(slots) do
                n = n + 1
            end
            results = mcp.await(r, slots, n, mcp.AWAIT_FASTGOOD)
        else
            results = mcp.await(r, slots, 1, mcp.AWAIT_OK)
        end
        return best_of(results)
    end, "all_fastest", all_branches(slots),
        { kind = "all_fastest", children = slots, miss = miss })
end

--- routes.all_async(children): answer from the first child (a pool or a
--- route); the others (pools) get the request in the background and their
--- answers are ignored.
function M.all_async(children)
    if type(children) ~= "table" or is_pool(children) or #children < 1 then
        error("routes.all_async: expected a list of at least one child", 2)
    end
    local first = {}
    must(fill(first, 1, children[1], "route", "routes.all_async"))
    local rest = {}
    for i = 2, #children do
        must(fill(rest, i - 1, children[i], "pool", "routes.all_async"))
    end
    return register(function(r)
        if rest[1] == nil then
            return first[1](r)
        end
        check_bound("routes.all_async")
        if cas_use(r) ~= "write" then
            mcp.await(r, rest, 0, mcp.AWAIT_BACKGROUND)
            return first[1](r)
        end
        -- The first child decides a cas; the others get its outcome.
        local res = first[1](r)
        if type(res) ~= "string" and res:ok() and (res:code() == mcp.MCMC_CODE_STORED
                or res:code() == mcp.MCMC_CODE_OK) then
            mcp.await(cas_copy(r), rest, 0, mcp.AWAIT_BACKGROUND)
        end
        return res
    end, "all_async", function()
        local out = { { "1", first[1] } }
        for i = 1, #rest do
            out[i + 1] = { "background", rest[i] }
        end
        return out
    end, { kind = "all_async", children = first, background = rest })
end

-- A key's place in [0, 1), the same every time, so that a key is always
-- shadowed or never: FNV-1a, then murmur3's finalizer (FNV-1a alone puts
-- keys that differ in their last bytes, "key1", "key2" ..., close together).
local function key_fraction(key)
    local h = 2166136261
    for i = 1, #key do
        h = ((h ~ string_byte(key, i)) * 16777619) & 0xffffffff
    end
    h = h ~ (h >> 16)
    h = (h * 0x85ebca6b) & 0xffffffff
    h = h ~ (h >> 13)
    h = (h * 0xc2b2ae35) & 0xffffffff
    h = h ~ (h >> 16)
    return h / 4294967296.0
end

--- routes.split(primary, shadow, { fraction= }): answer from primary (a
--- pool or route); send the same request to shadow (a pool or a list of
--- pools) in the background and ignore its answers. fraction (0 to 1)
--- shadows only that share of keys, always the same keys.
function M.split(primary, shadow, opts)
    opts = check_options(opts, "routes.split")
    local fraction = opts.fraction
    if fraction ~= nil and (type(fraction) ~= "number" or fraction < 0 or fraction > 1) then
        error("routes.split: fraction must be a number from 0 to 1", 2)
    end
    local main = {}
    must(fill(main, 1, primary, "route", "routes.split"))
    local shadows = {}
    must(fill_list(shadows, shadow, "pool", false, "routes.split"))
    local function shadowed(key)
        return fraction == nil or key_fraction(key) < fraction
    end
    return register(function(r)
        if shadowed(r:key()) then
            check_bound("routes.split")
            mcp.await(r, shadows, 0, mcp.AWAIT_BACKGROUND)
        end
        return main[1](r)
    end, "split", function(r)
        local out = { { "primary", main[1] } }
        if shadowed(r:key()) then
            for _, k in ipairs(sorted_keys(shadows)) do
                out[#out + 1] = { "shadow", shadows[k] }
            end
        end
        return out
    end, { kind = "split", children = main, shadows = shadows, fraction = fraction })
end

--- routes.zfailover(zones, local_zone, { miss= }): zones is a table of
--- pools keyed by zone name (or the name of one). The local zone is tried
--- first; if it fails (or misses: miss defaults to true) every other zone
--- gets the request at once. Answers with the first hit, else an ok
--- answer (the local one first), else a failure.
function M.zfailover(zones, local_zone, opts)
    opts = check_options(opts, "routes.zfailover")
    if type(local_zone) ~= "string" then
        error("routes.zfailover: local_zone must be a zone name", 2)
    end
    local miss = opts.miss ~= false
    local slots = {}
    local deferred = must(fill_list(slots, zones, "pool", false, "routes.zfailover"))

    -- Split into near and far once the zones are known (at once, or when
    -- the names are bound).
    local near, far
    local function prepare()
        near = slots[local_zone]
        if near == nil then
            error("routes.zfailover: no zone named '" .. local_zone .. "'", 0)
        end
        far = {}
        for _, k in ipairs(sorted_keys(slots)) do
            if k ~= local_zone then
                far[#far + 1] = slots[k]
            end
        end
    end
    if deferred then
        after_bind[#after_bind + 1] = prepare
    elseif slots[local_zone] == nil then
        error("routes.zfailover: no zone named '" .. local_zone .. "'", 2)
    else
        prepare()
    end

    return register(function(r)
        check_bound("routes.zfailover")
        local res = near(r)
        if res:hit() or (not miss and res:ok()) or far[1] == nil then
            return res
        end
        local results
        if miss then
            results = mcp.await(r, far, #far, mcp.AWAIT_FASTGOOD)
        else
            results = mcp.await(r, far, 1, mcp.AWAIT_OK)
        end
        local best = best_of(results)
        -- a hit anywhere; else the local answer if it was one (a miss);
        -- else whatever the others said
        if best:hit() or not res:ok() then
            return best
        end
        return res
    end, "zfailover", function()
        local out = { { "local:" .. local_zone, slots[local_zone] } }
        for _, k in ipairs(sorted_keys(slots)) do
            if k ~= local_zone then
                out[#out + 1] = { tostring(k), slots[k] }
            end
        end
        return out
    end, { kind = "zfailover", children = slots, local_zone = local_zone, miss = miss })
end

-- Parse a meta reply's flags ("f30 t-1 s5") into a table: letter -> value.
local function meta_flags(line)
    local flags = {}
    if line then
        for token in string_gmatch(line, "%S+") do
            flags[string_sub(token, 1, 1)] = string_sub(token, 2)
        end
    end
    return flags
end

--- routes.warmup(cold, warm, { ttl=, delete_warm= }): a new (cold) pool
--- filled from an old (warm) one, as mcrouter's WarmUpRoute.
---   get, gets, mg: read cold; on a miss, read the key from warm with
---     `mg <key> f t v` and, on a hit, write it into cold with `add` (so a
---     value set meanwhile is never overwritten), keeping its client flags
---     and remaining TTL (or `ttl` if given), then answer by reading cold
---     again, so a gets' cas value and every mg flag are cold's. If cold
---     fails, warm answers. mg with base64 keys (b flag) only reads cold.
---   delete, md: cold answers; warm gets them too (in the background when
---     it is a pool) unless delete_warm = false, so a deleted value
---     cannot come back from warm.
---   everything else: cold only.
function M.warmup(cold, warm, opts)
    opts = check_options(opts, "routes.warmup")
    local ttl = opts.ttl
    if ttl ~= nil and (integer(ttl) == nil or ttl < 0) then
        error("routes.warmup: ttl must be an integer >= 0", 2)
    end
    local delete_warm = opts.delete_warm ~= false
    local c, w = {}, {}
    must(fill(c, 1, cold, "route", "routes.warmup"))
    must(fill(w, 1, warm, "route", "routes.warmup"))

    -- The exptime for the write-back: `ttl`, else what warm has left (t
    -- flag: seconds, -1 for never); beyond 30 days it must be absolute.
    local function exptime(left)
        if ttl then
            return ttl
        end
        left = integer(tonumber(left))
        if left == nil or left < 0 then
            return 0
        end
        if left < 1 then
            return 1
        end
        if left > THIRTY_DAYS then
            return now_seconds() + left
        end
        return left
    end

    local function read(r)
        local res = c[1](r)
        if hit(res) then
            return res
        end
        if not res:ok() then
            return w[1](r)
        end
        local key = r:key()
        local wres = w[1](mcp.request("mg " .. key .. " f t v\r\n"))
        if type(wres) == "string" or not wres:hit() then
            return res
        end
        local flags = meta_flags(wres:line())
        c[1](mcp.request(string_format("add %s %s %d %d\r\n", key, flags.f or "0",
                                       exptime(flags.t), wres:vlen()), wres))
        local again = c[1](r)
        if hit(again) then
            return again
        end
        return w[1](r)
    end

    return register(function(r)
        local cmd = r:command()
        if cmd == CMD_GET or cmd == CMD_GETS or (cmd == CMD_MG and not r:has_flag("b")) then
            return read(r)
        end
        if delete_warm and (cmd == CMD_DELETE or cmd == CMD_MD) then
            local wp = w[1]
            if is_pool(wp) then
                mcp.await(r, { wp }, 0, mcp.AWAIT_BACKGROUND)
            else
                wp(r)
            end
        end
        return c[1](r)
    end, "warmup", function(r)
        local cmd = r:command()
        local out = { { "cold", c[1] } }
        if cmd == CMD_GET or cmd == CMD_GETS or cmd == CMD_MG
                or (delete_warm and (cmd == CMD_DELETE or cmd == CMD_MD)) then
            out[2] = { "warm", w[1] }
        end
        return out
    end, { kind = "warmup", cold = c, warm = w, ttl = ttl, delete_warm = delete_warm })
end

local function no_route()
    return NO_ROUTE
end
register(no_route, "no_route", function() return {} end, { kind = "no_route" })

-- A prefix map's or command map's value: a route, a pool, a pool name,
-- or a plain table, taken as a command map.
local function fill_branch(slots, key, x, where)
    if type(x) == "table" and not is_pool(x) then
        x = M.by_command(x)
    end
    return fill(slots, key, x, "route", where)
end

--- routes.by_command(map): route by command. Keys: mcp.CMD_* ids or
--- command names ("get", "set", "mg" ...), "reads" (get, gets, gat, gats,
--- mg, me), "writes" (every other storage command) and "default". The most
--- specific key wins; a command with no entry answers
--- "SERVER_ERROR no route".
function M.by_command(map)
    if type(map) ~= "table" then
        error("routes.by_command: expected a table", 2)
    end
    local slots, labels = {}, {}
    -- command id -> slot key, with the most specific entry winning
    local choice = {}
    local default
    for k, v in pairs(map) do
        local id = k
        if type(k) == "string" and COMMANDS[k] then
            id = COMMANDS[k]
        end
        if type(id) == "number" and COMMAND_NAMES[id] then
            must(fill_branch(slots, id, v, "routes.by_command"))
            labels[id] = COMMAND_NAMES[id]
        elseif k == "reads" or k == "writes" or k == "default" then
            must(fill_branch(slots, k, v, "routes.by_command"))
            labels[k] = k
        else
            error("routes.by_command: unknown command '" .. tostring(k) .. "'", 2)
        end
    end
    if slots.default then
        default = "default"
    end
    for id in pairs(COMMAND_NAMES) do
        if slots[id] then
            choice[id] = id
        elseif READS[id] and slots.reads then
            choice[id] = "reads"
        elseif not READS[id] and slots.writes then
            choice[id] = "writes"
        else
            choice[id] = default
        end
    end
    return register(function(r)
        local k = choice[r:command()]
        if k == nil then
            return NO_ROUTE
        end
        return slots[k](r)
    end, "by_command", function(r)
        local k = choice[r:command()]
        if k == nil then
            return { { nil, no_route } }
        end
        return { { labels[k], slots[k] } }
    end, { kind = "by_command", children = slots, choice = choice })
end

--- routes.prefix_router{ map=, default=, stop= }: route by key prefix.
--- With stop (e.g. "/"), the prefix is the key up to the first stop
--- string ("tenant1/x" -> "tenant1"); without, the longest key of map the
--- key starts with. Map values are routes, pools, pool names, or command
--- maps (tables, as by_command). Keys matching nothing go to default, or
--- answer "SERVER_ERROR no route".
function M.prefix_router(opts)
    if type(opts) ~= "table" or type(opts.map) ~= "table" then
        error("routes.prefix_router: expected { map = { prefix = route, ... } }", 2)
    end
    local stop = opts.stop
    if stop ~= nil and (type(stop) ~= "string" or stop == "") then
        error("routes.prefix_router: stop must be a non-empty string", 2)
    end
    local slots = {}
    local longest = 0
    for prefix, child in pairs(opts.map) do
        if type(prefix) ~= "string" then
            error("routes.prefix_router: map keys must be strings", 2)
        end
        must(fill_branch(slots, prefix, child, "routes.prefix_router"))
        if #prefix > longest then
            longest = #prefix
        end
    end
    local fallback = { no_route }
    if opts.default ~= nil then
        must(fill_branch(fallback, 1, opts.default, "routes.prefix_router"))
    end

    -- The map key for a key, or nil.
    local function prefix_of(key)
        if stop then
            local at = string_find(key, stop, 1, true)
            if at then
                local prefix = string_sub(key, 1, at - 1)
                if slots[prefix] then
                    return prefix
                end
            end
            return nil
        end
        for n = (#key < longest and #key or longest), 1, -1 do
            local prefix = string_sub(key, 1, n)
            if slots[prefix] then
                return prefix
            end
        end
        return nil
    end

    return register(function(r)
        local prefix = prefix_of(r:key())
        if prefix then
            return slots[prefix](r)
        end
        return fallback[1](r)
    end, "prefix_router", function(r)
        local prefix = prefix_of(r:key())
        if prefix then
            return { { prefix, slots[prefix] } }
        end
        return { { "default", fallback[1] } }
    end, { kind = "prefix_router", children = slots, default = fallback, stop = stop })
end

-- The exptime token of each text command that has one.
local TEXT_EXPTIME <const> = {
    [mcp.CMD_SET] = 4, [mcp.CMD_ADD] = 4, [mcp.CMD_REPLACE] = 4, [mcp.CMD_CAS] = 4,
    [mcp.CMD_TOUCH] = 3, [CMD_GAT] = 2, [CMD_GATS] = 2,
}

--- routes.ttl_cap(route, seconds): no item lives longer than `seconds`
--- (1 to 30 days): the exptime of set, add, replace, cas, touch, gat and
--- gats, and the T and N flags of ms, mg, ma and md, are lowered to it when
--- they ask for more, 0 (never expire) included; an ms without T gets one.
--- Exptimes above 30 days are absolute unix times and are compared with
--- the clock. append and prepend keep the item's exptime (memcached ignores
--- theirs) and pass unchanged.
function M.ttl_cap(route, seconds)
    if integer(seconds) == nil or seconds < 1 or seconds > THIRTY_DAYS then
        error("routes.ttl_cap: seconds must be an integer from 1 to " .. THIRTY_DAYS, 2)
    end
    seconds = integer(seconds)
    local cap = tostring(seconds)
    local slots = {}
    must(fill(slots, 1, route, "route", "routes.ttl_cap"))

    -- The capped exptime for a token, or nil to leave it as it is.
    local function capped(token)
        local t = integer(tonumber(token))
        if t == nil or t < 0 then
            return nil -- not a number (the server will say so) or expired
        end
        if t == 0 then
            return cap
        end
        if t > THIRTY_DAYS then
            t = t - now_seconds()
            if t <= 0 then
                return nil -- an absolute time in the past: expires anyway
            end
        end
        if t > seconds then
            return cap
        end
        return nil
    end

    local function cap_flag(r, letter)
        local found, value = r:flag_token(letter)
        if found and value then
            local new = capped(value)
            if new then
                r:flag_token(letter, letter .. new)
            end
        end
        return found
    end

    return register(function(r)
        local cmd = r:command()
        local i = TEXT_EXPTIME[cmd]
        if i then
            local new = capped(r:token(i))
            if new then
                r:token(i, new)
            end
        elseif cmd == CMD_MS or cmd == CMD_MG or cmd == CMD_MA or cmd == CMD_MD then
            local has_t = cap_flag(r, "T")
            cap_flag(r, "N")
            if cmd == CMD_MS and not has_t then
                -- no T: never expires. Append the flag to the last token;
                -- r:token re-renders the line, so it becomes a token.
                local n = r:ntokens()
                r:token(n, r:token(n) .. " T" .. cap)
            end
        end
        return slots[1](r)
    end, "ttl_cap", function() return { { cap, slots[1] } } end,
        { kind = "ttl_cap", children = slots, seconds = seconds })
end

-- What null() answers for commands that cannot be answered with a miss.
local NULL_TEXT <const> = {
    [mcp.CMD_SET] = "STORED\r\n", [mcp.CMD_ADD] = "STORED\r\n",
    [mcp.CMD_REPLACE] = "STORED\r\n", [mcp.CMD_APPEND] = "STORED\r\n",
    [mcp.CMD_PREPEND] = "STORED\r\n", [mcp.CMD_CAS] = "STORED\r\n",
}
local NULL_META <const> = {
    [CMD_MG] = "EN", [CMD_MS] = "HD", [CMD_MD] = "NF", [CMD_MA] = "NF", [CMD_ME] = "EN",
}

--- routes.null(): answer without a backend: reads miss, storage commands
--- succeed (STORED / HD), everything else finds nothing (NOT_FOUND / NF).
--- noreply and meta q are honoured; meta replies carry O and k as
--- memcached's do.
function M.null()
    local miss_request
    return register(function(r)
        local cmd = r:command()
        if cmd == CMD_GET or cmd == CMD_GETS or cmd == CMD_GAT or cmd == CMD_GATS then
            -- A miss must be a real response: inside a multi-key get the
            -- proxy writes a miss as nothing (and one END for all keys);
            -- a string would be written as is. The embedded cache gives
            -- one for a key that is never stored (NULL_MISS_LINE). Without
            -- an embedded cache (mcproxy embedded in an application that
            -- gave none) fall back to the string.
            miss_request = miss_request or mcp.request(NULL_MISS_LINE)
            local res = mcp.internal(miss_request)
            if res:ok() and not res:hit() then
                return res
            end
            return "END\r\n"
        end
        local status = NULL_META[cmd]
        if status then
            if r:has_flag("q") and (status == "EN" or status == "HD") then
                return ""
            end
            local out = { status }
            local found, opaque = r:flag_token("O")
            if found then
                out[#out + 1] = "O" .. (opaque or "")
            end
            if r:has_flag("k") then
                out[#out + 1] = "k" .. r:key()
                if r:has_flag("b") then
                    out[#out + 1] = "b"
                end
            end
            return table_concat(out, " ") .. "\r\n"
        end
        if r:token(r:ntokens()) == "noreply" then
            return ""
        end
        return NULL_TEXT[cmd] or "NOT_FOUND\r\n"
    end, "null", function() return {} end, { kind = "null" })
end

-- Introspection -----------------------------------------------------------

-- The answer to `get __mcproxy__.route(<command>,<key>)` about `route`.
local function introspection(route, key)
    local command, target = string_match(key, "^__mcproxy__%.route%((%a+),(.+)%)$")
    local probe = command and PROBES[command]
    if probe == nil then
        return BAD_INTROSPECTION
    end
    local made, r = pcall(mcp.request, string_format(probe[1], target), probe[2])
    if not made then
        return BAD_INTROSPECTION
    end
    local text = table_concat(M.describe(route, r), "\r\n")
    return "VALUE " .. key .. " 0 " .. #text .. "\r\n" .. text .. "\r\nEND\r\n"
end

--- routes.introspect(route): the route, plus an answer to
--- `get __mcproxy__.route(<command>,<key>)`: a value listing, one per line,
--- where `route` would send <command> for <key> (see routes.describe).
--- Attach the result as the top route. Ask for one such key per get.
function M.introspect(route)
    local slots = {}
    must(fill(slots, 1, route, "route", "routes.introspect"))
    return register(function(r)
        if r:command() == CMD_GET
                and string_find(r:key(), INTROSPECTION_PREFIX, 1, true) == 1 then
            return introspection(slots[1], r:key())
        end
        return slots[1](r)
    end, nil, function() return { { nil, slots[1] } } end,
        { kind = "introspect", children = slots, command = CMD_GET, prefix = INTROSPECTION_PREFIX })
end

-- The declarative form ----------------------------------------------------

-- A backend of a pool description: "host:port" (labelled "host:port") or
-- a table for mcp.backend{}; `defaults` fills options the entry lacks.
local function make_backend(entry, defaults)
    local t = {}
    if type(entry) == "string" then
        local host, port = string_match(entry, "^(.+):(%d+)$")
        if host == nil then
            error("routes.config: backend '" .. entry .. "' is not host:port", 0)
        end
        t.label, t.host, t.port = entry, host, port
    elseif type(entry) == "table" then
        for k, v in pairs(entry) do
            t[k] = v
        end
        if type(t.host) ~= "string" then
            error("routes.config: a backend table needs a host", 0)
        end
        t.port = t.port or "11211"
        t.label = t.label or (t.host .. ":" .. tostring(t.port))
    else
        error("routes.config: a backend is \"host:port\" or a table", 0)
    end
    for k, v in pairs(defaults or {}) do
        if t[k] == nil then
            t[k] = v
        end
    end
    return mcp.backend(t)
end

-- Pools from their description: { backends = {...}, options = {...},
-- backend_options = {...} } makes a pool; any other table is a set of
-- descriptions (e.g. one pool per zone), built recursively.
local function make_pools(spec, path)
    if type(spec) ~= "table" then
        error("routes.config: pool '" .. path .. "' must be a table", 0)
    end
    if spec.backends ~= nil then
        local list = {}
        for i, entry in ipairs(spec.backends) do
            list[i] = make_backend(entry, spec.backend_options)
        end
        return mcp.pool(list, spec.options)
    end
    local out = {}
    for name, sub in pairs(spec) do
        out[name] = make_pools(sub, path == "" and tostring(name) or path .. "." .. tostring(name))
    end
    return out
end

-- The top route from the `routes` field of routes.config.
local function make_top(spec, pools)
    if type(spec) == "function" and info[spec] == nil then
        spec = spec(pools) -- a function that builds the routes, now
    end
    if type(spec) == "table" and not is_pool(spec) then
        return M.by_command(spec)
    end
    local slots = {}
    local err = fill(slots, 1, spec, "route", "routes.config")
    if err then
        error(err, 0)
    end
    if is_pool(slots[1]) then
        return M.as_route(slots[1]) -- mcp.attach takes functions only
    end
    return slots[1]
end

-- The mcp tunables routes.config may set.
local TUNABLES <const> = {
    backend_connect_timeout = true, backend_read_timeout = true,
    backend_retry_timeout = true, backend_failure_limit = true,
    tcp_keepalive = true, backend_depth_limit = true, active_req_limit = true,
}

--- routes.config{ pools=, routes=, tunables=, introspect= } -> the two
--- functions a config must define:
---
---     mcp_config_pools, mcp_config_routes = routes.config{ ... }
---
--- pools: name -> { backends = { "host:port" or mcp.backend{} table, ... },
---   options = mcp.pool options, backend_options = defaults for every
---   backend }; a table of such descriptions is a set of pools (zones),
---   reached as "set.name", or as a whole by the set's name.
--- routes: a route (constructors may name pools by string), a pool name,
---   a command map (as by_command), or a function(pools) returning one of
---   these, run in the routes phase.
--- tunables: name -> value, e.g. { backend_read_timeout = 0.5 }.
--- introspect: answer `get __mcproxy__.route(...)` (default true).
---
--- The file runs once in each phase's Lua state, so this table is built in
--- both: mcp_config_pools makes the pools from its data; only those cross
--- to the routes phase, where mcp_config_routes binds the names and builds
--- the routes. Everything in it must therefore come out the same in both
--- runs (plain data, os.getenv ...).
function M.config(spec)
    if type(spec) ~= "table" then
        error("routes.config: expected a table", 2)
    end
    if type(spec.pools) ~= "table" then
        error("routes.config: 'pools' must be a table of pool descriptions", 2)
    end
    if spec.routes == nil then
        error("routes.config: 'routes' is missing", 2)
    end
    if spec.tunables ~= nil and type(spec.tunables) ~= "table" then
        error("routes.config: 'tunables' must be a table", 2)
    end

    local function config_pools()
        for name, value in pairs(spec.tunables or {}) do
            if not TUNABLES[name] then
                error("routes.config: unknown tunable '" .. tostring(name) .. "'", 0)
            end
            mcp[name](value)
        end
        return make_pools(spec.pools, "")
    end

    local function config_routes(pools)
        M.bind(pools)
        local top = make_top(spec.routes, pools)
        if spec.introspect ~= false then
            top = M.introspect(top)
        end
        mcp.attach(mcp.CMD_ANY_STORAGE, top)
    end

    return config_pools, config_routes
end

return M
