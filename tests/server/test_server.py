"""The client protocol on a StringTransport: framing, ordering, limits."""

from __future__ import annotations

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport

from mcproxy.server.protocol import (
    BINARY_HEADER_WAIT,
    MAX_CLIENT_INFLIGHT,
    ProxyServerProtocol,
)
from mcproxy.wire import errors
from mcproxy.wire.behaviour import WIRE_1_6_15
from mcproxy.wire.request import CMD_GET, CMD_MG, CMD_SET, COMMANDS
from tests.server.memorycore import MemoryCore


class FakeEngine:
    """Records routed requests; tests answer them by hand, in any order."""

    def __init__(self, hooked=()) -> None:
        self.hooks = set(hooked)
        self.routed = []

    plain_runs = None  # plain requests go one by one
    gathers = 0
    wire = WIRE_1_6_15

    def hooked(self, command):
        return command in self.hooks

    def route(self, req, done):
        self.routed.append((req, done))

    def route_keys(self, req, keys, done, sink=None):
        return False  # multigets go key by key (see test_multiget_routed_whole)


class FakeStore:
    def __init__(self):
        self.seen = []

    def execute(self, req):
        self.seen.append(req)
        return b"STORE " + req.line


ALL = set(COMMANDS.values())


def connect(hooked=ALL):
    core = MemoryCore(FakeEngine(hooked), store=FakeStore())
    proto = ProxyServerProtocol(core)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, core


def feed(proto, *chunks):
    for chunk in chunks:
        proto.dataReceived(chunk)


def answer_all(core, reply=lambda req: b"OK " + req.key + b"\r\n"):
    """Answer what is routed now (answering may let more requests in)."""
    routed = core.router.routed[:]
    del core.router.routed[:len(routed)]
    for req, done in routed:
        done(reply(req))


@pytest.mark.parametrize("chunks", [
    [b"get foo\r\n"],
    [b"ge", b"t foo\r\n"],
    [b"get foo\r", b"\n"],
    [b"get foo", b"\r\n"],
    [bytes([b]) for b in b"get foo\r\n"],
])
def test_line_split_anywhere(chunks):
    proto, transport, core = connect()
    feed(proto, *chunks)
    [(req, done)] = core.router.routed
    assert req.line == b"get foo\r\n"
    assert req.key == b"foo"
    done(b"END\r\n")
    assert transport.value() == b"END\r\n"


@pytest.mark.parametrize("split", range(1, len(b"set k 0 0 5\r\nhello\r\n")))
def test_payload_split_at_every_byte(split):
    data = b"set k 0 0 5\r\nhello\r\nget k\r\n"
    proto, transport, core = connect()
    feed(proto, data[:split], data[split:])
    reqs = [req for req, _ in core.router.routed]
    assert [r.command for r in reqs] == [CMD_SET, CMD_GET]
    assert reqs[0].value == b"hello\r\n"
    assert reqs[0].line == b"set k 0 0 5\r\n"


def test_replies_in_request_order_when_answered_out_of_order():
    proto, transport, core = connect()
    feed(proto, b"get a\r\nget b\r\nget c\r\n")
    routed = core.router.routed
    routed[2][1](b"C\r\n")
    routed[1][1](b"B\r\n")
    assert transport.value() == b""
    routed[0][1](b"A\r\n")
    assert transport.value() == b"A\r\nB\r\nC\r\n"


def test_many_commands_in_one_chunk():
    proto, transport, core = connect()
    feed(proto, b"".join(b"get k%d\r\n" % i for i in range(100)))
    answer_all(core)
    assert transport.value() == b"".join(b"OK k%d\r\n" % i for i in range(100))


def test_multiget_is_split_with_one_end():
    proto, transport, core = connect()
    feed(proto, b"get a b c\r\n")
    reqs = [req for req, _ in core.router.routed]
    assert [r.line for r in reqs] == [b"get a\r\n", b"get b\r\n", b"get c\r\n"]
    assert all(r.multiget for r in reqs)
    answer_all(core, lambda req: b"" if req.key == b"b" else
               b"VALUE " + req.key + b" 0 1\r\nx\r\n")
    assert transport.value() == (b"VALUE a 0 1\r\nx\r\nVALUE c 0 1\r\nx\r\nEND\r\n")


def test_gat_multiget_keeps_its_prefix():
    proto, transport, core = connect()
    feed(proto, b"gat 10 a b\r\n")
    assert [r.line for r, _ in core.router.routed] == [b"gat 10 a\r\n", b"gat 10 b\r\n"]


def test_trailing_space_makes_a_multiget():
    proto, transport, core = connect()
    feed(proto, b"get a \r\n")
    answer_all(core, lambda req: b"")
    assert transport.value() == b"END\r\n"


def test_key_too_long_in_multiget():
    proto, transport, core = connect()
    feed(proto, b"get a " + b"k" * 251 + b" b\r\n")
    answer_all(core, lambda req: b"")
    assert transport.value() == errors.KEY_TOO_LONG + b"END\r\n"
    assert not transport.disconnecting


def test_parse_error_keeps_connection():
    proto, transport, core = connect()
    feed(proto, b"flurb\r\nversion\n")
    assert transport.value() == errors.ERROR + errors.PARSING_REQUEST
    assert not transport.disconnecting
    assert core.stats.conn_errors == 2


def test_request_too_long_closes():
    proto, transport, core = connect()
    feed(proto, b"get " + b"k" * 496 + b"\r\nget b\r\n")
    assert transport.value() == errors.REQUEST_TOO_LONG
    assert transport.disconnecting
    assert core.router.routed == []


def test_request_too_long_waits_for_earlier_replies():
    proto, transport, core = connect()
    feed(proto, b"get a\r\nmg " + b"k" * 200 + b" " + b"O" * 300 + b"\r\n")
    assert not transport.disconnecting
    answer_all(core)
    assert transport.value() == b"OK a\r\n" + errors.REQUEST_TOO_LONG
    assert transport.disconnecting


def test_bad_data_chunk():
    proto, transport, core = connect()
    feed(proto, b"set k 0 0 2\r\nabcd\r\nget k\r\n")
    # "ab" + "cd" is not CRLF: rejected, and parsing resumes after the
    # consumed bytes, so "\r\n" is an (empty, invalid) line of its own.
    assert transport.value().startswith(errors.BAD_DATA_CHUNK)
    [(req, done)] = core.router.routed
    assert req.line == b"get k\r\n"


def test_unterminated_line_over_1024_closes_silently():
    proto, transport, core = connect()
    feed(proto, b"set " + b"x" * 1100)
    assert transport.disconnecting
    assert transport.value() == b""


def test_long_unterminated_multiget_is_allowed():
    proto, transport, core = connect()
    keys = [b"key%04d" % i for i in range(500)]
    line = b"get " + b" ".join(keys) + b"\r\n"
    for i in range(0, len(line), 100):
        feed(proto, line[i:i + 100])
    assert not transport.disconnecting
    assert [r.key for r, _ in core.router.routed] == keys


def test_unhooked_commands_go_to_the_store():
    proto, transport, core = connect(hooked={CMD_GET})
    feed(proto, b"set k 0 0 1\r\nx\r\nget k\r\n")
    [stored] = core.store.seen
    assert stored.value == b"x\r\n"
    [(req, done)] = core.router.routed
    done(b"END\r\n")
    assert transport.value() == b"STORE set k 0 0 1\r\nEND\r\n"


def test_local_commands():
    proto, transport, core = connect(hooked=set())
    feed(proto, b"version\r\nstats proxy\r\nmn\r\n")
    assert transport.value() == b"VERSION test\r\nSTATS proxy\r\nEND\r\nMN\r\n"


def test_mn_waits_for_earlier_replies():
    proto, transport, core = connect()
    feed(proto, b"mg a v\r\nmn\r\n")
    assert transport.value() == b""
    answer_all(core)
    assert transport.value() == b"OK a\r\nMN\r\n"
    assert [r.command for r, _ in core.router.routed] == []


def test_quit_closes_after_pending_replies():
    proto, transport, core = connect()
    feed(proto, b"get a\r\nquit\r\nget b\r\n")
    assert not transport.disconnecting
    answer_all(core)
    assert transport.value() == b"OK a\r\n"
    assert transport.disconnecting


def test_client_gone_with_requests_in_flight():
    proto, transport, core = connect()
    feed(proto, b"get a\r\nset k 0 0 10\r\nabc")
    proto.connectionLost(None)
    answer_all(core)  # late replies are dropped quietly
    assert transport.value() == b""
    assert core.stats.curr_connections == 0


def test_stops_reading_when_too_much_in_flight():
    proto, transport, core = connect()
    feed(proto, b"mg k v\r\n" * (MAX_CLIENT_INFLIGHT + 10))
    assert transport.producerState == "paused"
    assert len(core.router.routed) == MAX_CLIENT_INFLIGHT
    answer_all(core)
    assert transport.producerState == "producing"
    assert len(core.router.routed) == 10
    answer_all(core)
    assert transport.value().count(b"OK k\r\n") == MAX_CLIENT_INFLIGHT + 10
    assert all(r.command == CMD_MG for r, _ in core.router.routed)


# Multigets the engine routes whole (RouteEngine.route_keys)


class BatchingEngine(FakeEngine):
    """Takes every multiget it is offered whole; tests answer by hand."""

    def __init__(self, hooked=ALL) -> None:
        super().__init__(hooked)
        self.batches = []

    def route_keys(self, req, keys, done, sink=None):
        self.batches.append((keys, done))
        return True


def connect_batching():
    core = MemoryCore(BatchingEngine(), store=FakeStore())
    proto = ProxyServerProtocol(core)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, core


def test_multiget_routed_whole_keeps_its_place():
    proto, transport, core = connect_batching()
    feed(proto, b"get a b a\r\nget x\r\ngets c d\r\n")
    engine = core.router
    assert [keys for keys, _ in engine.batches] == [[b"a", b"b", b"a"], [b"c", b"d"]]
    assert [req.line for req, _ in engine.routed] == [b"get x\r\n"]
    answer_all(core)
    engine.batches[1][1](b"VALUE c 0 1 9\r\nc\r\nEND\r\n")
    assert transport.value() == b""
    engine.batches[0][1](b"VALUE a 0 1\r\na\r\nVALUE a 0 1\r\na\r\nEND\r\n")
    assert transport.value() == (b"VALUE a 0 1\r\na\r\nVALUE a 0 1\r\na\r\nEND\r\n"
                                 b"OK x\r\nVALUE c 0 1 9\r\nc\r\nEND\r\n")


@pytest.mark.parametrize("line", [
    b"get a " + b"k" * 251 + b" c\r\n",  # a key over the limit: answered in its place
    b"gat 10 a b\r\n",
    b"get  a b\r\n",
])
def test_multigets_not_routed_whole(line):
    proto, transport, core = connect_batching()
    feed(proto, line)
    assert core.router.batches == []
    answer_all(core, lambda req: b"<" + req.key + b">")
    keys = line.split()[-3 if line.startswith(b"get a ") else -2:]
    expected = [errors.KEY_TOO_LONG if len(k) > 250 else b"<" + k + b">" for k in keys]
    assert transport.value() == b"".join(expected) + errors.END


def test_multiget_routed_whole_counts_every_key_in_flight():
    proto, transport, core = connect_batching()
    keys = b" ".join(b"k%d" % i for i in range(MAX_CLIENT_INFLIGHT - 1))
    feed(proto, b"get " + keys + b"\r\nmg k v\r\n")
    assert transport.producerState == "paused"
    assert core.router.routed == []
    [(_, done)] = core.router.batches
    done(b"END\r\n")
    assert transport.producerState == "producing"
    assert [req.line for req, _ in core.router.routed] == [b"mg k v\r\n"]


@pytest.mark.parametrize("refused, reply", [
    (b"set a\x00b 0 0 5\r\nget x\r\n", errors.BAD_COMMAND_LINE),
    (b"set " + b"k" * 251 + b" 0 0 5\r\nget x\r\n", errors.BAD_COMMAND_LINE),
    (b"ms k 5 " + b" ".join([b"I"] * 17) + b"\r\nget x\r\n", errors.OPTIONS_TOO_LONG),
    (b"set k 0 0 5 noreply x\r\nget x\r\n", errors.ERROR),
])
@pytest.mark.parametrize("split", [None, 3, -5])
def test_refused_storage_line_drops_its_payload(refused, reply, split):
    """A storage line that memcached would misread is never routed, and its
    payload (here a `get x` the client meant as data) is read and dropped:
    one error for one request, then the next request is routed."""
    proto, transport, core = connect()
    data = refused + b"get k\r\n"
    chunks = [data] if split is None else [data[:len(refused) + split],
                                           data[len(refused) + split:]]
    feed(proto, *chunks)
    assert [req.line for req, _ in core.router.routed] == [b"get k\r\n"]
    answer_all(core)
    assert transport.value() == reply + b"OK k\r\n"


@pytest.mark.parametrize("line", [b"get\r\n", b"get \r\n", b"get " + b"k" * 251 + b"\r\n",
                                  b"get a\x00\r\n", b"delete " + b"k" * 251 + b"\r\n"])
def test_refused_lines_never_reach_a_route(line):
    proto, transport, core = connect()
    feed(proto, line + b"get k\r\n")
    assert [req.line for req, _ in core.router.routed] == [b"get k\r\n"]
    assert core.stats.conn_errors == 1


# A client that shuts down its write side (shutdown(SHUT_WR), nc -N)


def test_half_closed_client_gets_every_reply():
    proto, transport, core = connect()
    assert IHalfCloseableProtocol.providedBy(proto)
    feed(proto, b"get a\r\nset k 0 0 1\r\nx\r\nget b c\r\n")
    proto.readConnectionLost()
    assert not transport.disconnecting
    routed = core.router.routed
    for req, done in reversed(routed[1:]):
        done(b"OK " + req.key + b"\r\n")
    assert transport.value() == b""
    assert not transport.disconnecting
    routed[0][1](b"OK a\r\n")
    assert transport.value() == b"OK a\r\nOK k\r\nOK b\r\nOK c\r\nEND\r\n"
    assert transport.disconnecting


def test_half_closed_client_with_nothing_pending_is_closed():
    proto, transport, core = connect(hooked=set())
    feed(proto, b"version\r\n")
    proto.readConnectionLost()
    assert transport.value() == b"VERSION test\r\n"
    assert transport.disconnecting


def test_half_close_drops_only_an_unfinished_request():
    proto, transport, core = connect()
    feed(proto, b"get a\r\nset k 0 0 5\r\nab")
    proto.readConnectionLost()
    answer_all(core)
    assert transport.value() == b"OK a\r\n"
    assert transport.disconnecting


def test_half_close_while_paused_answers_what_was_buffered():
    proto, transport, core = connect()
    feed(proto, b"mg k v\r\n" * (MAX_CLIENT_INFLIGHT + 10) + b"get last\r\n")
    assert transport.producerState == "paused"
    proto.readConnectionLost()
    answer_all(core)
    # The requests read before the EOF are answered; the transport, whose
    # read side is closed, is not asked to read again.
    assert len(core.router.routed) == 11
    assert transport.producerState == "paused"
    assert not transport.disconnecting
    answer_all(core)
    assert transport.value() == b"OK k\r\n" * (MAX_CLIENT_INFLIGHT + 10) + b"OK last\r\n"
    assert transport.disconnecting


def test_half_close_while_the_client_is_not_reading():
    proto, transport, core = connect()
    feed(proto, b"get a\r\n")
    proto.pauseProducing()  # the transport's write buffer is full
    feed(proto, b"get b\r\n")
    proto.readConnectionLost()
    answer_all(core)
    assert not transport.disconnecting
    proto.resumeProducing()
    answer_all(core)
    assert transport.value() == b"OK a\r\nOK b\r\n"
    assert transport.disconnecting


# -- the binary protocol ---------------------------------------------------------

#: A binary GETK of key "k": magic, opcode 0x0c, key length 1, body length 1,
#: opaque 0xdeadbeef, cas 0.
BINARY_GETK = (b"\x80\x0c\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\xde\xad\xbe\xef"
               + bytes(8) + b"k")
#: What memcached writes for an opcode it does not serve: magic 0x81, the
#: opcode, no key or extras, status 0x0081 "unknown command", the body
#: length, the opaque, cas 0, then the body (the proxy's reason).
BINARY_GETK_REFUSAL = (b"\x81\x0c\x00\x00\x00\x00\x00\x81\x00\x00\x00\x1d\xde\xad\xbe\xef"
                       + bytes(8) + b"binary protocol not supported")


@pytest.mark.parametrize("chunks", [
    [BINARY_GETK],
    [BINARY_GETK + b"\x80\x0a" + bytes(22)],  # a NOOP behind it goes unanswered
    [b"", BINARY_GETK],
    [BINARY_GETK[:1], BINARY_GETK[1:13], BINARY_GETK[13:]],
])
def test_binary_request_gets_memcached_s_binary_error_then_close(chunks):
    proto, transport, core = connect()
    feed(proto, *chunks)
    assert transport.value() == BINARY_GETK_REFUSAL
    assert transport.disconnecting
    assert core.stats.conn_errors == 1
    assert not core.clock.getDelayedCalls()


def test_binary_header_is_waited_for_with_a_bound():
    """A client that stops inside the header is refused with what came:
    its opcode, and zeros for the opaque it did not send."""
    proto, transport, core = connect()
    feed(proto, BINARY_GETK[:10])
    core.clock.advance(BINARY_HEADER_WAIT - 0.1)
    assert transport.value() == b"" and not transport.disconnecting
    core.clock.advance(0.1)
    assert transport.value() == (b"\x81\x0c\x00\x00\x00\x00\x00\x81\x00\x00\x00\x1d"
                                 + bytes(12) + b"binary protocol not supported")
    assert transport.disconnecting
    feed(proto, BINARY_GETK[10:] + b"version\r\n")
    assert transport.value().endswith(b"supported")


def test_binary_client_gone_during_the_wait():
    proto, transport, core = connect()
    feed(proto, b"\x80")
    proto.connectionLost()
    assert not core.clock.getDelayedCalls()
    assert transport.value() == b""
