"""A request the router gathers (IRouter.gather: routed at the end of the
poll with other connections'): the connection routes nothing it read after
it until the router releases it, so its requests still reach the routes in
the order sent, and it answers and closes as for any request."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire.request import CMD_GET, CMD_VERSION, key_request
from tests.server.memorycore import MemoryCore
from tests.server.test_server import ALL, FakeEngine, FakeStore


class GatheringEngine(FakeEngine):
    """Gathers every get alone; ``flush()`` routes what it holds, then
    releases the connections (as RouteEngine does at the end of a poll)."""

    gathers = 2  # from a poll of two events
    plain_multigets = False

    def __init__(self, hooked=ALL - {CMD_VERSION}) -> None:
        super().__init__(hooked)
        self.held: list = []

    def gather(self, req, done, release):
        if req.command != CMD_GET:  # multiget keys too, unlike RouteEngine
            return False
        self.held.append((req, done, release))
        return True

    def gather_plain(self, key, sent, is_set, done, release):
        """A run of one plain get (plain_runs False: sets come as lines)."""
        assert not is_set and sent == b"get %s\r\n" % key
        self.held.append((key_request(CMD_GET, key, False), done, release))
        return True

    def flush(self) -> None:
        held, self.held = self.held, []
        for req, done, _ in held:
            self.route(req, done)
        for _, _, release in held:
            release()

    def flush_all(self) -> None:
        """As the write batch does: flush until nothing is gathered."""
        while self.held:
            self.flush()


def connect(plain_runs=None):
    engine = GatheringEngine()
    engine.plain_runs = plain_runs
    engine.route_run = lambda *args, **kwargs: False  # runs of several: one by one
    core = MemoryCore(engine, store=FakeStore())
    proto = ProxyServerProtocol(core)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, core.router


def lines(engine) -> list[bytes]:
    return [req.line for req, _ in engine.routed]


def answer(engine) -> None:
    routed, engine.routed = engine.routed, []
    for req, done in routed:
        done(b"<" + req.line.rstrip() + b">\r\n")


def test_what_comes_after_a_gathered_get_waits_for_its_release():
    proto, transport, engine = connect()
    proto.dataReceived(b"get a\r\n")
    proto.dataReceived(b"set b 0 0 1\r\nx\r\nget c\r\n")  # e.g. the next TLS record
    assert lines(engine) == [] and [req.line for req, _, _ in engine.held] == [b"get a\r\n"]
    engine.flush()
    # released: the set is routed, and the get after it gathered again
    assert lines(engine) == [b"get a\r\n", b"set b 0 0 1\r\n"]
    engine.flush()
    assert lines(engine) == [b"get a\r\n", b"set b 0 0 1\r\n", b"get c\r\n"]
    answer(engine)
    assert transport.value() == b"<get a>\r\n<set b 0 0 1>\r\n<get c>\r\n"


def test_a_local_command_after_a_gathered_get_waits_too():
    proto, transport, engine = connect()
    proto.dataReceived(b"get a\r\nversion\r\n")
    assert transport.value() == b""
    engine.flush()
    answer(engine)
    assert transport.value() == b"<get a>\r\nVERSION test\r\n"


def test_eof_while_held_answers_everything_then_closes():
    proto, transport, engine = connect()
    proto.dataReceived(b"get a\r\n")
    proto.dataReceived(b"get b\r\nget c\r\n")
    proto.readConnectionLost()
    assert not transport.disconnecting
    engine.flush_all()
    answer(engine)
    assert transport.value() == b"<get a>\r\n<get b>\r\n<get c>\r\n"
    assert transport.disconnecting


def test_a_connection_gone_while_held_is_released_quietly():
    proto, transport, engine = connect()
    proto.dataReceived(b"get a\r\n")
    proto.dataReceived(b"get b\r\n")
    proto.connectionLost()
    engine.flush()
    answer(engine)
    assert lines(engine) == [] and engine.held == []
    assert transport.value() == b""


def test_a_multiget_split_into_gathered_keys_is_released_after_its_last():
    proto, transport, engine = connect()
    engine.route_keys = lambda *args, **kwargs: False  # split key by key
    proto.dataReceived(b"get a b\r\nget c\r\n")
    assert [req.line for req, _, _ in engine.held] == [b"get a\r\n", b"get b\r\n"]
    engine.flush_all()
    assert lines(engine) == [b"get a\r\n", b"get b\r\n", b"get c\r\n"]


def test_a_get_not_gathered_is_routed_at_once():
    proto, transport, engine = connect()
    proto.dataReceived(b"set a 0 0 1\r\nx\r\n")
    assert lines(engine) == [b"set a 0 0 1\r\n"]
    assert not proto._held


def test_a_run_of_one_plain_get_is_gathered_without_its_line_parsed():
    """With runs of plain gets (plain_runs False), a get alone in its read
    goes to gather_plain; what comes after it still waits for its release."""
    proto, transport, engine = connect(plain_runs=False)
    proto.dataReceived(b"get a\r\n")
    proto.dataReceived(b"set b 0 0 1\r\nx\r\nget c\r\n")
    assert lines(engine) == [] and [req.line for req, _, _ in engine.held] == [b"get a\r\n"]
    engine.flush_all()
    assert lines(engine) == [b"get a\r\n", b"set b 0 0 1\r\n", b"get c\r\n"]
    answer(engine)
    assert transport.value() == b"<get a>\r\n<set b 0 0 1>\r\n<get c>\r\n"


def test_a_run_of_one_get_refused_by_gather_plain_goes_to_route_run_with_a_sink():
    """The router may refuse to gather (an active-request limit): the get
    goes on as any run, to route_run with the group's slot as its sink; if
    route_run refuses too, line by line, nothing left counted."""
    proto, transport, engine = connect(plain_runs=False)
    engine.gather_plain = lambda *args: False
    runs = []

    def route_run(data, start, keys, ends, sets, widths, done, sink=None):
        runs.append((keys, sink))
        done(b"<run %s>\r\n" % b" ".join(keys))
        return True

    engine.route_run = route_run
    proto.dataReceived(b"get a\r\n")
    [(keys, sink)] = runs
    assert keys == [b"a"] and sink.wanted and not proto._held
    assert transport.value() == b"<run a>\r\n"
    engine.route_run = lambda *args, **kwargs: False
    proto.dataReceived(b"get b\r\n")  # the line path (which gathers it)
    engine.flush()
    assert lines(engine) == [b"get b\r\n"] and not proto._held
    answer(engine)
    assert transport.value() == b"<run a>\r\n<get b>\r\n"
    assert (proto._extra_slots, proto._inflight_bytes, len(proto._slots)) == (0, 0, 0)
