"""The keys of a multiget, and the requests of a run of plain gets, whose
route runs in Lua, routed together (RouteEngine.route_keys and route_run,
engine._LuaKeys) answer every client exactly as the keys routed one by
one (``batch_keys=False``): hits, misses and
failures, routes that look at the result, edit or make requests, await
several pools, raise errors, return strings or closed responses, pass a
pool what is not a request or a request kept from an earlier key, a V2
request context's route; and the keys that go unedited to one backend
travel as one backend get."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import weakref

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lupa.lua54 import lua_type as lupa_type

from fuzz.checks import chunked
from mcproxy.backends.backend import Backend
from mcproxy.routing import engine as routing_engine
from mcproxy.server import protocol
from mcproxy.units import KeyFetch, PlainRun, ReplyRun, Single
from tests.routing.luapaths import POOLS, LuaProxy

#: A route per first letter of the key (the rest: the result of pools.a).
V1_ROUTE = POOLS + """
local last, last_request
function mcp_config_routes(p)
    local function route(r)
        local key = r:key()
        local c = key:sub(1, 1)
        if c == "e" then
            r:token(r:ntokens(), key .. "x")
            return p.a(r)
        elseif c == "n" then
            return p.b(mcp.request("get " .. key .. "\\r\\n"))
        elseif c == "z" then
            error("no " .. key)
        elseif c == "w" then
            local rs = mcp.await(r, { p.a, p.b }, 2)
            return rs[#rs]
        elseif c == "s" then
            return "SERVER_ERROR nope\\r\\n"
        elseif c == "m" then
            return "END\\r\\n"
        elseif c == "v" then
            return "VALUE " .. key .. " 0 1\\r\\nx\\r\\nEND\\r\\n"
        elseif c == "d" then
            local res = p.dead(r)
            if res:ok() then return res end
            return "SERVER_ERROR dead " .. tostring(res:code()) .. "\\r\\n"
        elseif c == "D" then
            return p.dead(r)
        elseif c == "f" then
            local res = p.b(r)
            if not res:hit() then res = p.a(r) end
            return res
        elseif c == "c" then
            local res <close> = p.a(r)
            return res
        elseif c == "l" then
            local res = p.b(r)
            return "SERVER_ERROR " .. tostring(res:code()) .. " " .. tostring(res:vlen())
                .. " " .. tostring(res:line()) .. " " .. tostring(res:hit()) .. "\\r\\n"
        elseif c == "o" and last ~= nil then
            return last
        elseif c == "t" then
            return "SERVER_ERROR " .. r:token(1) .. " " .. r:command() .. "\\r\\n"
        elseif c == "y" then
            return 5
        elseif c == "x" then
            return p.a(key)
        elseif c == "r" then
            local _ = r:token(2)
            return p.a(r)
        elseif c == "g" then
            local res = p.a(r)
            local _ = res:vlen()
            return res
        elseif c == "q" and last_request ~= nil then
            return p.b(last_request)
        end
        local res = p.a(r)
        last, last_request = res, r
        return res
    end
    mcp.attach(mcp.CMD_GET, route)
    mcp.attach(mcp.CMD_GETS, route)
    mcp.attach(mcp.CMD_SET, function(r)
        local rs = mcp.await(r, { p.a, p.b }, 2)
        return rs[1]
    end)
end
"""

#: A V2 route: a request context's handles, a fallback on a miss.
V2_ROUTE = POOLS + """
function mcp_config_routes(p)
    local g = mcp.funcgen_new()
    local a, b, dead = g:new_handle(p.a), g:new_handle(p.b), g:new_handle(p.dead)
    g:ready({ n = "keys", f = function(rctx)
        return function(r)
            local c = r:key():sub(1, 1)
            if c == "d" then return rctx:enqueue_and_wait(r, dead) end
            if c == "z" then error("no") end
            local res = rctx:enqueue_and_wait(r, a)
            if not res:hit() then return rctx:enqueue_and_wait(r, b) end
            return res
        end
    end })
    mcp.attach(mcp.CMD_GET, g)
    mcp.attach(mcp.CMD_GETS, g)
    local s = mcp.funcgen_new()
    local sa, sb = s:new_handle(p.a), s:new_handle(p.b)
    s:ready({ n = "sets", f = function(rctx)
        return function(r)
            rctx:enqueue(r, { sa, sb })
            rctx:wait_cond(2)
            return rctx:res_any(sa)
        end
    end })
    mcp.attach(mcp.CMD_SET, s)
end
"""

#: V1's gets, and sets whose route mostly sends them on unedited (so that
#: they travel with the gets), else edits, answers itself or fails.
SETS_ROUTE = V1_ROUTE.replace("""    mcp.attach(mcp.CMD_SET, function(r)
        local rs = mcp.await(r, { p.a, p.b }, 2)
        return rs[1]
    end)""", """    mcp.attach(mcp.CMD_SET, function(r)
        local c = r:key():sub(1, 1)
        if c == "w" then
            local rs = mcp.await(r, { p.a, p.b }, 2)
            return rs[1]
        elseif c == "e" then
            r:token(2, r:key() .. "x")
        elseif c == "s" then
            return "SERVER_ERROR nope\\r\\n"
        elseif c == "z" then
            error("no set")
        elseif c == "l" then
            local res = p.b(r)
            return "SERVER_ERROR " .. tostring(res:ok()) .. " " .. res:line()
        end
        return p.a(r)
    end)""")

#: Every command to one pool, one of whose backends is down: the direct
#: path (RouteEngine.gather_plain joins lone requests of many connections).
DIRECT_ROUTE = """
function mcp_config_pools()
    local function b(n) return mcp.backend("b" .. n, "127.0.0.1", 10 + n) end
    return mcp.pool({ b(1), b(2), mcp.backend{ label = "down", host = "127.0.0.1",
                                              port = 19, down = true } })
end
function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
"""

#: routes.failover of pools, run natively (Failover.send_joined joins lone
#: requests of many connections): misses go on through the down pool.
FAILOVER_ROUTE = POOLS + """
local routes = require("mcproxy.routes")
function mcp_config_routes(p)
    local route = routes.failover({ p.a, p.dead, p.b }, { miss = true })
    mcp.attach(mcp.CMD_GET, route)
    mcp.attach(mcp.CMD_SET, route)
end
"""

CONFIGS = {"v1": V1_ROUTE, "v2": V2_ROUTE, "sets": SETS_ROUTE, "direct": DIRECT_ROUTE,
           "failover": FAILOVER_ROUTE,
           "failover-dead": FAILOVER_ROUTE.replace("p.a, p.dead, p.b", "p.dead, p.a")}

_proxies: dict[tuple[str, bool], LuaProxy] = {}


def proxy(tmp_path_factory, name: str, batch_keys: bool) -> LuaProxy:
    """The LuaProxy of a config (made once per test session)."""
    key = (name, batch_keys)
    if key not in _proxies:
        path = tmp_path_factory.mktemp("luakeys") / "route.lua"
        path.write_text(CONFIGS[name])
        _proxies[key] = LuaProxy(str(path), batch_keys)
    return _proxies[key]


_letters = "aefnzwsmvdDclotykxrgq"
_keys = st.builds(lambda c, n: (c + n).encode(), st.sampled_from(_letters),
                  st.sampled_from(["", "1", "2", "33", "key:000123"]))


_sets = st.builds(lambda key, value: b"set %s 3 0 %d\r\n%s\r\n" % (key, len(value), value),
                 _keys, st.sampled_from([b"", b"v", b"value"]))


@st.composite
def streams(draw) -> bytes:
    """Sets of some keys, then multigets (get and gets) of those and
    others, and runs of plain gets with sets among them."""
    out = draw(st.lists(_sets, max_size=6))
    for _ in range(draw(st.integers(1, 3))):
        keys = draw(st.lists(_keys, min_size=2, max_size=12))
        out.append(draw(st.sampled_from([b"get ", b"gets "])) + b" ".join(keys) + b"\r\n")
        out += draw(st.lists(_keys.map(lambda key: b"get %s\r\n" % key) | _sets,
                             max_size=8))
    return b"".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONFIGS)), streams(), st.lists(st.integers(0, 10**4), max_size=4))
def test_lua_keys_answer_as_one_by_one(tmp_path_factory, name, stream, cuts):
    batched = proxy(tmp_path_factory, name, True)
    alone = proxy(tmp_path_factory, name, False)
    chunks = chunked(stream, cuts)
    assert batched.exchange(chunks) == alone.exchange(chunks)


def test_keys_sent_unedited_travel_as_one_backend_get(tmp_path_factory, monkeypatch):
    """The keys the routes send unedited to one backend go as one KeyFetch
    (one queue entry, one ``get`` of them all), where one by one they are
    a Single each (merged on the wire as they were written together)."""
    units = []
    send_unit = Backend.send_unit
    monkeypatch.setattr(Backend, "send_unit",
                        lambda self, unit: units.append(unit) or send_unit(self, unit))
    batched = proxy(tmp_path_factory, "v1", True)
    alone = proxy(tmp_path_factory, "v1", False)
    stream = [b"get a1 a2 a33 akey:000123 f1\r\n"]
    assert batched.exchange(stream) == b"END\r\n"
    sent, fetches = batched.sent, units[:]
    units.clear()
    assert alone.exchange(stream) == b"END\r\n"
    assert sent == alone.sent  # the same bytes on the wire
    assert {unit.__class__ for unit in fetches} == {KeyFetch}
    assert sorted(b"get %s\r\n" % b" ".join(unit.keys) for unit in fetches) == sorted(sent)
    assert len(units) == 6 and {unit.__class__ for unit in units} == {Single}


def test_multigets_of_a_lua_route_are_scanned_not_parsed(tmp_path_factory, monkeypatch):
    """A Lua route's multiget, alone or pipelined among plain gets and sets,
    is taken from the scan of the read (route_run): no line of it is parsed
    as a Request, and each is answered as one by one."""
    batched = proxy(tmp_path_factory, "sets", True)
    alone = proxy(tmp_path_factory, "sets", False)
    streams = [[b"get a1 a2 f1\r\n"],
               [b"get a1 a2\r\nget a1\r\nset a2 0 0 1\r\nx\r\nget a2 f1 a1\r\nget f1\r\n"]]
    expected = [alone.exchange(stream) for stream in streams]
    parsed = []
    parse = protocol.parse_request
    monkeypatch.setattr(protocol, "parse_request", lambda line: parsed.append(line) or parse(line))
    assert [batched.exchange(stream) for stream in streams] == expected
    assert parsed == []


def test_a_failing_key_fails_alone(tmp_path_factory):
    """Hits, misses, failures, errors and strings in one multiget."""
    batched = proxy(tmp_path_factory, "v1", True)
    stream = [b"set a1 0 0 1\r\nx\r\n", b"get a1 a2 d1 D1 z1 s1 m1 v1 y1 c1 t1\r\n"]
    got = batched.exchange(stream)
    assert got == (b"STORED\r\nVALUE a1 0 1\r\nx\r\n"
                   b"SERVER_ERROR dead 23\r\nSERVER_ERROR backend failure\r\n"
                   b"SERVER_ERROR lua failure\r\nSERVER_ERROR nope\r\n"
                   b"VALUE v1 0 1\r\nx\r\nSERVER_ERROR bad response\r\n"
                   b"SERVER_ERROR bad response\r\nSERVER_ERROR get 7\r\nEND\r\n")
    assert got == proxy(tmp_path_factory, "v1", False).exchange(stream)


def test_routes_done_with_are_not_held_by_lua(tmp_path):
    """What Lua keeps of a routed batch (lazy responses, until Lua's next
    collection) leads back to no Routes: an old config goes, and its
    backends close, once it is replaced and its requests are done, not at
    Python's next full collection (rare, with twistd's GC threshold)."""
    path = tmp_path / "route.lua"
    path.write_text(V1_ROUTE)
    lua = LuaProxy(str(path), True)
    gc.collect()
    gc.disable()
    try:
        lua.exchange([b"set a1 0 0 1\r\nx\r\n", b"get a1 a2 f1\r\nget a1\r\nget a2\r\n"])
        old = weakref.ref(lua.routes)
        lua.routes = None
        lua.engine.load(str(path))
        assert old() is None
    finally:
        gc.enable()


#: Keys of routes that keep nothing from one request to the next (not "o", "q").
_own_keys = st.builds(lambda c, n: (c + n).encode(),
                      st.sampled_from(_letters.replace("o", "").replace("q", "")),
                      st.sampled_from(["", "1", "2", "33", "key:000123"]))


@st.composite
def poll_streams(draw) -> list[list[bytes]]:
    """Clients of one poll: one sets keys first (a turn of its own), then
    each sends a get alone (maybe of up to 16 keys, some twice), or a get
    followed by more in the same read (on a key of its own: between
    connections no order holds)."""
    sets = [b"set %s 3 0 1\r\nv\r\n" % key for key in draw(st.lists(_keys, max_size=4))]
    clients = [[b"".join(sets)]]
    for i in range(draw(st.integers(1, 8))):
        read = b"get %s\r\n" % b" ".join(draw(st.lists(_own_keys, min_size=1, max_size=16)))
        if draw(st.booleans()):
            read = draw(st.sampled_from([b"set %s 0 0 1\r\nw\r\n", b"set %s 0 0 1 noreply\r\nw\r\n",
                                         b"set %s 5 0 2\r\nxy\r\nget %s\r\n"]))
            read = read.replace(b"%s", draw(_own_keys) + b"-%d" % i)
        more = draw(st.sampled_from([b"", b"get a%d\r\n", b"set a%d 0 0 1\r\nw\r\nget a%d\r\n",
                                     b"mn\r\n", b"gets a%d f2\r\n"]))
        clients.append([b"", read + more.replace(b"%d", b"-%d" % i)])
    return clients


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONFIGS)), poll_streams())
@example("sets", [[b""], [b"", b"set a-1 0 0 1\r\nw\r\n"],
                  [b"", b"set a-4 0 0 1 noreply\r\nw\r\ngets a-4 f2\r\n"]])
# joined multigets whose keys' routes go on alone (await, fail, make a request)
@example("v1", [[b"set a1 0 0 1\r\nv\r\n"], [b"", b"get a1 w1 z1 n1 a1\r\n"],
                [b"", b"get s1 a1\r\n"], [b"", b"get a2\r\n"]])
# runs of one (gather_plain) and a set scan_plain leaves to the line parser
# (gather), in one poll
@example("sets", [[b"", b"get a-1\r\n"], [b"", b"set a-2 0 -1 1\r\nw\r\n"],
                  [b"", b"set a-3 0 0 1\r\nw\r\n"], [b"", b"get a-4\r\nget a-4\r\n"]])
def test_gets_of_many_connections_answer_as_alone(tmp_path_factory, name, clients):
    """Lone gets that several connections send in one poll are routed
    together (RouteEngine.gather_plain, gather), and each connection gets what it gets
    with every request routed on its own; what a connection sent after its
    get in the same read waits for it (a set after it is not seen by it)."""
    batched = proxy(tmp_path_factory, name, True)
    alone = proxy(tmp_path_factory, name, False)
    assert without_cas(batched.exchange_many(clients)) == without_cas(alone.exchange_many(clients))


def without_cas(replies: list[bytes]) -> list[bytes]:
    """Replies with the CAS of each ``gets`` value masked: a backend numbers
    the sets of all connections in the order they reach it, which between
    connections is not defined (as with memcached itself)."""
    return [_CAS.sub(rb"\1 cas", reply) for reply in replies]


_CAS = re.compile(rb"^(VALUE \S+ \d+ \d+) \d+(?=\r$)", re.MULTILINE)


def recorded_units_and_starts(batched: LuaProxy, monkeypatch) -> tuple[list, list]:
    """The units every backend is given, and what each call into Lua's
    start_keys starts (the batch's multiget flag, then its keys)."""
    units = []
    send_unit = Backend.send_unit
    monkeypatch.setattr(Backend, "send_unit",
                        lambda self, unit: units.append(unit) or send_unit(self, unit))
    starts = []
    routes = batched.engine.routes
    start_keys = routes.start_keys

    def recorded(*args):
        starts.append(args[6:7] + args[8:])
        return start_keys(*args)
    monkeypatch.setattr(routes, "start_keys", recorded)
    return units, starts


def test_gets_of_many_connections_go_in_one_call_and_one_backend_run(tmp_path_factory,
                                                                      monkeypatch):
    """One call into Lua starts the routes of every connection's get, and the
    gets bound for one backend travel as one ReplyRun."""
    batched = proxy(tmp_path_factory, "v1", True)
    units, starts = recorded_units_and_starts(batched, monkeypatch)
    got = batched.exchange_many([[b"get a%d\r\n" % i] for i in range(5)])
    assert got == [b"END\r\n"] * 5
    assert starts == [(False, b"a0", b"a1", b"a2", b"a3", b"a4")]
    # one ReplyRun per backend of pool a, each written in one send
    assert {unit.__class__ for unit in units} == {ReplyRun} and len(units) == len(batched.sent)
    assert sorted(b"".join(batched.sent).splitlines(keepends=True)) == [
        b"get a%d\r\n" % i for i in range(5)]


def test_multigets_of_many_connections_go_in_one_call_and_one_backend_get(tmp_path_factory,
                                                                           monkeypatch):
    """The multi-key gets that connections send alone in one poll are
    routed as the keys of one multiget: one call into Lua starts their
    routes, the keys bound for one backend go as one KeyFetch, and each
    connection gets its own keys' replies; their lone gets go as before."""
    batched = proxy(tmp_path_factory, "v1", True)
    units, starts = recorded_units_and_starts(batched, monkeypatch)
    clients = [[b"set a1 0 0 1\r\nA\r\nset a2 0 0 1\r\nB\r\n"]] + [
        [b"", read] for read in (b"get a1 a2\r\n", b"get a3\r\n", b"get a2 a3 a2\r\n")]
    got = batched.exchange_many(clients)
    assert got[1:] == [b"VALUE a1 0 1\r\nA\r\nVALUE a2 0 1\r\nB\r\nEND\r\n", b"END\r\n",
                       b"VALUE a2 0 1\r\nB\r\nVALUE a2 0 1\r\nB\r\nEND\r\n"]
    assert got == proxy(tmp_path_factory, "v1", False).exchange_many(clients)
    assert starts[-2:] == [(True, b"a1", b"a2", b"a2", b"a3", b"a2"), (False, b"a3")]
    gets = [unit for unit in units if unit.__class__ is KeyFetch]
    assert len(gets) <= 2  # pool a: two backends
    assert sorted(key for unit in gets for key in unit.keys) == [b"a1", b"a2", b"a2", b"a2",
                                                                 b"a3"]


def test_lone_requests_of_the_direct_path_join_one_backend_run(tmp_path_factory,
                                                                 monkeypatch):
    """On the direct path too, the lone gets and sets of many connections
    in one poll go to each backend as one ReplyRun (one unit per backend,
    where one by one each connection's request is a PlainRun of its own)."""
    clients = [[b"get a%d\r\n" % i] for i in range(6)] + [[b"set s 0 0 1\r\nv\r\n"]]
    units = []
    send_unit = Backend.send_unit
    monkeypatch.setattr(Backend, "send_unit",
                        lambda self, unit: units.append(unit) or send_unit(self, unit))
    batched = proxy(tmp_path_factory, "direct", True).exchange_many(clients)
    joined, units[:] = units[:], []
    assert batched == proxy(tmp_path_factory, "direct", False).exchange_many(clients)
    assert {unit.__class__ for unit in joined} == {ReplyRun} and len(joined) <= 3
    assert sum(len(unit.keys) for unit in joined) == 7
    assert {unit.__class__ for unit in units} == {PlainRun} and len(units) == 7
    assert b"SERVER_ERROR backend failure\r\n" in batched  # some go to the down backend


def test_what_a_run_sends_reaches_the_backend_in_its_order(tmp_path_factory):
    """A set sent on unedited (its key's batch) and a set whose route edits
    it (alone) reach the backend in the client's order, as one by one: the
    cas uniques a later gets shows are the same."""
    stream = [b"set m 3 0 0\r\n\r\nset e1 3 0 0\r\n\r\ngets a e1\r\n"]  # e1: e1x
    batched = proxy(tmp_path_factory, "sets", True).exchange(stream)
    assert batched == proxy(tmp_path_factory, "sets", False).exchange(stream)
    assert batched.endswith(b"VALUE e1x 3 0 2\r\n\r\nEND\r\n")


#: Routes that keep a request and read it in a later route.
STASH_ROUTE = POOLS + """
function mcp_config_routes(p)
    local saved = {}
    local function route(r)
        local key = r:key()
        if key == "peek" then
            local out = {}
            for _, old in ipairs(saved) do
                out[#out + 1] = old:token(1) .. ":" .. old:key() .. ":" .. old:ntokens()
            end
            return "SERVER_ERROR " .. table.concat(out, ",") .. "\\r\\n"
        end
        saved[#saved + 1] = r
        return p.a(r)
    end
    mcp.attach(mcp.CMD_GET, route)
    mcp.attach(mcp.CMD_SET, route)
end
"""


def test_a_request_kept_past_its_batch_reads_as_alone(tmp_path_factory):
    """A route may keep a request of a batch (a run's get or set) and read it
    in a later route, once its batch is done: it reads as it would have,
    routed alone."""
    path = tmp_path_factory.mktemp("stash") / "route.lua"
    path.write_text(STASH_ROUTE)
    stream = [b"set a1 0 0 2\r\nxy\r\nget a2\r\nset a3 0 0 1\r\nz\r\n", b"get peek\r\n"]
    batched = LuaProxy(str(path), True).exchange(stream)
    assert batched == LuaProxy(str(path), False).exchange(stream)
    assert batched.endswith(b"SERVER_ERROR set:a1:5,get:a2:2,set:a3:5\r\n")


def test_a_multiget_of_more_keys_than_idle_coroutines_answers_as_alone(tmp_path_factory):
    """More keys in one batch than mcp.lua keeps idle coroutines (IDLE_MAX,
    1024): each key still gets its own, new or idle, and the next batch
    reuses those kept; among them keys whose routes fail, answer
    themselves, edit their request."""
    keys = [b"a%d" % i for i in range(1200)]
    for at, letter in ((5, b"z"), (700, b"s"), (1100, b"e"), (1199, b"l")):
        keys[at] = letter + keys[at]
    stream = [b"set a7 0 0 1\r\nx\r\n"] + [b"get " + b" ".join(keys) + b"\r\n"] * 2
    batched = proxy(tmp_path_factory, "v1", True).exchange(stream)
    assert batched == proxy(tmp_path_factory, "v1", False).exchange(stream)
    assert batched.count(b"VALUE a7 0 1\r\n") == 2


@pytest.mark.skipif(routing_engine._keyloops is None, reason="mcproxy.routing._keyloops not built")
def test_states_route_keys_through_the_compiled_loops_where_built(tmp_path_factory):
    """Where _keyloops is built every routes state runs its loops (they are
    what the tests above compare with routing one by one)."""
    loops = proxy(tmp_path_factory, "v1", True).engine.routes.state.loops
    assert loops is not None
    assert {lupa_type(loops.start), lupa_type(loops.resume)} == {"function"}


@pytest.mark.e2e
@pytest.mark.skipif(routing_engine._keyloops is None, reason="mcproxy.routing._keyloops not built")
def test_the_compiled_loops_need_lupas_lua():
    """Where the Lua API is not found in the library named (a library
    without it, one not loaded), nothing is installed: mcp.lua keeps its
    own loops. (In a process of its own: the API, once found, is kept.)"""
    script = ("from mcproxy.routing import _keyloops; "
              "print(_keyloops.install(_keyloops.__file__, 0, b'x'), "
              "_keyloops.install('/nonexistent/lua54.so', 0, b'x'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


#: Routes that drive their coroutine by hand: yields that look like what a
#: pool call, an await or a request context's wait yields (mcp.lua's
#: numbers for them), or do not, many values, errors that are not strings,
#: nothing returned; and a route that sends its request to two pools in turn.
ODD_ROUTE = POOLS + """
function mcp_config_routes(p)
    local function route(r)
        local c = r:key():sub(1, 1)
        if c == "y" then
            return coroutine.yield(4, nil, r)
        elseif c == "m" then
            coroutine.yield(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
        elseif c == "t" then
            error({ "a table" })
        elseif c == "n" then
            error()
        elseif c == "r" then
            return
        elseif c == "u" then
            return coroutine.yield(4, "not a pool", r)
        elseif c == "k" then
            return coroutine.yield(5, r, {}, 1, 0)
        elseif c == "j" then
            return coroutine.yield(6, {}, true, 1, 2, 3)
        elseif c == "w" then
            local first = p.b(r)
            if first:hit() then return first end
            return p.a(r)
        end
        return p.a(r)
    end
    mcp.attach(mcp.CMD_GET, route)
    mcp.attach(mcp.CMD_SET, route)
end
"""


@pytest.mark.parametrize("keys", [b"a1 y1 a2", b"y1 a1", b"a1 m1 a2 t1 n1 r1 u1 w1 a3",
                                  b"m1 m2", b"t1 a1 w1", b"w1 w2 a1", b"k1 a1 j1", b"j1"])
def test_routes_that_drive_their_coroutine_by_hand_answer_as_alone(tmp_path_factory, keys):
    """Whatever a route yields or raises, its key's batch answers as its
    keys routed one by one, the other keys too (the compiled loops hand
    such a key back to mcp.lua's, which step it as any route): a yield of
    the route's own is never taken for a pool call, an await or a wait,
    which yield values no route can reach."""
    path = tmp_path_factory.mktemp("odd") / "route.lua"
    path.write_text(ODD_ROUTE)
    stream = [b"set a1 0 0 1\r\nx\r\nset w2 0 0 1\r\ny\r\n", b"get " + keys + b"\r\n",
              b"".join(b"get %s\r\n" % key for key in keys.split())]
    batched = LuaProxy(str(path), True).exchange(stream)
    assert batched == LuaProxy(str(path), False).exchange(stream)
    assert batched.startswith(b"STORED\r\nSTORED\r\n")
    if b"a1" in keys.split():  # its neighbours' failures are theirs only
        assert b"VALUE a1 0 1\r\nx\r\n" in batched
