-- The route library: memcached's declarative route configs
-- (`-o proxy_config=routelib,proxy_arg=FILE`), run as `--config=routelib
-- --config-arg=FILE`. mcproxy's own implementation of that contract.
--
-- This file is the route config; FILE, named by mcp.start_arg, is read in
-- both phases. It calls pools{}, routes{}, settings{}, local_zone() and
-- builds route descriptions with route_*{} and cmdmap{}: plain tables,
-- checked as they are made, so that an unknown name or option fails the load
-- naming it (memcached ignores unknown options; mcproxy refuses them).
-- mcp_config_pools makes the pools; mcp_config_routes turns each route
-- description into a V2 function generator (v2.lua) and attaches them,
-- behind a router when a map or command map is given, each route tree
-- under its listener tag (routes{ tag = "x", ... }). A route_direct
-- attached alone is a funcgen of the shape v2.lua declares direct, so it
-- takes the engine's direct path. The generators of route_direct,
-- route_failover, route_allsync, route_allfastest, route_split and
-- route_zfailover declare their shapes (as routes.lua's constructors do) to
-- the engine's `declare`, handed to this file when it is loaded
-- (engine.py): attached alone or behind a router (whose shape v2.lua
-- declares), they run natively (routing/native/).

-- Who is told what a route is (mcp.lua): only this file gets it.
local declare = ...
if type(declare) ~= "function" then
    error("routelib: run it as --config=routelib", 0)
end

local ROUTE = {}      -- metatable of route descriptions
local CMDMAP = {}     -- metatable of cmdmap{} tables
local POOLSET = {}    -- metatable of poolset{} tables

local function fail(msg)
    error("routelib: " .. msg, 0)
end

-- Refuse any key of `t` that `known` does not list.
local function check_keys(t, known, what)
    for k in pairs(t) do
        if not known[k] then
            fail(what .. ": unknown option '" .. tostring(k) .. "'")
        end
    end
end

local function set_of(...)
    local s = {}
    for _, k in ipairs({ ... }) do s[k] = true end
    return s
end

-- What one read of FILE declared.
local conf

local function new_conf()
    -- routes: the route trees, each untagged or with its listener tag
    -- (routes{ tag = ... }), in the order given
    return { pools = {}, pool_order = {}, routes = {}, settings = {},
             zone = nil, verbose = false, debug = false }
end

local function say(...)
    if conf.verbose then print(...) end
end

local function dsay(...)
    if conf.debug then print(...) end
end

-- Route handlers: each has its options and a builder (below).
local HANDLERS = {}

local function handler(name, options, check)
    HANDLERS[name] = { options = options, check = check }
end

local function is_child(v)
    return type(v) == "string" or getmetatable(v) == ROUTE
end

local function need_child(name, opts, key)
    if not is_child(opts[key]) then
        fail(name .. ": '" .. key .. "' must be a pool name or a route")
    end
end

local function need_children(name, opts)
    local c = opts.children
    if type(c) == "string" then
        return -- a pool set, resolved at build
    end
    if type(c) ~= "table" or #c == 0 then
        fail(name .. ": 'children' must be a list of pools or routes, or a pool set name")
    end
    for _, child in ipairs(c) do
        if not is_child(child) then
            fail(name .. ": 'children' must hold pool names or routes")
        end
    end
end

handler("route_direct", set_of("child"), function(n, o) need_child(n, o, "child") end)
handler("route_allsync", set_of("children"), need_children)
handler("route_allfastest", set_of("children"), need_children)
handler("route_failover", set_of("children", "failover_count", "shuffle", "miss"),
    function(n, o)
        need_children(n, o)
        if o.failover_count ~= nil and math.type(o.failover_count) ~= "integer" then
            fail(n .. ": 'failover_count' must be an integer")
        end
    end)
handler("route_split", set_of("child_a", "child_b"), function(n, o)
    need_child(n, o, "child_a")
    need_child(n, o, "child_b")
end)
handler("route_ttl", set_of("ttl", "child"), function(n, o)
    need_child(n, o, "child")
    if math.type(o.ttl) ~= "integer" then
        fail(n .. ": 'ttl' must be an integer")
    end
end)
handler("route_zfailover", set_of("children", "local_zone", "miss", "stats", "failover_count"),
    function(n, o)
        if type(o.children) ~= "string" then
            fail(n .. ": 'children' must name a pool set")
        end
        if o.local_zone ~= nil and type(o.local_zone) ~= "string" then
            fail(n .. ": 'local_zone' must be a string")
        end
    end)
handler("route_null", {}, function() end)

-- The names FILE sees, beyond the globals.
local function environment()
    local env = {}
    for name, h in pairs(HANDLERS) do
        env[name] = function(opts)
            if opts == nil then opts = {} end
            if type(opts) ~= "table" then
                fail(name .. " takes a table of options")
            end
            check_keys(opts, h.options, name)
            h.check(name, opts)
            return setmetatable({ kind = name, opts = opts }, ROUTE)
        end
    end

    function env.cmdmap(t)
        if type(t) ~= "table" then fail("cmdmap takes a table") end
        for cmd, route in pairs(t) do
            if math.type(cmd) ~= "integer" then
                fail("cmdmap: keys must be mcp.CMD_* commands")
            end
            if getmetatable(route) ~= ROUTE then
                fail("cmdmap: command " .. cmd .. " must map to a route")
            end
        end
        return setmetatable(t, CMDMAP)
    end

    function env.poolset(t)
        if type(t) ~= "table" then fail("poolset takes a table") end
        return setmetatable(t, POOLSET)
    end

    function env.pools(t)
        if type(t) ~= "table" then fail("pools takes a table") end
        for name, pool in pairs(t) do
            if type(name) ~= "string" then fail("pools: names must be strings") end
            if conf.pools[name] ~= nil then fail("pools: pool '" .. name .. "' defined twice") end
            conf.pools[name] = pool
            conf.pool_order[#conf.pool_order + 1] = name
        end
    end

    function env.routes(t)
        if type(t) ~= "table" then fail("routes takes a table") end
        check_keys(t, set_of("map", "cmap", "default", "conf", "tag"), "routes")
        local tag = t.tag
        if tag ~= nil and type(tag) ~= "string" then
            fail("routes: tag must be a string")
        end
        for _, tree in ipairs(conf.routes) do
            if tree.tag == tag then
                -- memcached keeps the last one; a second is a mistake
                fail(tag and ("routes: two route trees for tag '" .. tag .. "'")
                     or "routes: only one untagged route tree")
            end
        end
        conf.routes[#conf.routes + 1] = t
    end

    function env.settings(t)
        if type(t) ~= "table" then fail("settings takes a table") end
        for k, v in pairs(t) do conf.settings[k] = v end
    end

    function env.local_zone(zone)
        if type(zone) ~= "string" then fail("local_zone takes a string") end
        conf.zone = zone
    end

    function env.verbose(on) conf.verbose = on and true or false end
    function env.debug(on) conf.debug = on and true or false end
    env.say = say
    env.dsay = dsay
    return setmetatable(env, { __index = _G })
end

local function read_file()
    local path = mcp.start_arg
    if type(path) ~= "string" then
        fail("no route file: start with --config=routelib --config-arg=FILE")
    end
    conf = new_conf()
    local chunk, err = loadfile(path, "t", environment())
    if chunk == nil then
        error(err, 0)
    end
    chunk()
    return conf
end

-- Config phase: pools -------------------------------------------------

local POOL_KEYS = set_of("backends", "backend_options", "options")

local function make_backend(spec, defaults, where)
    local t = {}
    for k, v in pairs(defaults) do t[k] = v end
    if type(spec) == "string" then
        local hostport, rest = string.match(spec, "^(%S+)%s*(.*)$")
        if hostport == nil then fail(where .. ": empty backend") end
        local host, port = string.match(hostport, "^(.*):(%d+)$")
        if host == nil then host, port = hostport, "11211" end
        t.host, t.port, t.label = host, port, hostport
        for word in string.gmatch(rest, "%S+") do
            if word == "_down_" then
                t.down = true
            else
                t.label = word
            end
        end
    elseif type(spec) == "table" then
        for k, v in pairs(spec) do t[k] = v end
        if type(t.host) ~= "string" then fail(where .. ": a backend table needs 'host'") end
        t.port = t.port or 11211
        t.label = t.label or (t.host .. ":" .. tostring(t.port))
    else
        fail(where .. ": a backend is a \"host:port\" string or a table")
    end
    return mcp.backend(t)
end

local function make_pool(name, spec, pool_defaults)
    if type(spec) ~= "table" then fail("pool '" .. name .. "' must be a table") end
    check_keys(spec, POOL_KEYS, "pool '" .. name .. "'")
    if type(spec.backends) ~= "table" or #spec.backends == 0 then
        fail("pool '" .. name .. "' needs a list of backends")
    end
    local bopts = spec.backend_options or {}
    local list = {}
    for i, b in ipairs(spec.backends) do
        list[i] = make_backend(b, bopts, "pool '" .. name .. "'")
    end
    local opts = {}
    for k, v in pairs(pool_defaults) do opts[k] = v end
    for k, v in pairs(spec.options or {}) do opts[k] = v end
    say("routelib: pool", name, #list .. " backends")
    return mcp.pool(list, opts)
end

-- A pool set (zone -> pool): made with poolset{}, or named "set_..." as
-- memcached's route library has them.
local function is_set(name, spec)
    return getmetatable(spec) == POOLSET or string.sub(name, 1, 4) == "set_"
end

local function apply_settings(settings)
    local pool_defaults = {}
    for k, v in pairs(settings) do
        if k == "pool_options" then
            pool_defaults = v
        elseif type(mcp[k]) == "function" then
            mcp[k](v)
        else
            fail("settings: unknown setting '" .. tostring(k) .. "'")
        end
    end
    return pool_defaults
end

function mcp_config_pools()
    local c = read_file()
    local pool_defaults = apply_settings(c.settings)
    local pools, sets = {}, {}
    table.sort(c.pool_order)
    for _, name in ipairs(c.pool_order) do
        local spec = c.pools[name]
        if is_set(name, spec) then
            local set = {}
            for zone, member in pairs(spec) do
                set[zone] = make_pool(name .. "." .. zone, member, pool_defaults)
            end
            sets[name] = set
        else
            pools[name] = make_pool(name, spec, pool_defaults)
        end
    end
    return { pools = pools, sets = sets }
end

-- Routes phase: funcgens ---------------------------------------------

local BUILD = {}
local built

local function build_route(route)
    local fgen = mcp.funcgen_new()
    BUILD[route.kind](fgen, route.opts, route.kind)
    return fgen
end

-- What a shape names as a child: a pool as it is, a route (funcgen) by
-- its generator, which declares the route's shape.
local function shape_children(list)
    local children = {}
    for i, t in ipairs(list) do
        children[i] = rawget(t, "generator") or t
    end
    return children
end

-- fgen:ready with generator `f`, whose routes are of `shape`.
local function ready(fgen, name, f, shape)
    fgen:ready{ n = name, f = f }
    declare(f, shape)
end

-- A child: a pool name or a route description; what new_handle takes.
local function target(child, what)
    if type(child) == "string" then
        local pool = built.pools[child]
        if pool == nil then fail(what .. ": no pool matching: " .. child) end
        return pool
    end
    return build_route(child)
end

-- The targets of `children`: a list, or a pool set's pools (zone -> pool).
local function targets(children, what)
    local list = {}
    if type(children) == "string" then
        local set = built.sets[children]
        if set == nil then fail(what .. ": no pool set matching: " .. children) end
        local zones = {}
        for zone in pairs(set) do zones[#zones + 1] = zone end
        table.sort(zones)
        for i, zone in ipairs(zones) do list[i] = set[zone] end
        return list, zones
    end
    for i, child in ipairs(children) do list[i] = target(child, what) end
    return list
end

local function handles(fgen, list)
    local hs = {}
    for i, t in ipairs(list) do hs[i] = fgen:new_handle(t) end
    return hs
end

-- Whether `res` is an error: the backend failed, or answered an error line.
local function is_error(res)
    local code = res:code()
    return not res:ok() or code == mcp.MCMC_CODE_SERVER_ERROR
        or code == mcp.MCMC_CODE_CLIENT_ERROR or code == mcp.MCMC_CODE_ERROR
end

function BUILD.route_direct(fgen, o, name)
    local child = target(o.child, name)
    local h = fgen:new_handle(child)
    ready(fgen, name, function(rctx)
        return function(r) return rctx:enqueue_and_wait(r, h) end
    end, { kind = "direct", children = shape_children({ child }) })
end

function BUILD.route_allsync(fgen, o, name)
    local list = targets(o.children, name)
    local hs = handles(fgen, list)
    ready(fgen, name, function(rctx)
        return function(r)
            rctx:enqueue(r, hs)
            rctx:wait_cond(#hs, mcp.WAIT_ANY)
            local last
            for _, h in ipairs(hs) do
                local res = rctx:res_any(h)
                if res ~= nil then
                    if is_error(res) then return res end
                    last = res
                end
            end
            return last
        end
    end, { kind = "route_allsync", children = shape_children(list) })
end

function BUILD.route_allfastest(fgen, o, name)
    local list = targets(o.children, name)
    local hs = handles(fgen, list)
    ready(fgen, name, function(rctx)
        return function(r)
            -- The first child, in order, that answered without an error;
            -- when every child failed, the last one's error.
            rctx:enqueue(r, hs)
            rctx:wait_cond(1, mcp.WAIT_OK)
            local last
            for i = 1, #hs do
                local res, mode = rctx:result(hs[i])
                if mode == mcp.RES_OK or mode == mcp.RES_GOOD then return res end
                last = res
            end
            return last
        end
    end, { kind = "route_allfastest", children = shape_children(list) })
end

-- Whether a failover route stops at `res`: on any answer that is not an
-- error, or with `miss` only on a hit.
local function good_enough(res, miss)
    if miss then return res:hit() end
    return not is_error(res)
end

function BUILD.route_failover(fgen, o, name)
    local list = targets(o.children, name)
    if o.shuffle then
        for i = #list, 2, -1 do
            local j = math.random(i)
            list[i], list[j] = list[j], list[i]
        end
    end
    local hs = handles(fgen, list)
    local tries = #hs
    if o.failover_count ~= nil and o.failover_count < tries then
        tries = math.max(o.failover_count, 1)
    end
    local miss = o.miss and true or false
    ready(fgen, name, function(rctx)
        return function(r)
            local res
            for i = 1, tries do
                res = rctx:enqueue_and_wait(r, hs[i])
                if good_enough(res, miss) then return res end
            end
            return res
        end
    end, { kind = "route_failover", children = shape_children(list), count = tries,
           miss = miss })
end

function BUILD.route_split(fgen, o, name)
    local child_a, child_b = target(o.child_a, name), target(o.child_b, name)
    local a = fgen:new_handle(child_a)
    local b = fgen:new_handle(child_b)
    ready(fgen, name, function(rctx)
        return function(r)
            rctx:enqueue(r, b)
            return rctx:enqueue_and_wait(r, a)
        end
    end, { kind = "route_split", children = shape_children({ child_a, child_b }) })
end

-- A copy of storage request r with exptime `ttl`, or nil if r cannot have one.
local function with_ttl(r, ttl)
    local cmd = r:command()
    if cmd == mcp.CMD_SET or cmd == mcp.CMD_ADD or cmd == mcp.CMD_CAS then
        r:token(4, ttl)
        return r
    elseif cmd == mcp.CMD_MS then
        if r:has_flag("T") then
            r:flag_token("T", "T" .. ttl)
            return r
        end
        local tokens = {}
        for i = 1, r:ntokens() do tokens[i] = r:token(i) end
        tokens[#tokens + 1] = "T" .. ttl
        return mcp.request(table.concat(tokens, " ") .. "\r\n", r)
    end
    return nil
end

function BUILD.route_ttl(fgen, o, name)
    local h = fgen:new_handle(target(o.child, name))
    local ttl = o.ttl
    fgen:ready{ n = name, f = function(rctx)
        return function(r)
            local nr = with_ttl(r, ttl)
            if nr == nil then
                return "SERVER_ERROR invalid command for route_ttl\r\n"
            end
            return rctx:enqueue_and_wait(nr, h)
        end
    end }
end

function BUILD.route_zfailover(fgen, o, name)
    local list, zones = targets(o.children, name)
    local zone = o.local_zone or built.zone
    if zone == nil then
        fail(name .. ": no local zone: call local_zone() or give 'local_zone'")
    end
    local near
    local far = {}
    -- the zones' pools, the local one first (the shape's children)
    local order = { false }
    for i, z in ipairs(zones) do
        local h = fgen:new_handle(list[i])
        if z == zone then
            near = h
            order[1] = list[i]
        else
            far[#far + 1] = h
            order[#order + 1] = list[i]
        end
    end
    if near == nil then
        fail(name .. ": pool set '" .. o.children .. "' has no zone '" .. zone .. "'")
    end
    local miss = o.miss and true or false
    ready(fgen, name, function(rctx)
        return function(r)
            local res = rctx:enqueue_and_wait(r, near)
            if good_enough(res, miss) or #far == 0 then return res end
            rctx:enqueue(r, far)
            rctx:wait_cond(#far, miss and mcp.WAIT_GOOD or mcp.WAIT_OK)
            return rctx:best_result(far) or res
        end
    end, { kind = "route_zfailover", children = order, miss = miss })
end

-- What memcached answers for a command that nothing served.
local NULL_REPLIES = {
    [mcp.CMD_GET] = "END\r\n", [mcp.CMD_GETS] = "END\r\n",
    [mcp.CMD_GAT] = "END\r\n", [mcp.CMD_GATS] = "END\r\n",
    [mcp.CMD_SET] = "NOT_STORED\r\n", [mcp.CMD_ADD] = "NOT_STORED\r\n",
    [mcp.CMD_REPLACE] = "NOT_STORED\r\n", [mcp.CMD_APPEND] = "NOT_STORED\r\n",
    [mcp.CMD_PREPEND] = "NOT_STORED\r\n", [mcp.CMD_CAS] = "NOT_STORED\r\n",
    [mcp.CMD_INCR] = "NOT_FOUND\r\n", [mcp.CMD_DECR] = "NOT_FOUND\r\n",
    [mcp.CMD_DELETE] = "NOT_FOUND\r\n", [mcp.CMD_TOUCH] = "NOT_FOUND\r\n",
    [mcp.CMD_MG] = "EN\r\n", [mcp.CMD_MS] = "NS\r\n",
    [mcp.CMD_MD] = "NF\r\n", [mcp.CMD_MA] = "NF\r\n",
}

function BUILD.route_null(fgen, _, name)
    fgen:ready{ n = name, f = function()
        return function(r)
            return NULL_REPLIES[r:command()] or "SERVER_ERROR no route\r\n"
        end
    end }
end

-- A map entry or default: a route, or a cmdmap of routes.
local function entry(value, what)
    local mt = getmetatable(value)
    if mt == ROUTE then
        return build_route(value)
    elseif mt == CMDMAP then
        local cmap = {}
        for cmd, route in pairs(value) do cmap[cmd] = build_route(route) end
        return cmap
    end
    fail(what .. " must be a route or a cmdmap")
end

local ROUTER_CONF = set_of("mode", "start", "stop")

-- Attach the route tree `t` for the listeners tagged `tag` (nil: untagged).
local function attach_tree(t, tag)
    local default = t.default and entry(t.default, "routes: default")
    if type(default) == "table" and getmetatable(default) == nil then
        fail("routes: default must be a route")
    end
    local cmap
    if t.cmap ~= nil then
        if type(t.cmap) ~= "table" then fail("routes: cmap must be a table") end
        cmap = entry(setmetatable(t.cmap, CMDMAP), "routes: cmap")
    end
    if t.map == nil and cmap == nil then
        if default == nil then fail("routes: needs a map, a cmap or a default") end
        -- one route for every key: attached alone, a route_direct is the
        -- direct path
        mcp.attach(mcp.CMD_ANY_STORAGE, default, tag)
        return
    end
    local map = {}
    for prefix, value in pairs(t.map or {}) do
        if type(prefix) ~= "string" then fail("routes: map keys must be strings") end
        map[prefix] = entry(value, "routes: map entry '" .. prefix .. "'")
    end
    local rconf = t.conf or {}
    check_keys(rconf, ROUTER_CONF, "routes: conf")
    local opts = { map = map, mode = rconf.mode or "prefix", start = rconf.start,
                   stop = rconf.stop, default = default }
    if cmap == nil then
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new(opts), tag)
        return
    end
    -- per command: the router with the command's route as its default
    for cmd = 1, mcp.CMD_END_STORAGE - 1 do
        local copy = {}
        for k, v in pairs(opts) do copy[k] = v end
        copy.default = cmap[cmd] or default
        mcp.attach(cmd, mcp.router_new(copy), tag)
    end
end

function mcp_config_routes(pools)
    local c = read_file()
    built = { pools = pools.pools, sets = pools.sets, zone = c.zone }
    if #c.routes == 0 then fail("no routes{} in " .. mcp.start_arg) end
    -- A tagged tree serves every storage command of its listeners, as
    -- memcached's does: they never fall back to the untagged tree.
    for _, t in ipairs(c.routes) do
        attach_tree(t, t.tag)
    end
end
