"""The client protocol under each wire behaviour (mcproxy.wire.behaviour),
with the exact bytes memcached's proxies 1.6.15 and 1.6.45 answer
(tests/e2e/test_wire_differential.py asks the real binaries)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from mcproxy import writes
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire import errors
from mcproxy.wire.behaviour import WIRE_1_6_15, WIRE_1_6_45
from mcproxy.wire.request import CMD_VERSION
from tests.server.memorycore import VERSION_LINE, MemoryCore
from tests.server.test_server import ALL, FakeEngine, FakeStore, feed


def connect(wire, hooked=ALL - {CMD_VERSION}):
    """A client of routes that take every command but ``version``."""
    engine = FakeEngine(hooked)
    engine.wire = wire
    core = MemoryCore(engine, store=FakeStore())
    proto = ProxyServerProtocol(core)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, core


def routed_wire(core) -> list[bytes]:
    """What each routed request would send to a backend."""
    return [req.wire() for req, _ in core.router.routed]


# -- error words ----------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, v1, v2", [
    (b"get\r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    (b"get \r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    (b"x\r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    (b"\r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    (b"set k 0 0 -1\r\n", b"SERVER_ERROR parsing request\r\n",
     b"CLIENT_ERROR parsing request\r\n"),
    (b"ms k 18446744073709551617\r\n", b"SERVER_ERROR parsing request\r\n",
     b"CLIENT_ERROR parsing request\r\n"),
    (b"gat 10\r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    (b"mg k 1v\r\n", b"SERVER_ERROR parsing request\r\n", b"CLIENT_ERROR parsing request\r\n"),
    # memcached answers ERROR itself, where 1.6.45's parser refuses them
    (b"incr k\r\n", errors.ERROR, b"CLIENT_ERROR parsing request\r\n"),
    (b"decr k \r\n", errors.ERROR, b"CLIENT_ERROR parsing request\r\n"),
    (b"touch k\r\n", errors.ERROR, b"CLIENT_ERROR parsing request\r\n"),
    (b"incr  1\r\n", errors.ERROR, b"CLIENT_ERROR parsing request\r\n"),
    # memcached's own answers stay memcached's in both
    (b"set a\x00b 0 0 1\r\nx\r\n", errors.BAD_COMMAND_LINE, errors.BAD_COMMAND_LINE),
    (b"get " + b"k" * 251 + b"\r\n", errors.BAD_COMMAND_LINE, errors.BAD_COMMAND_LINE),
    (b"set k 0 0 3\r\nabcdef\r\n",
     b"CLIENT_ERROR bad data chunk\r\nSERVER_ERROR parsing request\r\n",
     b"CLIENT_ERROR bad data chunk\r\nCLIENT_ERROR parsing request\r\n"),
])
def test_refusals_are_worded_as_each_release(request_bytes, v1, v2):
    for wire, want in ((WIRE_1_6_15, v1), (WIRE_1_6_45, v2)):
        proto, transport, core = connect(wire)
        feed(proto, request_bytes + b"version\r\n")
        assert transport.value() == want + VERSION_LINE, wire.name
        assert not transport.disconnecting
        assert core.stats.conn_errors == want.count(b"\r\n") - want.count(b"bad data chunk")


def test_a_long_key_in_a_multiget_is_a_client_error_under_1_6_45():
    line = b"get a " + b"k" * 300 + b" b\r\n"
    for wire, want in ((WIRE_1_6_15, b"SERVER_ERROR key too long\r\n"),
                       (WIRE_1_6_45, b"CLIENT_ERROR key too long\r\n")):
        proto, transport, core = connect(wire)
        feed(proto, line)
        for _req, done in core.router.routed:
            done(b"")  # both misses, key by key
        assert transport.value() == want + b"END\r\n"


# -- what closes ------------------------------------------------------------------

@pytest.mark.parametrize("line, v1", [
    (b"bogus\r\n", errors.ERROR),
    (b"bogus k\r\n", errors.ERROR),
    (b"xy\r\n", errors.ERROR),
    (b"GET k\r\n", errors.ERROR),
    (b"config get cluster\r\n", errors.ERROR),
    (b"g\x00et k\r\n", errors.ERROR),
    (b"\x00get k\r\n", errors.ERROR),
    (b" get k\r\n", errors.ERROR),
    (b"get\tk\r\n", errors.ERROR),
    (b"shutdown\r\n", errors.PARSING_REQUEST),
    (b"slabs reassign 1 2\r\n", errors.PARSING_REQUEST),
    (b"lru_crawler metadump all\r\n", errors.PARSING_REQUEST),
])
def test_an_unknown_command_closes_under_1_6_45(line, v1):
    proto, transport, core = connect(WIRE_1_6_15)
    feed(proto, line + b"version\r\n")
    assert transport.value() == v1 + VERSION_LINE
    assert not transport.disconnecting

    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, line + b"version\r\nget k\r\n")
    assert transport.value() == b""
    assert transport.disconnecting
    assert core.router.routed == []  # nothing after it is read
    assert core.stats.conn_errors == 1
    feed(proto, b"get k\r\n")
    assert core.router.routed == []


def test_a_routed_line_too_long_closes_without_a_reply_under_1_6_45():
    line = b"get " + b"k" * 600 + b"\r\n"
    proto, transport, core = connect(WIRE_1_6_15)
    feed(proto, line)
    assert transport.value() == errors.REQUEST_TOO_LONG and transport.disconnecting
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, line)
    assert transport.value() == b"" and transport.disconnecting


def test_replies_written_before_the_unknown_command_are_delivered():
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, b"get k\r\n")
    [(_, done)] = core.router.routed
    done(b"END\r\n")
    feed(proto, b"bogus\r\n")
    assert transport.value() == b"END\r\n" and transport.disconnecting


@pytest.fixture
def turns(monkeypatch):
    """Writes wait for the end of the reactor turn, as in production (the
    unit tests' conftest writes at once): returns the turn's end."""
    pending = []
    monkeypatch.setattr(writes.batch, "schedule", pending.append)

    def end_turn():
        while pending:
            pending.pop(0)()
    return end_turn


def test_replies_not_yet_written_are_dropped_with_the_connection(turns):
    """As 1.6.45: replies of earlier requests in the same read, and those
    still at the backends, go with the connection."""
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, b"version\r\nget k\r\nbogus\r\n")
    [(_, done)] = core.router.routed
    done(b"END\r\n")  # arrives after the close: dropped
    turns()
    assert transport.value() == b"" and transport.disconnecting


def test_the_behaviour_follows_the_router():
    proto, transport, core = connect(WIRE_1_6_15)
    feed(proto, b"get\r\n")
    core.router.wire = WIRE_1_6_45  # a reload to a V2 config
    feed(proto, b"get\r\n")
    assert transport.value() == errors.PARSING_REQUEST + errors.CLIENT_PARSING_REQUEST


# -- bare LF ------------------------------------------------------------------------

@pytest.mark.parametrize("chunks, forwarded", [
    ([b"get k\n"], [b"get k\r\n"]),
    ([b"get k", b"\n"], [b"get k\r\n"]),
    ([b"get k \n"], [b"get k\r\n"]),  # a trailing space: a multiget, as "get k \r\n"
    ([b"mg k v\n"], [b"mg k v\r\n"]),
    ([b"delete k noreply\n"], [b"delete k\r\n"]),
    ([b"get k\r\nget j\nget i\r\n"], [b"get k\r\n", b"get j\r\n", b"get i\r\n"]),
    # the payload still ends in \r\n: only the line is framed by \n
    ([b"set k 0 0 1\nx\r\n"], [b"set k 0 0 1\r\nx\r\n"]),
    ([b"set k 0 0 1\n", b"x\r\n"], [b"set k 0 0 1\r\nx\r\n"]),
    ([b"set k 0 0 1 noreply\nx\r\n"], [b"set k 0 0 1\r\nx\r\n"]),
    ([b"ms k 1\nx\r\n"], [b"ms k 1\r\nx\r\n"]),
    ([b"get k\r\r\n"], [b"get k\r\r\n"]),  # the \r before \n ends the line, as before
])
def test_a_bare_lf_ends_a_line_under_1_6_45(chunks, forwarded):
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, *chunks)
    assert routed_wire(core) == forwarded
    assert transport.value() == b""


def test_a_bare_lf_line_of_a_multiget_is_split_as_any():
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, b"get a b\n")
    assert routed_wire(core) == [b"get a\r\n", b"get b\r\n"]


@pytest.mark.parametrize("request_bytes, want", [
    # "xy\r" does not either; the "\n" after it is an empty line
    (b"set k 0 0 1\nxy\r\nversion\r\n",
     errors.BAD_DATA_CHUNK + b"CLIENT_ERROR parsing request\r\n" + VERSION_LINE),
    (b"\nversion\r\n", b"CLIENT_ERROR parsing request\r\n" + VERSION_LINE),
    # a line of 3 bytes with its \n is too short, as x\r\n is
    (b"mn\nversion\r\n", b"CLIENT_ERROR parsing request\r\n" + VERSION_LINE),
    (b"ab\nversion\r\n", b"CLIENT_ERROR parsing request\r\n" + VERSION_LINE),
    (b"incr k\nversion\r\n", b"CLIENT_ERROR parsing request\r\n" + VERSION_LINE),
    (b"version\n", VERSION_LINE),
])
def test_what_follows_a_bare_lf_line_under_1_6_45(request_bytes, want):
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, request_bytes)
    assert core.router.routed == []
    assert transport.value() == want


def test_a_bare_lf_is_refused_under_1_6_15():
    proto, transport, core = connect(WIRE_1_6_15)
    feed(proto, b"get k\nset k 0 0 1\nx\r\nversion\r\n")
    assert core.router.routed == []
    assert transport.value() == errors.PARSING_REQUEST * 3 + VERSION_LINE


def test_a_bare_lf_payload_is_a_bad_chunk_and_what_follows_a_command(turns):
    """``x\\n`` is no payload end: the 3 bytes ``x\\nv`` are a bad chunk,
    and ``ersion`` an unknown command, which closes (1.6.45 sends nothing)."""
    proto, transport, core = connect(WIRE_1_6_45)
    feed(proto, b"set k 0 0 1\nx\nversion\r\n")
    turns()
    assert transport.value() == b"" and transport.disconnecting


@pytest.mark.parametrize("line", [
    b"get " + b" ".join(b"k%d" % i for i in range(16385)) + b"\r\n",  # MAX_MULTIGET_KEYS
])
def test_mcproxy_s_own_limits_are_answered_under_both(line):
    """1.6.45 has no such limit (it serves 20,000 keys); mcproxy keeps its
    bound on what one request may hold and says so before it closes."""
    for wire in (WIRE_1_6_15, WIRE_1_6_45):
        proto, transport, core = connect(wire)
        feed(proto, line)
        assert transport.value() == errors.REQUEST_TOO_LONG and transport.disconnecting
