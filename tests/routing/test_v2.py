"""The V2 route API (routing/v2.lua, routing/rcontext.py) on a network-free
engine: function generators, request contexts, callbacks and routers, with
the answers memcached 1.6.45's proxy gives for the same configs where it
was asked (noted per test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from mcproxy.backends.pool import BackendRegistry
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import ConfigError, RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.response import Response
from tests.enginekit import FakeBackends, run, start

POOLS = """
function mcp_config_pools()
    return {
        a = mcp.pool({ mcp.backend("a", "127.0.0.1", "1") }),
        b = mcp.pool({ mcp.backend("b", "127.0.0.1", "2") }),
        c = mcp.pool({ mcp.backend("c", "127.0.0.1", "3") }),
    }
end

-- fg("name", function(rctx, handles) return function(r) ... end end, pools...)
local function fg(name, f, ...)
    local g = mcp.funcgen_new()
    local hs = {}
    for i, p in ipairs({...}) do hs[i] = g:new_handle(p) end
    g:ready({ n = name, f = function(rctx) return f(rctx, hs) end })
    return g
end
"""

HIT = b"VALUE k 0 1\r\nx\r\nEND\r\n"
MISS = b"END\r\n"


def config(body: str) -> str:
    """A config over POOLS whose mcp_config_routes(p) is ``body``."""
    return POOLS + f"\nfunction mcp_config_routes(p)\n{body}\nend\n"


def attach_get(function_body: str, pools: str = "p.a") -> str:
    """GET attached to one funcgen over ``pools`` whose function is
    ``function(r) <function_body> end`` with ``rctx`` and ``h`` in scope."""
    return config(f"""
    mcp.attach(mcp.CMD_GET, fg("t", function(rctx, h) return function(r)
        {function_body}
    end end, {pools}))
    """)


# -- function generators ------------------------------------------------------

def test_enqueue_and_wait_returns_the_backend_reply(engine, load):
    load(attach_get("return rctx:enqueue_and_wait(r, h[1])"))
    fake = FakeBackends(engine, {"a": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.sent == [("a", b"get k\r\n")]


def test_handles_are_numbered_from_zero(engine, load):
    # memcached 1.6.45: new_handle returns 0, 1, ...
    load(attach_get('return "SERVER_ERROR " .. h[1] .. h[2] .. h[3] .. "\\r\\n"',
                    "p.a, p.b, p.c"))
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR 012\r\n"


def test_constants(engine, load):
    # memcached 1.6.45's values
    load(attach_get('return string.format("SERVER_ERROR %d %d %d %d %s %d %d %d\\r\\n", '
                    "mcp.WAIT_ANY, mcp.WAIT_OK, mcp.WAIT_GOOD, mcp.WAIT_FASTGOOD, "
                    "tostring(mcp.WAIT_RESUME), mcp.RES_GOOD, mcp.RES_OK, mcp.RES_ANY)"))
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR 1 2 3 4 true 8 16 32\r\n"


def test_generator_argument_and_slots_per_concurrent_request(engine, load):
    load(config("""
    local made = 0
    local g = mcp.funcgen_new()
    local h = g:new_handle(p.a)
    g:ready({ n = "slots", a = "arg", f = function(rctx, a)
        made = made + 1
        local mine = made
        return function(r)
            if r:key() == "made" then
                return "SERVER_ERROR " .. made .. "\\r\\n"
            end
            local res = rctx:enqueue_and_wait(r, h)
            return "SERVER_ERROR slot " .. mine .. " " .. a .. "\\r\\n"
        end
    end })
    mcp.attach(mcp.CMD_GET, g)
    """))
    fake = FakeBackends(engine, hold=True)
    first, second = start(engine, b"get x\r\n"), start(engine, b"get y\r\n")
    fake.answer("a", MISS)
    fake.answer("a", MISS)
    assert first == [b"SERVER_ERROR slot 1 arg\r\n"]
    assert second == [b"SERVER_ERROR slot 2 arg\r\n"]
    # both slots are free again: a third request reuses the last one freed
    fake.hold = False
    assert run(engine, b"get z\r\n") == b"SERVER_ERROR slot 2 arg\r\n"
    assert run(engine, b"get made\r\n") == b"SERVER_ERROR 2\r\n"


def test_errors_and_bad_returns(engine, load):
    # memcached 1.6.45 answers these the same
    load(config("""
    mcp.attach(mcp.CMD_GET, fg("err", function() return function(r) error("boom") end end))
    mcp.attach(mcp.CMD_SET, fg("nil", function() return function(r) return nil end end))
    mcp.attach(mcp.CMD_DELETE, fg("num", function() return function(r) return 5 end end))
    """))
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == errors.BAD_RESPONSE
    assert run(engine, b"delete k\r\n") == errors.BAD_RESPONSE
    # a failed request frees its slot: the next one runs
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE


@pytest.mark.parametrize(("body", "message"), [
    ("mcp.funcgen_new():ready({})", "Must specify generator function ('f') to fgen:ready"),
    ("local g = mcp.funcgen_new(); g:ready({ f = function() return 1 end })",
     "function generator didn't return a function"),
    ("local g = mcp.funcgen_new(); g:ready({ f = function() return function() end end });"
     " g:new_handle(p.a)", "cannot modify function generator after calling ready"),
    ("mcp.funcgen_new():new_handle(5)", "invalid argument to new_handle"),
    ("local g = mcp.funcgen_new(); mcp.funcgen_new():new_handle(g)",
     "new_handle: the function generator is not ready"),
    ("mcp.funcgen_new():new_handle(mcp.router_new({ map = {} }))",
     "cannot assign a router to a handle in new_handle"),
    ("mcp.attach(mcp.CMD_GET, mcp.funcgen_new())",
     "cannot attach a function generator before calling ready"),
    ("mcp.attach(mcp.CMD_GET, {})", "Must pass a function to mcp.attach"),
])
def test_funcgen_misuse_fails_the_load(load, body, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(config(body))


def test_funcgenbare(engine, load):
    load(config("""
    mcp.attach(mcp.CMD_GET, mcp.funcgenbare_new(function(r)
        return "SERVER_ERROR bare " .. r:key() .. "\\r\\n"
    end))
    """))
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR bare k\r\n"


# -- request contexts: enqueue, wait, results ----------------------------------

RESULTS = """
    local parts = { "n=" .. n }
    for i = 1, #h do
        local res, mode = rctx:result(h[i])
        parts[#parts + 1] = string.format("%d:%s:%s%s%s", h[i], tostring(mode),
            tostring(rctx:res_good(h[i]) ~= nil), tostring(rctx:res_ok(h[i]) ~= nil),
            tostring(rctx:res_any(h[i]) ~= nil))
    end
    return "SERVER_ERROR " .. table.concat(parts, " ") .. "\\r\\n"
"""


def test_wait_cond_all_with_results(engine, load):
    # memcached 1.6.45: a miss is RES_OK, a failure RES_ANY, a hit RES_GOOD
    load(attach_get("rctx:enqueue(r, h); local n = rctx:wait_cond(#h, mcp.WAIT_ANY)" + RESULTS,
                    "p.a, p.b, p.c"))
    FakeBackends(engine, {"a": HIT, "b": MISS, "c": b"SERVER_ERROR out of memory\r\n"})
    got = run(engine, b"get k\r\n")
    assert got == (b"SERVER_ERROR n=3 0:8:truetruetrue 1:16:falsetruetrue "
                   b"2:8:truetruetrue\r\n")


def test_failed_backend_is_res_any(engine, load):
    load(attach_get("rctx:enqueue(r, h); local n = rctx:wait_cond(2)" + RESULTS, "p.a, p.b"))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    _, callback = fake.pending.pop()
    callback(Response.failure("test"))
    assert out == [b"SERVER_ERROR n=2 0:16:falsetruetrue 1:32:falsefalsetrue\r\n"]


def test_requests_wait_until_a_wait(engine, load):
    load(attach_get("""
        rctx:enqueue(r, h[1])
        rctx:enqueue(r, h[2])
        local sent = tostring(rctx:res_any(h[1]) ~= nil)
        local res = rctx:enqueue_and_wait(r, h[3])
        return res
    """, "p.a, p.b, p.c"))
    fake = FakeBackends(engine, {"c": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert sorted(label for label, _ in fake.sent) == ["a", "b", "c"]


def test_wait_good_counts_hits_only(engine, load):
    load(attach_get("""
        rctx:enqueue(r, h)
        local n = rctx:wait_cond(1, mcp.WAIT_GOOD)
        for i = 1, #h do
            local res = rctx:res_good(h[i])
            if res then return res end
        end
        return "SERVER_ERROR none good n=" .. n .. "\\r\\n"
    """, "p.a, p.b"))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    assert out == []  # a miss does not end a wait for one good answer
    fake.answer("b", HIT)
    assert out == [HIT]
    # none good: the wait ends when nothing is left outstanding
    fake.hold = False
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR none good n=0\r\n"


def test_fastgood_resumes_on_the_first_hit(engine, load):
    load(attach_get("""
        rctx:enqueue(r, h)
        local n = rctx:wait_cond(#h, mcp.WAIT_FASTGOOD)
        return "SERVER_ERROR n=" .. n .. "\\r\\n"
    """, "p.a, p.b, p.c"))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    assert out == []
    fake.answer("b", HIT)
    assert out == [b"SERVER_ERROR n=2\r\n"]
    # the answer nobody waits for still arrives, and frees the slot
    fake.answer("c", MISS)
    fake.hold = False
    # misses count, but only all of them end the wait
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR n=3\r\n"


def test_wait_cond_zero_sends_and_returns_at_once(engine, load):
    # memcached 1.6.45: "SERVER_ERROR zero n=0"
    load(attach_get("""
        rctx:enqueue(r, h[1])
        local n = rctx:wait_cond(0)
        return "SERVER_ERROR zero n=" .. n .. "\\r\\n"
    """))
    fake = FakeBackends(engine, hold=True)
    assert start(engine, b"get k\r\n") == [b"SERVER_ERROR zero n=0\r\n"]
    assert fake.sent == [("a", b"get k\r\n")]
    fake.answer("a", MISS)  # recorded by a context whose function returned


def test_wait_handle_returns_that_handles_reply(engine, load):
    load(attach_get("rctx:enqueue(r, h); return rctx:wait_handle(h[2])", "p.a, p.b"))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("b", HIT)
    assert out == [HIT]
    fake.answer("a", MISS)


def test_wait_handle_on_an_unqueued_handle(engine, load):
    load(attach_get("return rctx:wait_handle(h[1])"))
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE


def test_earlier_answers_count_toward_a_later_wait(engine, load):
    load(attach_get("""
        rctx:enqueue(r, h[1])
        local first = rctx:enqueue_and_wait(r, h[2])
        local n = rctx:wait_cond(1, mcp.WAIT_GOOD)
        return "SERVER_ERROR n=" .. n .. " " .. tostring(rctx:res_good(h[1]) ~= nil) .. "\\r\\n"
    """, "p.a, p.b"))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", HIT)   # before the handle waited for
    fake.answer("b", MISS)
    assert out == [b"SERVER_ERROR n=1 true\r\n"]


def test_a_handle_waited_twice_returns_its_answer(engine, load):
    # memcached 1.6.45 never answers this request; mcproxy gives the first answer
    load(attach_get("""
        local one = rctx:enqueue_and_wait(r, h[1])
        local two = rctx:enqueue_and_wait(r, h[1])
        return "SERVER_ERROR " .. tostring(one == two) .. "\\r\\n"
    """))
    fake = FakeBackends(engine)
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR true\r\n"
    assert len(fake.sent) == 1


def test_enqueue_misuse(engine, load):
    load(config("""
    mcp.attach(mcp.CMD_GET, fg("t", function(rctx, h) return function(r)
        local what = r:key()
        if what == "nokey" then rctx:enqueue(mcp.request("mn\\r\\n"), h[1])
        elseif what == "badhandle" then rctx:enqueue(r, 7)
        elseif what == "badtable" then rctx:enqueue(r, { "x" })
        elseif what == "nothing" then rctx:enqueue(r, "x")
        elseif what == "mode" then rctx:wait_cond(1, 99)
        elseif what == "count" then rctx:wait_cond(-1)
        end
        return "SERVER_ERROR fine\\r\\n"
    end end, p.a))
    """))
    for key in (b"nokey", b"badhandle", b"badtable", b"nothing", b"mode", b"count"):
        assert run(engine, b"get " + key + b"\r\n") == errors.LUA_FAILURE, key
    assert run(engine, b"get other\r\n") == b"SERVER_ERROR fine\r\n"


def test_callback_judges_and_resumes(engine, load):
    # memcached 1.6.45: a callback returning WAIT_GOOD makes a miss count as good
    load(config("""
    mcp.attach(mcp.CMD_GET, fg("cb", function(rctx, h)
        rctx:handle_set_cb(h[1], function(res, req)
            return mcp.WAIT_GOOD
        end)
        rctx:handle_set_cb(h[2], function(res, req)
            if req:key() == "early" then return mcp.WAIT_ANY, mcp.WAIT_RESUME end
        end)
        return function(r)
            rctx:enqueue(r, h)
            local n = rctx:wait_cond(#h, mcp.WAIT_GOOD)
            local res, mode = rctx:result(h[1])
            return "SERVER_ERROR n=" .. n .. " mode=" .. tostring(mode) .. "\\r\\n"
        end
    end, p.a, p.b))
    """))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    fake.answer("b", MISS)
    assert out == [b"SERVER_ERROR n=1 mode=8\r\n"]
    out = start(engine, b"get early\r\n")
    fake.answer("b", MISS)
    assert out == [b"SERVER_ERROR n=0 mode=nil\r\n"]
    fake.answer("a", MISS)


def test_multiget_runs_the_funcgen_per_key(engine, load):
    load(attach_get("return rctx:enqueue_and_wait(r, h[1])"))
    FakeBackends(engine, {"a": HIT})
    reply = run(engine, b"get k\r\n")
    assert reply == HIT


# -- funcgens as handles -----------------------------------------------------------

SUBS = """
    local direct = fg("direct", function(rctx, h) return function(r)
        return rctx:enqueue_and_wait(r, h[1])
    end end, p.b)
    local text = fg("text", function() return function(r)
        return "SERVER_ERROR text\\r\\n"
    end end)
    local broken = fg("broken", function() return function(r) error("sub boom") end end)
    local parent = mcp.funcgen_new()
    local hs = { parent:new_handle(p.a), parent:new_handle(direct),
                 parent:new_handle(text), parent:new_handle(broken) }
    parent:ready({ n = "parent", f = function(rctx) return function(r)
        local which = tonumber(string.sub(r:key(), 1, 1))
        if which then
            return rctx:enqueue_and_wait(r, hs[which])
        end
        rctx:enqueue(r, hs)
        local n = rctx:wait_cond(#hs, mcp.WAIT_ANY)
        local parts = { "n=" .. n }
        for i = 1, #hs do
            local res, mode = rctx:result(hs[i])
            parts[#parts + 1] = string.format("%d:%s:%s", hs[i], tostring(mode), type(res))
        end
        return "SERVER_ERROR " .. table.concat(parts, " ") .. "\\r\\n"
    end end })
    mcp.attach(mcp.CMD_GET, parent)
"""


def test_a_funcgen_handle_answers_with_its_route(engine, load):
    load(config(SUBS))
    fake = FakeBackends(engine, {"a": MISS, "b": HIT})
    assert run(engine, b"get 2k\r\n") == HIT
    assert fake.sent == [("b", b"get 2k\r\n")]
    assert run(engine, b"get 3k\r\n") == b"SERVER_ERROR text\r\n"
    assert run(engine, b"get 4k\r\n") == errors.BACKEND_FAILURE


def test_funcgen_handles_in_one_wait(engine, load):
    # a string answer is RES_ANY and returned as the string, as in memcached
    load(config(SUBS))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    assert out == []
    fake.answer("b", HIT)
    assert out == []
    fake.answer("a", MISS)
    assert out == [b"SERVER_ERROR n=4 0:16:table 1:8:table 2:32:string 3:32:table\r\n"]


# -- routers ---------------------------------------------------------------------

ROUTER = """
    local function static(text)
        return fg(text, function() return function(r)
            return "SERVER_ERROR " .. text .. "\\r\\n"
        end end)
    end
    local map = {
        one = static("one"),
        two = static("two"),
        cmd = { [mcp.CMD_MG] = static("cmd-mg") },
        cmdany = { [mcp.CMD_MG] = static("cmdany-mg"), [mcp.CMD_ANY_STORAGE] = static("cmdany") },
    }
"""


def router_config(options: str, default: bool = False) -> str:
    extra = ', default = static("default")' if default else ""
    return config(ROUTER + f"""
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({{ map = map{extra}, {options} }}))
    """)


def answer(engine, key: bytes, command: bytes = b"get") -> bytes:
    return run(engine, command + b" " + key + b"\r\n")


START_FAILURE = b"SERVER_ERROR lua start failure\r\n"


@pytest.mark.parametrize(("options", "cases"), [
    # memcached 1.6.45 (tests/e2e/test_v2_differential.py asks it the same)
    ('mode = "prefix"', {b"one/x": b"one", b"two/": b"two", b"one": None, b"/one": None,
                         b"three/x": None, b"onex/y": None}),
    ('mode = "prefix", stop = "|"', {b"one|x": b"one", b"one/x": None}),
    ('mode = "prefix", stop = "+#+"', {b"one+#+x": b"one", b"two+#+": None, b"one+x": None}),
    ('mode = "anchor"', {b"/one/x": b"one", b"one/x": None, b"/two/": b"two"}),
    ('mode = "anchor", start = "_", stop = ","', {b"_one,x": b"one", b"one,x": None}),
    ('mode = "anchor", start = "=?=", stop = "__"', {b"=?=one__x": b"one", b"=?=two__": None,
                                                     b"one__x": None}),
    ("", {b"one/x": b"one"}),
])
def test_router_modes(engine, load, options, cases):
    load(router_config(options))
    for key, want in cases.items():
        expected = START_FAILURE if want is None else b"SERVER_ERROR " + want + b"\r\n"
        assert answer(engine, key) == expected, key
    load(router_config(options, default=True))
    for key, want in cases.items():
        assert answer(engine, key) == b"SERVER_ERROR " + (want or b"default") + b"\r\n", key


def test_router_command_maps(engine, load):
    load(router_config('mode = "prefix"', default=True))
    assert run(engine, b"mg cmd/a v\r\n") == b"SERVER_ERROR cmd-mg\r\n"
    assert answer(engine, b"cmd/a") == b"SERVER_ERROR default\r\n"
    assert run(engine, b"mg cmdany/a v\r\n") == b"SERVER_ERROR cmdany-mg\r\n"
    assert answer(engine, b"cmdany/a") == b"SERVER_ERROR cmdany\r\n"


@pytest.mark.parametrize(("options", "message"), [
    ('mode = "bogus"', "unknown type passed to mcp.router_new"),
    ('mode = "anchor", start = "/"', "must specify start and stop if mode is anchor"),
    ('mode = "prefix", stop = ""', "must pass a non-zero length string to stop"),
    ('mode = "prefix", stop = "123456"', "stop is too long in mcp.router_new"),
    ('mode = "prefix", stop = 5', "must pass a string to stop"),
])
def test_router_misuse_fails_the_load(load, options, message):
    with pytest.raises(ConfigError, match=message):
        load(router_config(options))


@pytest.mark.parametrize(("map_text", "message"), [
    ("{ x = 5 }", "unhandled data in router_new map"),
    ('{ x = { a = static("a") } }', "Non integer key in router command map"),
    ('{ x = { [99] = static("a") } }', "Bad command in router command map"),
])
def test_router_bad_maps(load, map_text, message):
    with pytest.raises(ConfigError, match=message):
        load(config(ROUTER + f"mcp.router_new({{ map = {map_text} }})"))


def test_router_to_pools(engine, load):
    load(config("""
    local function direct(pool)
        return fg("direct", function(rctx, h) return function(r)
            return rctx:enqueue_and_wait(r, h[1])
        end end, pool)
    end
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({ map = { a = direct(p.a), b = direct(p.b) } }))
    """))
    fake = FakeBackends(engine, {"a": HIT, "b": b"STORED\r\n"})
    assert run(engine, b"get a/k\r\n") == HIT
    assert run(engine, b"set b/k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert fake.sent == [("a", b"get a/k\r\n"), ("b", b"set b/k 0 0 1\r\nx\r\n")]


def test_v1_and_v2_in_one_config(engine, load):
    load(config("""
    mcp.attach(mcp.CMD_GET, fg("v2", function(rctx, h) return function(r)
        return rctx:enqueue_and_wait(r, h[1])
    end end, p.a))
    mcp.attach(mcp.CMD_SET, function(r) return p.b(r) end)
    """))
    fake = FakeBackends(engine, {"a": HIT, "b": b"STORED\r\n"})
    assert run(engine, b"get k\r\n") == HIT
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert [label for label, _ in fake.sent] == ["a", "b"]


def test_reload_keeps_requests_in_flight_on_their_funcgen(engine, load):
    load(attach_get("local res = rctx:enqueue_and_wait(r, h[1]); "
                    'return "SERVER_ERROR old\\r\\n"'))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    load(attach_get('return "SERVER_ERROR new\\r\\n"'))
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR new\r\n"
    fake.answer("a", MISS)
    assert out == [b"SERVER_ERROR old\r\n"]


def test_pools_are_named_as_mcp_config_pools_named_them(engine, load):
    routes = load(config("""
    mcp.attach(mcp.CMD_GET, fg("t", function(rctx, h) return function(r)
        return rctx:enqueue_and_wait(r, h[1])
    end end, p.b))
    """))
    assert sorted(name for name, _ in routes.pools) == ["a", "b", "c"]


def test_v1_pools_are_still_named_by_what_the_routes_reach(engine, load):
    routes = load(config("local only = p.b\n"
                         "mcp.attach(mcp.CMD_GET, function(r) return only(r) end)"))
    assert [name for name, _ in routes.pools] == ["only"]


def test_best_and_worst_result(engine, load):
    # memcached 1.6.45: the first of the best (worst) answers, by GOOD > OK > ANY
    load(attach_get("""
        rctx:enqueue(r, h)
        rctx:wait_cond(#h, mcp.WAIT_ANY)
        local best, bflag = rctx:best_result(h)
        local worst, wflag = rctx:worst_result(h)
        if r:key() == "best" then return best end
        if r:key() == "worst" then return worst end
        return "SERVER_ERROR " .. tostring(bflag) .. " " .. tostring(wflag) .. "\\r\\n"
    """, "p.a, p.b, p.c"))
    fake = FakeBackends(engine, hold=True)
    for key, answers, want in [
        (b"flags", [MISS, HIT, MISS], b"SERVER_ERROR 8 16\r\n"),
        (b"best", [MISS, b"VALUE best 0 1\r\nb\r\nEND\r\n", b"VALUE best 0 1\r\nc\r\nEND\r\n"],
         b"VALUE best 0 1\r\nb\r\nEND\r\n"),
        (b"worst", [MISS, MISS, MISS], MISS),
    ]:
        out = start(engine, b"get " + key + b"\r\n")
        for label, data in zip("abc", answers, strict=True):
            fake.answer(label, data)
        assert out == [want], key
    out = start(engine, b"get flags\r\n")
    fake.answer("a", MISS)
    fake.answer("b", HIT)
    _, callback = fake.pending.pop()
    callback(Response.failure("test"))
    assert out == [b"SERVER_ERROR 8 32\r\n"]


# -- README's worked example ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "v2.lua"


def test_readme_shows_the_example_as_it_is():
    readme = (ROOT / "README.rst").read_text()
    section = readme.split("\nRoute API V2\n", 1)[1].split("\nRoute library and cookbook\n", 1)[0]
    shown = []
    for line in section.split(".. code-block:: lua\n\n", 1)[1].splitlines():
        if line.strip() and not line.startswith("    "):
            break  # the first line of text after the block
        shown.append(line[4:])
    shown = "\n".join(shown)
    assert "examples/v2.lua" in section
    assert shown.strip() == EXAMPLE.read_text().strip()


def test_the_example_routes(engine):
    engine.load(str(EXAMPLE))
    fake = FakeBackends(engine, {"near": MISS, "far": HIT})
    assert run(engine, b"get repl/k\r\n") == HIT  # near missed
    assert [label for label, _ in fake.sent] == ["near", "far"]
    fake.sent.clear()
    fake.replies = {"near": b"STORED\r\n", "far": b"STORED\r\n"}
    assert run(engine, b"set repl/k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert sorted(label for label, _ in fake.sent) == ["far", "near"]
    fake.sent.clear()
    fake.replies = {"near": HIT}
    assert run(engine, b"get main/k\r\n") == HIT
    assert fake.sent == [("near", b"get main/k\r\n")]
    assert run(engine, b"get other/k\r\n") == b"SERVER_ERROR no route\r\n"


# -- the direct path ------------------------------------------------------------

DIRECT = POOLS + """
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    local handle = fgen:new_handle(p.b)
    fgen:ready({ n = "direct", a = handle, f = function(rctx, h)
        %s
    end })
    mcp.attach(mcp.CMD_ANY_STORAGE, fgen)
end
"""

RETURNS = "return function(r) return rctx:enqueue_and_wait(r, h) end"


def test_a_direct_funcgen_declares_the_direct_shape(engine, load):
    routes = load(DIRECT % RETURNS)
    assert routes.shapes[rq.CMD_GET].kind == "direct"
    assert routes.direct.plain_runs is True
    fake = FakeBackends(engine, {"b": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.sent == [("b", b"get k\r\n")]


@pytest.mark.parametrize("body", [
    "rctx:handle_set_cb(h, function() end)\n" + RETURNS,
    "return function(r) return rctx:enqueue_and_wait(r, h) or 1 end",
    "return function(r) local res = rctx:enqueue_and_wait(r, h); return res end",
    "return function(r) mcp.stat(1, 1) return rctx:enqueue_and_wait(r, h) end",
    "local other = h\nreturn function(r) return rctx:enqueue_and_wait(other, h) end",
    "return function(r) -- a comment\n return rctx:enqueue_and_wait(r, h) end",
    "return function(r) return rctx:enqueue_and_wait(r, h) end, function() end",
])
def test_anything_else_runs_in_lua(load, body):
    routes = load(DIRECT % body)
    assert routes.shapes[rq.CMD_GET].kind == "lua"
    assert rq.CMD_GET not in routes.direct.pools


@pytest.mark.parametrize("requests", [
    [b"get k\r\n", b"set k 0 0 1\r\n", b"delete k\r\n", b"mg k v\r\n", b"incr k 1\r\n"],
])
@pytest.mark.parametrize("reply", [HIT, MISS, b"SERVER_ERROR busy\r\n", b"STORED\r\n"])
def test_direct_and_lua_give_the_same_bytes(tmp_path, requests, reply):
    results = []
    for direct in (True, False):
        stats = ProxyStats()
        engine = RouteEngine(stats, BackendRegistry(stats, reactor=MemoryReactorClock()),
                             Tunables(), UserStats())
        engine.direct_routes = direct
        path = tmp_path / f"direct-{direct}.lua"
        path.write_text(DIRECT % RETURNS)
        engine.load(str(path))
        FakeBackends(engine, {"b": reply})
        results.append([run(engine, line, b"x\r\n" if line.startswith(b"set") else None)
                        for line in requests])
    assert results[0] == results[1]


def test_the_differential_configs_direct_funcgen_runs_without_lua(engine, monkeypatch):
    for name in ("V2_A", "V2_B", "V2_DOWN"):
        monkeypatch.setenv(name, "1")
    routes = engine.load(str(ROOT / "tests" / "e2e" / "v2" / "routes.lua"))
    assert {command: routes.shapes[command].kind
            for command in (rq.CMD_GAT, rq.CMD_INCR, rq.CMD_GET)} == {
        rq.CMD_GAT: "direct", rq.CMD_INCR: "direct", rq.CMD_GET: "router"}


def test_a_route_error_names_its_funcgen(engine, load):
    load(config("""
    mcp.attach(mcp.CMD_GET, fg("named", function() return function(r) error("boom") end end))
    """))
    with capturedLogs() as events:
        assert run(engine, b"get k\r\n") == errors.LUA_FAILURE
    [error] = [event["error"] for event in events if event.get("type") == "proxy_error"]
    assert error.startswith("funcgen named: ") and error.endswith("boom")
