"""flush_all (and verbosity) through routes: parsing, the reply check, the
default broadcast to every backend, attached routes, and routes.broadcast."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.response import BackendProtocolError, Response, check_reply
from tests.enginekit import FakeBackends, run, start
from tests.server.memorycore import MemoryCore

#: Three backends, b in both pools; keys are routed to "one".
POOLS = """
function mcp_config_pools()
    local a = mcp.backend("a", "127.0.0.1", "1")
    local b = mcp.backend("b", "127.0.0.1", "2")
    local c = mcp.backend("c", "127.0.0.1", "3")
    return { one = mcp.pool({ a, b }), two = mcp.pool({ b, c }) }
end
"""

KEYS_TO_ONE = POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p.one(r) end)
end
"""

ALL_OK = {"a": b"OK\r\n", "b": b"OK\r\n", "c": b"OK\r\n"}


def flushes(fake: FakeBackends) -> list[tuple[str, bytes]]:
    return [(label, line) for label, line in fake.sent if line.startswith(b"flush_all")]


# -- parsing and the reply check -------------------------------------------

#: line -> (noreply, the line a backend gets)
NOREPLY_CASES = {
    b"flush_all\r\n": (False, b"flush_all\r\n"),
    b"flush_all 2\r\n": (False, b"flush_all 2\r\n"),
    b"flush_all noreply\r\n": (True, b"flush_all\r\n"),
    b"flush_all 2 noreply\r\n": (True, b"flush_all 2\r\n"),
    # the backend must never see a noreply it would obey
    b"flush_all noreply noreply\r\n": (True, b"flush_all\r\n"),
    # too many tokens: memcached answers ERROR, noreply or not
    b"flush_all 1 2 noreply\r\n": (False, b"flush_all 1 2 noreply\r\n"),
    b"verbosity 1 noreply\r\n": (True, b"verbosity 1\r\n"),
}


def test_noreply_is_read_and_removed():
    got = {}
    for line in NOREPLY_CASES:
        req = rq.parse_request(line)
        got[line] = (req.noreply, req.wire_line())
    assert got == NOREPLY_CASES


def test_reply_check_takes_ok_and_errors_only():
    req = rq.parse_request(b"flush_all\r\n")
    check_reply(req, FakeBackends.parse(b"OK\r\n"))
    check_reply(req, FakeBackends.parse(b"CLIENT_ERROR bad command line format\r\n"))
    for reply in (b"STORED\r\n", b"END\r\n", b"DELETED\r\n", b"HD\r\n"):
        with pytest.raises(BackendProtocolError):
            check_reply(req, FakeBackends.parse(reply))


def test_flush_all_is_attachable():
    assert rq.CMD_FLUSH_ALL not in rq.LOCAL_ONLY_COMMANDS
    assert rq.CMD_FLUSH_ALL in rq.BROADCAST_COMMANDS


# -- the default: every backend of every pool ----------------------------------

def test_default_sends_to_every_backend_once(engine, load):
    load(KEYS_TO_ONE)
    assert engine.hooked(rq.CMD_FLUSH_ALL)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all\r\n") == b"OK\r\n"
    assert sorted(flushes(fake)) == [("a", b"flush_all\r\n"), ("b", b"flush_all\r\n"),
                                     ("c", b"flush_all\r\n")]
    assert engine.stats.req_active == 0


def test_default_passes_the_delay_on(engine, load):
    load(KEYS_TO_ONE)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all 2\r\n") == b"OK\r\n"
    assert {line for _, line in flushes(fake)} == {b"flush_all 2\r\n"}


def test_default_waits_for_every_backend(engine, load):
    load(KEYS_TO_ONE)
    fake = FakeBackends(engine, hold=True)
    out = start(engine, b"flush_all\r\n")
    fake.answer("a", b"OK\r\n")
    fake.answer("c", b"OK\r\n")
    assert out == []
    fake.answer("b", b"OK\r\n")
    assert out == [b"OK\r\n"]


def test_default_noreply_answers_nothing(engine, load):
    load(KEYS_TO_ONE)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all noreply\r\n") == b""
    assert {line for _, line in flushes(fake)} == {b"flush_all\r\n"}


@pytest.mark.parametrize("line", [b"flush_all\r\n", b"flush_all noreply\r\n"])
def test_default_counts_the_backends_that_failed(engine, load, line):
    load(KEYS_TO_ONE)
    FakeBackends(engine, {"a": b"OK\r\n", "b": b"SERVER_ERROR busy\r\n"})
    # c fails as a backend marked bad does
    [c] = [b for b in engine.registry.live if b.label == "c"]
    c.send = lambda req, callback: callback(Response.failure("markedbad"))
    reply = run(engine, line)
    assert reply == errors.BROADCAST_FAILED % (2, 3, b"flush")
    assert reply == b"SERVER_ERROR 2 of 3 backends failed to flush\r\n"


def test_default_gives_memcached_answer_to_a_bad_line(engine, load):
    load(KEYS_TO_ONE)
    bad = b"CLIENT_ERROR bad command line format\r\n"
    FakeBackends(engine, {"a": bad, "b": bad, "c": bad})
    assert run(engine, b"flush_all x\r\n") == bad


def test_default_flushes_the_embedded_cache_too(engine, load):
    load(KEYS_TO_ONE)
    FakeBackends(engine, ALL_OK)
    store = engine.store
    store.execute(_stored(b"set k 0 0 1\r\n", b"v\r\n"))
    assert run(engine, b"flush_all\r\n") == b"OK\r\n"
    assert store.execute(rq.parse_request(b"get k\r\n")) == b"END\r\n"


def test_default_without_pools_flushes_the_cache(engine, load):
    load("""
    function mcp_config_pools() return {} end
    function mcp_config_routes()
        mcp.attach(mcp.CMD_GET, function(r) return mcp.internal(r) end)
    end
    """)
    engine.store.execute(_stored(b"set k 0 0 1\r\n", b"v\r\n"))
    assert run(engine, b"flush_all\r\n") == b"OK\r\n"
    assert run(engine, b"get k\r\n") == b"END\r\n"


def test_cmd_any_leaves_flush_all_to_the_default(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY, function(r) return "X\\r\\n" end)
    end
    """)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all\r\n") == b"OK\r\n"
    assert len(flushes(fake)) == 3


def test_verbosity_is_answered_locally(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY, function(r) return p.one(r) end)
    end
    """)
    assert not engine.hooked(rq.CMD_VERBOSITY)


# -- attached routes -------------------------------------------------------------

def test_refusal_route(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_FLUSH_ALL, function(r)
            return "SERVER_ERROR flush_all disabled\\r\\n"
        end)
    end
    """)
    fake = FakeBackends(engine, ALL_OK)
    assert client(engine, b"flush_all\r\nflush_all noreply\r\n") == (
        b"SERVER_ERROR flush_all disabled\r\n" * 2)
    assert fake.sent == []


def test_client_connection_routes_flush_all_and_answers_verbosity(engine, load):
    load(KEYS_TO_ONE)
    fake = FakeBackends(engine, ALL_OK)
    assert client(engine, b"flush_all\r\nverbosity 1\r\nflush_all noreply\r\n") == (
        b"OK\r\nOK\r\n")
    assert len(flushes(fake)) == 6


@pytest.mark.parametrize("direct", [True, False], ids=["direct path", "lua"])
def test_pool_call_sends_to_every_backend_of_the_pool(engine, load, direct):
    engine.direct_routes = direct
    routes = load(POOLS + """
    local routes = require("mcproxy.routes")
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_FLUSH_ALL, routes.direct(p.two))
    end
    """)
    assert (rq.CMD_FLUSH_ALL in routes.direct.pools) is direct
    fake = FakeBackends(engine, {"b": b"OK\r\n", "c": b"OK\r\n"})
    assert run(engine, b"flush_all 5\r\n") == b"OK\r\n"
    assert sorted(flushes(fake)) == [("b", b"flush_all 5\r\n"), ("c", b"flush_all 5\r\n")]
    # other keyless commands have no backend to go to
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_VERSION, function(r) return p.one(r) end)
    end
    """)
    assert run(engine, b"version\r\n") == errors.LUA_FAILURE


def test_route_sees_the_combined_response(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_FLUSH_ALL, function(r)
            local res = p.one(r)
            return tostring(res:ok()) .. "\\r\\n"
        end)
    end
    """)
    FakeBackends(engine, {"a": b"OK\r\n", "b": b"SERVER_ERROR x\r\n"})
    assert run(engine, b"flush_all\r\n") == b"false\r\n"


def test_await_sends_once_to_a_backend_in_several_pools(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_FLUSH_ALL, function(r)
            local results = mcp.await(r, { p.one, p.two })
            return #results .. " " .. results[1]:line() .. "\\r\\n"
        end)
    end
    """)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all\r\n") == b"1 OK\r\n"
    assert sorted(label for label, _ in flushes(fake)) == ["a", "b", "c"]


def test_routes_broadcast(engine, load):
    load(POOLS + """
    local routes = require("mcproxy.routes")
    function mcp_config_routes(p)
        routes.bind(p)
        mcp.attach(mcp.CMD_FLUSH_ALL, routes.broadcast{ "one", "two" })
        mcp.attach(mcp.CMD_VERBOSITY, routes.broadcast("two"))
    end
    """)
    fake = FakeBackends(engine, ALL_OK)
    assert run(engine, b"flush_all\r\n") == b"OK\r\n"
    assert sorted(label for label, _ in flushes(fake)) == ["a", "b", "c"]
    assert run(engine, b"verbosity 1\r\n") == b"OK\r\n"
    assert sorted(fake.sent[3:]) == [("b", b"verbosity 1\r\n"), ("c", b"verbosity 1\r\n")]
    fake.replies["a"] = b"SERVER_ERROR x\r\n"
    assert run(engine, b"flush_all\r\n") == b"SERVER_ERROR 1 of 3 backends failed to flush\r\n"
    assert run(engine, b"verbosity 1\r\n") == b"OK\r\n"
    fake.replies["c"] = b"SERVER_ERROR x\r\n"
    assert run(engine, b"verbosity 1\r\n") == (
        b"SERVER_ERROR 1 of 2 backends failed to set verbosity\r\n")


def test_routes_broadcast_of_a_keyed_command(engine, load):
    load(POOLS + """
    local routes = require("mcproxy.routes")
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_DELETE, routes.broadcast{ p.one, p.two })
    end
    """)
    fake = FakeBackends(engine, {"a": b"DELETED\r\n", "b": b"DELETED\r\n",
                                 "c": b"DELETED\r\n"})
    assert run(engine, b"delete k\r\n") == b"DELETED\r\n"
    assert len(fake.sent) == 2


def _stored(line: bytes, value: bytes) -> rq.Request:
    req = rq.parse_request(line)
    req.value = value
    return req


def client(engine, data: bytes) -> bytes:
    """What a client connection to a proxy running ``engine`` gets for ``data``."""
    proto = ProxyServerProtocol(MemoryCore(engine, store=engine.store, stats=engine.stats))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(data)
    return transport.value()
