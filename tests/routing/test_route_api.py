"""The route API (mcp-api.md sections 1.5-1.12 and 6): each function and
method, its results and its error messages, on a network-free engine."""

from __future__ import annotations

import pytest

from mcproxy.wire import errors
from tests.enginekit import FakeBackends, run, start

THREE_POOLS = """
function mcp_config_pools()
    return {
        z1 = mcp.pool({ mcp.backend("z1", "127.0.0.1", "1") }),
        z2 = mcp.pool({ mcp.backend("z2", "127.0.0.1", "2") }),
        z3 = mcp.pool({ mcp.backend("z3", "127.0.0.1", "3") }),
    }
end
"""

HIT = b"VALUE k 0 1\r\nx\r\nEND\r\n"
MISS = b"END\r\n"


def routes(body: str) -> str:
    """A config over THREE_POOLS whose GET route is ``body``."""
    return THREE_POOLS + f"""
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, function(r)
{body}
    end)
    mcp.attach(mcp.CMD_SET, function(r) return p.z1(r) end)
end
"""


def describe(results_var: str = "res") -> str:
    """Lua that renders a list of responses as 'n:hit,hit,...'."""
    return f"""
        local out = {{}}
        for i, x in ipairs({results_var}) do out[i] = tostring(x:hit()) end
        return #{results_var} .. ":" .. table.concat(out, ",") .. "\\r\\n"
    """


# -- mcp.await ---------------------------------------------------------------

def test_await_all_good(engine, load):
    load(routes("local res = mcp.await(r, { p.z1, p.z2, p.z3 })" + describe()))
    fake = FakeBackends(engine, {"z1": HIT, "z2": MISS, "z3": HIT})
    assert run(engine, b"get k\r\n") == b"3:true,false,true\r\n"
    assert sorted(label for label, _ in fake.sent) == ["z1", "z2", "z3"]


def test_await_key_value_pool_table(engine, load):
    load(routes("local res = mcp.await(r, p)" + describe()))
    FakeBackends(engine, {"z1": HIT, "z2": HIT, "z3": HIT})
    assert run(engine, b"get k\r\n") == b"3:true,true,true\r\n"


def test_await_results_in_arrival_order_and_early_completion(engine, load):
    load(routes("""
        local res = mcp.await(r, { p.z1, p.z2, p.z3 }, 1)
        local labels = {}
        for i, x in ipairs(res) do labels[i] = x:line() end
        return table.concat(labels, ",") .. "\\r\\n"
    """))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("z3", b"END\r\n")
    fake.answer("z2", b"VALUE k 0 1\r\nb\r\nEND\r\n")
    assert out == [b"END,VALUE k 0 1\r\n"]
    fake.answer("z1", b"VALUE k 0 1\r\na\r\nEND\r\n")  # late: dropped quietly
    assert out == [b"END,VALUE k 0 1\r\n"]
    assert engine.stats.req_active == 0


@pytest.mark.parametrize("mode, replies, expected", [
    ("AWAIT_ANY", {"z1": MISS, "z2": MISS, "z3": MISS}, b"2:false,false\r\n"),
    ("AWAIT_OK", {"z1": MISS, "z2": MISS, "z3": MISS}, b"2:false,false\r\n"),
    ("AWAIT_GOOD", {"z1": MISS, "z2": MISS, "z3": HIT}, b"3:false,false,true\r\n"),
    ("AWAIT_FIRST", {"z1": MISS, "z2": HIT, "z3": HIT}, b"1:false\r\n"),
])
def test_await_modes(engine, load, mode, replies, expected):
    load(routes(f"local res = mcp.await(r, {{ p.z1, p.z2, p.z3 }}, 2, mcp.{mode})"
                + describe()))
    FakeBackends(engine, replies)
    assert run(engine, b"get k\r\n") == expected


def test_await_ok_counts_only_ok(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r)
            local res = mcp.await(r, { p.z1, p.z2, p.z3 }, 1, mcp.AWAIT_OK)
            return #res .. ":" .. tostring(res[#res]:ok()) .. "\\r\\n"
        end)
    end
    """)
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.pending.pop(0)[1](fake.parse(b"SERVER_ERROR x\r\n"))
    assert out == [b"1:true\r\n"]  # a backend error line is still an ok response


def test_await_fastgood_returns_on_first_hit(engine, load):
    load(routes("local res = mcp.await(r, { p.z1, p.z2, p.z3 }, 3, mcp.AWAIT_FASTGOOD)"
                + describe()))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("z2", MISS)
    assert out == []
    fake.answer("z3", HIT)
    assert out == [b"2:false,true\r\n"]


def test_await_background_returns_at_once(engine, load):
    load(routes("""
        local res = mcp.await(r, { p.z2, p.z3 }, 0, mcp.AWAIT_BACKGROUND)
        if #res ~= 0 then return "BAD\\r\\n" end
        return p.z1(r)
    """))
    fake = FakeBackends(engine, {"z1": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert sorted(label for label, _ in fake.sent) == ["z1", "z2", "z3"]


def test_several_awaits_and_pool_calls_in_one_route(engine, load):
    load(routes("""
        local a = p.z1(r)
        local b = mcp.await(r, { p.z2, p.z3 })
        local c = mcp.await(r, { p.z1 }, 1, mcp.AWAIT_ANY)
        return tostring(a:hit()) .. #b .. #c .. "\\r\\n"
    """))
    FakeBackends(engine, {"z1": HIT})
    assert run(engine, b"get k\r\n") == b"true21\r\n"


@pytest.mark.parametrize("call, message", [
    ("mcp.await(r, {})", "mcp.await arguments must have at least one pool"),
    ("mcp.await(r, { 1 })", "mcp.await must be supplied with a pool"),
    ("mcp.await(r, p.z1)", "mcp.await must be supplied with a pool"),
    ("mcp.await(r, { p.z1 }, 1, 99)", "invalid type argument tp mcp.await"),
    ("mcp.await('x', { p.z1 })", "mcp.await must be passed a request object"),
    ("p.z1('x')", "pool must be passed a request object"),
    ("r:token('x')", "token: index must be an integer"),
    ("r:ltrimkey(5)", "ltrimkey cannot zero out key"),
    ("r:rtrimkey(5)", "rtrimkey cannot zero out key"),
    ("r:has_flag('ab')", "has_flag(): meta flag must be a single character"),
    ("r:has_flag('1')", "has_flag(): invalid flag, must be A-Z,a-z"),
    ("mcp.request('get k')", "request must end with \\r\\n"),
    ("mcp.request('bogus k\\r\\n')", "failed to parse request"),
    ("mcp.request(string.rep('k', 501) .. '\\r\\n')", "request length too long"),
    ("mcp.request('set k 0 0 1\\r\\n', 'x')",
     "value passed to mcp.request must end with \\r\\n"),
    ("mcp.request('set k 0 0 1\\r\\n', 'xyz\\r\\n')",
     "mcp.request: value length does not match the request"),
    ("mcp.request('set k 0 0 1\\r\\n')", "mcp.request: storage request needs a value"),
    ("mcp.backend('a', 'h', 1)", "mcp.backend can only be called from mcp_config_pools"),
    ("mcp.pool({})", "mcp.pool can only be called from mcp_config_pools"),
    ("mcp.add_stat(1, 'x')", "mcp.add_stat can only be called from mcp_config_pools"),
    ("mcp.stat(1, 1)", "no stats counters initialized"),
    ("mcp.backend_failure_limit(-1)", "backend_failure_limit must be >= 0"),
])
def test_misuse_in_a_route_is_a_lua_failure(engine, load, call, message, caplog):
    load(routes(f"{call}\nreturn 'NOT REACHED\\r\\n'"))
    FakeBackends(engine)
    errors_seen = []
    engine._route_error = lambda req, msg: errors_seen.append(msg.decode())
    assert run(engine, b"get abc\r\n") == errors.LUA_FAILURE
    [seen] = errors_seen
    assert message in seen


def test_keyless_request_cannot_be_routed(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_VERSION, function(r) return p.z1(r) end)
    end
    """)
    seen = []
    engine._route_error = lambda req, msg: seen.append(msg)
    assert run(engine, b"version\r\n") == errors.LUA_FAILURE
    assert b"cannot route commands without key" in seen[0]


# -- mcp.request and request methods -----------------------------------------

def test_request_built_in_a_route_is_sent_and_awaited(engine, load):
    load(routes("""
        local nr = mcp.request("set " .. r:key() .. " 0 0 2\\r\\n", "hi\\r\\n")
        local res = mcp.await(nr, { p.z1, p.z2 })
        return #res .. "\\r\\n"
    """))
    fake = FakeBackends(engine, {"z1": b"STORED\r\n", "z2": b"STORED\r\n"})
    assert run(engine, b"get newkey\r\n") == b"2\r\n"
    assert fake.sent == [("z1", b"set newkey 0 0 2\r\nhi\r\n"),
                         ("z2", b"set newkey 0 0 2\r\nhi\r\n")]


def test_request_value_from_a_response(engine, load):
    load(routes("""
        local res = p.z1(r)
        local copy = mcp.request("set " .. r:key() .. " 0 0 " .. res:vlen() .. "\\r\\n", res)
        return p.z2(copy)
    """))
    fake = FakeBackends(engine, {"z1": b"VALUE k 0 5\r\nhello\r\nEND\r\n",
                                 "z2": b"STORED\r\n"})
    assert run(engine, b"get k\r\n") == b"STORED\r\n"
    assert fake.sent[1] == ("z2", b"set k 0 0 5\r\nhello\r\n")


def test_request_methods(engine, load):
    load(routes("""
        local t = {}
        t[#t+1] = r:command()
        t[#t+1] = r:key()
        t[#t+1] = r:ntokens()
        t[#t+1] = r:token(1)
        t[#t+1] = tostring(r:token(9))
        t[#t+1] = tostring(r:token())
        return table.concat(t, "|") .. "\\r\\n"
    """))
    assert run(engine, b"get mykey\r\n") == b"7|mykey|2|get|nil|nil\r\n"


def test_token_replace_renders_the_request(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_SET, function(r)
            r:token(4, "999")
            return p.z1(r)
        end)
        mcp.attach(mcp.CMD_TOUCH, function(r)
            r:token(2, "other")
            return p.z1(r)
        end)
    end
    """)
    fake = FakeBackends(engine, {"z1": b"STORED\r\n"})
    assert run(engine, b"set k 5 0 2\r\n", b"hi\r\n") == b"STORED\r\n"
    assert fake.sent[0] == ("z1", b"set k 5 999 2\r\nhi\r\n")
    run(engine, b"touch k 10\r\n")
    assert fake.sent[1] == ("z1", b"touch other 10\r\n")


def test_token_edit_cannot_change_the_payload_length(engine, load):
    """A line that declared another length than its payload would make
    the backend read the next request as payload: the edit is a Lua error."""
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_SET, function(r)
            r:token(5, "10")
            return p.z1(r)
        end)
    end
    """)
    fake = FakeBackends(engine, {"z1": b"STORED\r\n"})
    assert run(engine, b"set k 5 0 2\r\n", b"hi\r\n") == errors.LUA_FAILURE
    assert fake.sent == []


def test_token_int(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_SET, function(r)
            return tostring(r:token_int(3)) .. tostring(r:token_int(2)) .. "\\r\\n"
        end)
    end
    """)
    assert run(engine, b"set k 42 0 1\r\n", b"x\r\n") == b"42nil\r\n"


def test_trim_key_changes_routing_key_and_wire(engine, load):
    load(routes("""
        r:ltrimkey(4)
        r:rtrimkey(2)
        return p.z1(r)
    """))
    fake = FakeBackends(engine, {"z1": MISS})
    run(engine, b"get pfx/keyXX\r\n")
    assert fake.sent == [("z1", b"get key\r\n")]


def test_meta_flags(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_MG, function(r)
            local t = { tostring(r:has_flag("v")), tostring(r:has_flag("k")) }
            local found, tok = r:flag_token("T")
            t[#t+1] = tostring(found) .. "=" .. tostring(tok)
            found, tok = r:flag_token("v")
            t[#t+1] = tostring(found) .. "=" .. tostring(tok)
            found = r:flag_token("O", "Onew")
            t[#t+1] = tostring(found)
            local res = p.z1(r)
            return table.concat(t, " ") .. "\\r\\n"
        end)
    end
    """)
    fake = FakeBackends(engine, {"z1": b"EN\r\n"})
    assert run(engine, b"mg k v T30 Oold\r\n") == b"true false true=30 true=nil true\r\n"
    assert fake.sent == [("z1", b"mg k v T30 Onew\r\n")]


# -- responses ---------------------------------------------------------------

def test_response_methods(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_MG, function(r)
            local res = p.z1(r)
            return table.concat({ tostring(res:ok()), tostring(res:hit()), res:code(),
                                  res:vlen(), tostring(res:line()),
                                  math.type(res:elapsed()) }, "|") .. "\\r\\n"
        end)
    end
    """)
    FakeBackends(engine, {"z1": b"VA 2 t-1 f5\r\nhi\r\n"})
    assert run(engine, b"mg k v\r\n") == b"true|true|15|2|t-1 f5|integer\r\n"


def test_response_code_constants(engine, load):
    load(routes("""
        local res = p.z1(r)
        return tostring(res:code() == mcp.MCMC_CODE_END) .. tostring(mcp.MCMC_CODE_STORED)
            .. "\\r\\n"
    """))
    FakeBackends(engine)
    assert run(engine, b"get k\r\n") == b"true8\r\n"


def test_failed_response(engine, load):
    load(routes("""
        local res = p.z1(r)
        return tostring(res:ok()) .. tostring(res:hit()) .. tostring(res:line()) .. "\\r\\n"
    """))
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"get k\r\n")
    from mcproxy.wire.response import Response
    fake.pending.pop()[1](Response.failure("timeout"))
    assert out == [b"falsefalsenil\r\n"]


# -- internal cache, logging, time, stats, limits ------------------------------

def test_internal_cache(engine, load):
    load(THREE_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_SET, function(r) return mcp.internal(r) end)
        mcp.attach(mcp.CMD_GET, function(r)
            local res = mcp.internal(r)
            if res:hit() then return res end
            return p.z1(r)
        end)
    end
    """)
    fake = FakeBackends(engine, {"z1": b"VALUE far 0 1\r\nf\r\nEND\r\n"})
    assert run(engine, b"set near 0 0 1\r\n", b"n\r\n") == b"STORED\r\n"
    assert run(engine, b"get near\r\n") == b"VALUE near 0 1\r\nn\r\nEND\r\n"
    assert run(engine, b"get far\r\n") == b"VALUE far 0 1\r\nf\r\nEND\r\n"
    assert [label for label, _ in fake.sent] == ["z1"]


def test_time_functions(engine, load):
    import time
    load(routes("return mcp.time_real_millis() .. ' ' .. mcp.time_mono_millis() .. '\\r\\n'"))
    real, mono = run(engine, b"get k\r\n").split()
    assert abs(int(real) - time.time() * 1000) < 5000
    assert abs(int(mono) - time.monotonic() * 1000) < 5000


def test_log_functions(engine, load):
    from twisted.logger import globalLogPublisher
    load(routes("""
        local res = p.z1(r)
        mcp.log("user message")
        mcp.log_req(r, res, "detail")
        mcp.log_reqsample(0, 0, true, r, res, "sampled")
        return res
    """))
    FakeBackends(engine)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run(engine, b"get k\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    kinds = [(e.get("type"), e.get("msg") or e.get("detail")) for e in events]
    assert ("proxy_user", "user message") in kinds
    assert ("proxy_req", "detail") in kinds
    assert ("proxy_req", "sampled") not in kinds  # ok response, no sampling


def test_active_request_limit(engine, load):
    load(THREE_POOLS + """
    mcp.active_req_limit(2)
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return p.z1(r) end)
    end
    """)
    fake = FakeBackends(engine, hold=True)
    first, second, third = (start(engine, b"get k%d\r\n" % i) for i in range(3))
    assert third == [errors.ACTIVE_REQUEST_LIMIT]
    fake.answer("z1", MISS)
    assert first == [b"END\r\n"]
    assert start(engine, b"get k\r\n") == []


def test_tunables_reach_new_backends(engine, load):
    routes_ = load("""
    function mcp_config_pools()
        mcp.backend_connect_timeout(1.5)
        mcp.backend_read_timeout(0.25)
        mcp.backend_retry_timeout(7)
        mcp.backend_failure_limit(9)
        mcp.tcp_keepalive(true)
        mcp.backend_depth_limit(100)
        return mcp.pool({ mcp.backend("t", "127.0.0.1", "1") })
    end
    function mcp_config_routes() end
    """)
    options = routes_.backends[0].options
    assert (options.connect_timeout, options.read_timeout, options.retry_timeout,
            options.failure_limit, options.keepalive, options.depth_limit) == (
        1.5, 0.25, 7, 9, True, 100)


@pytest.mark.parametrize(("body", "reply"), [
    # a to-be-closed response the route does not return: closed at the end
    ('local res <close> = p.z1(r)\nreturn "got " .. res:vlen() .. "\\r\\n"', b"got 2\r\n"),
    ("local res = p.z1(r)\nres:close()\nres:close()\nreturn \"END\\r\\n\"", b"END\r\n"),
    # returned once closed (also by <close> at return): a bad response,
    # where memcached 1.6.45 sends nothing
    ("local res <close> = p.z1(r)\nreturn res", errors.BAD_RESPONSE),
    ("local res = p.z1(r)\nres:close()\nreturn res", errors.BAD_RESPONSE),
    ("local res = p.z1(r)\nres:close()\nreturn mcp.request(\"set k 0 0 2\\r\\n\", res)",
     errors.LUA_FAILURE),
])
def test_response_close(engine, load, body, reply):
    load(routes(body))
    FakeBackends(engine, {"z1": b"VALUE k 0 2\r\nhi\r\nEND\r\n"})
    assert run(engine, b"get k\r\n") == reply
