"""Backend connections: validation, pipelining, resets, timeouts, failure limits.

Most tests drive a Backend over a MemoryReactorClock and a StringTransport:
exact bytes, no sockets, time moved by hand. The last class talks to a real
memcached through the real reactor (trial TestCase, which pytest runs).
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from mcproxy.backends.backend import LOG_RESET, Backend, BackendOptions
from mcproxy.backends.connection import VALIDATE_REQUEST, BackendConnection
from mcproxy.counters import ProxyStats
from mcproxy.units import KeyBatch, PlainRun
from mcproxy.wire import errors
from mcproxy.wire.request import parse_request, scan_plain
from mcproxy.wire.response import (
    FAIL_BADVALIDATE,
    FAIL_CLOSED,
    FAIL_CONNECTING,
    FAIL_CONNTIMEOUT,
    FAIL_DEPTH,
    FAIL_DISCONNECTED,
    FAIL_MARKEDBAD,
    FAIL_MISSINGEND,
    FAIL_PARSING,
    FAIL_READVALIDATE,
    FAIL_TIMEOUT,
    FAIL_TRAILINGDATA,
    FAIL_UNHANDLEDRES,
    MCMC_CODE_CLIENT_ERROR,
    MCMC_CODE_END,
    MCMC_CODE_SERVER_ERROR,
    MCMC_CODE_STORED,
    Response,
)

VERSION_REPLY = b"VERSION 1.6.18\r\n"


class TCPTransport(StringTransport):
    """A StringTransport with the TCP option setters a backend calls."""

    nodelay = False
    keepalive = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled


def req(line: bytes, value: bytes | None = None):
    r = parse_request(line)
    r.value = value
    return r


class Results:
    """Callbacks that record (tag, response) in call order."""

    def __init__(self) -> None:
        self.got: list[tuple[object, Response]] = []

    def cb(self, tag: object):
        return lambda res: self.got.append((tag, res))

    @property
    def tags(self) -> list:
        return [tag for tag, _ in self.got]

    def responses(self) -> list[Response]:
        return [res for _, res in self.got]


class Harness:
    """A Backend on a fake reactor, and helpers to play its server."""

    def __init__(self, **options) -> None:
        self.clock = MemoryReactorClock()
        self.stats = ProxyStats()
        self.events: list[dict] = []
        self.backend = Backend("b1", "127.0.0.1", "11211", BackendOptions(**options),
                               self.stats, reactor=self.clock)
        self.backend.log = Logger(observer=self.events.append)
        self.results = Results()

    @property
    def attempts(self) -> int:
        return len(self.clock.tcpClients)

    def accept(self) -> tuple[BackendConnection, TCPTransport]:
        """Complete the latest connect attempt; the server sees version."""
        _host, _port, factory, _timeout, _bind = self.clock.tcpClients[-1]
        proto = factory.buildProtocol(None)
        transport = TCPTransport()
        proto.makeConnection(transport)
        return proto, transport

    def connect(self) -> tuple[BackendConnection, TCPTransport]:
        """Connect and validate; the transport is cleared of ``version``."""
        if self.backend.state == "idle":
            self.backend.connect()
        proto, transport = self.accept()
        assert transport.value() == VALIDATE_REQUEST
        transport.clear()
        proto.dataReceived(VERSION_REPLY)
        assert self.backend.state == "connected"
        return proto, transport

    def refuse(self) -> None:
        """Fail the latest connect attempt."""
        connector = self.clock.connectors[-1]
        factory = self.clock.tcpClients[-1][2]
        refused = Failure(error.ConnectionRefusedError())
        factory.clientConnectionFailed(connector, refused)

    def send(self, tag: object, line: bytes, value: bytes | None = None) -> None:
        self.backend.send(req(line, value), self.results.cb(tag))


# Connecting and validating


def test_connects_validates_then_flushes_in_order():
    h = Harness()
    b = h.backend
    assert b.state == "idle"
    b.connect()
    assert b.state == "connecting"
    host, port, _factory, timeout, _bind = h.clock.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 11211, 5.0)
    h.send(1, b"get a\r\n")
    proto, transport = h.accept()
    assert b.state == "validating"
    assert transport.nodelay and not transport.keepalive
    h.send(2, b"set b 0 0 2\r\n", b"hi\r\n")
    assert transport.value() == VALIDATE_REQUEST
    assert b.depth == 2
    proto.dataReceived(VERSION_REPLY)
    assert b.state == "connected"
    assert transport.value() == VALIDATE_REQUEST + b"get a\r\nset b 0 0 2\r\nhi\r\n"
    proto.dataReceived(b"END\r\nSTORED\r\n")
    assert h.results.tags == [1, 2]
    assert [r.code for r in h.results.responses()] == [MCMC_CODE_END, MCMC_CODE_STORED]
    assert b.depth == 0


def test_keepalive_option():
    h = Harness(keepalive=True)
    h.backend.connect()
    _proto, transport = h.accept()
    assert transport.nodelay and transport.keepalive


def test_send_while_idle_starts_connecting():
    h = Harness()
    h.send(1, b"get a\r\n")
    assert h.backend.state == "connecting"
    assert h.attempts == 1
    proto, transport = h.connect()
    assert transport.value() == b"get a\r\n"


@pytest.mark.parametrize(("reply", "reason"), [
    (b"ERROR\r\n", FAIL_BADVALIDATE),
    (b"STAT pid 1\r\n", FAIL_BADVALIDATE),
    (b"garbage\r\n", FAIL_BADVALIDATE),
    (VERSION_REPLY + b"END\r\n", FAIL_TRAILINGDATA),
])
def test_bad_validation_counts_a_failure(reply, reason):
    h = Harness()
    h.send(1, b"get a\r\n")
    proto, transport = h.accept()
    proto.dataReceived(reply)
    assert [r.reason for r in h.results.responses()] == [reason]
    assert b"get a" not in transport.value()
    assert transport.disconnected
    assert h.backend.failures == 1
    assert h.stats.backend_failed == 1
    assert h.backend.state == "failed"
    assert h.attempts == 2


def test_validation_times_out():
    h = Harness(read_timeout=2.0)
    h.backend.connect()
    h.accept()
    h.clock.advance(1.9)
    assert h.backend.state == "validating"
    h.clock.advance(0.1)
    assert h.backend.failures == 1
    assert h.events[-1]["reason"] == FAIL_READVALIDATE


def test_eof_during_validation_counts():
    h = Harness()
    h.backend.connect()
    proto, _ = h.accept()
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert h.backend.failures == 1
    assert h.events[-1]["reason"] == FAIL_DISCONNECTED


def test_connect_refused_counts_and_reconnects_at_once():
    h = Harness()
    h.send(1, b"get a\r\n")
    h.refuse()
    assert [r.reason for r in h.results.responses()] == [FAIL_CONNECTING]
    assert (h.backend.failures, h.stats.backend_failed, h.attempts) == (1, 1, 2)
    assert h.backend.state == "failed"


def test_connect_timeout_on_the_clock():
    h = Harness(connect_timeout=1.5)
    h.send(1, b"get a\r\n")
    h.clock.advance(1.4)
    assert h.results.got == []
    h.clock.advance(0.1)
    assert [r.reason for r in h.results.responses()] == [FAIL_CONNTIMEOUT]
    assert h.clock.connectors[0].stoppedConnecting
    assert h.backend.failures == 1
    assert h.attempts == 2


def test_twisted_connect_timeout_is_conntimeout():
    h = Harness()
    h.send(1, b"get a\r\n")
    factory = h.clock.tcpClients[-1][2]
    timed_out = Failure(error.TimeoutError())
    factory.clientConnectionFailed(h.clock.connectors[-1], timed_out)
    assert [r.reason for r in h.results.responses()] == [FAIL_CONNTIMEOUT]


def test_late_events_of_abandoned_connections_are_ignored():
    h = Harness(connect_timeout=1.0)
    h.backend.connect()
    stale_factory = h.clock.tcpClients[0][2]
    h.clock.advance(1.0)
    stale_factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    assert h.backend.failures == 1
    stale = stale_factory.buildProtocol(None)
    stale_transport = TCPTransport()
    stale.makeConnection(stale_transport)
    assert stale_transport.disconnected
    assert h.backend.state == "failed"
    proto, transport = h.connect()
    h.send(1, b"get a\r\n")
    stale.dataReceived(b"garbage\r\n")
    stale.connectionLost(Failure(error.ConnectionDone()))
    assert h.backend.state == "connected" and h.backend.depth == 1


# Pipelining and replies


def test_pipelined_writes_and_replies_split_anywhere():
    h = Harness()
    proto, transport = h.connect()
    value = b"x" * 100 + b"\r\n"
    h.send("get", b"get k\r\n")
    h.send("set", b"set k 0 0 100\r\n", value)
    h.send("ms", b"ms k 2 q T0\r\n", b"hi\r\n")
    h.send("noreply", b"delete k noreply\r\n")
    h.send("mg", b"mg k v\r\n")
    h.send("incr", b"incr n 1\r\n")
    assert transport.value() == (
        b"get k\r\nset k 0 0 100\r\n" + value
        + b"ms k 2 T0\r\nhi\r\ndelete k\r\nmg k v\r\nincr n 1\r\n")
    replies = (b"VALUE k 0 100\r\n" + value + b"END\r\nSTORED\r\nHD\r\nDELETED\r\n"
               b"VA 2\r\nhi\r\nCLIENT_ERROR cannot increment or decrement "
               b"non-numeric value\r\n")
    for i in range(len(replies)):
        proto.dataReceived(replies[i:i + 1])
    assert h.results.tags == ["get", "set", "ms", "noreply", "mg", "incr"]
    res = h.results.responses()
    assert res[0].value == value and res[0].line == b"VALUE k 0 100\r\n"
    assert res[4].value == b"hi\r\n"
    assert res[5].code == MCMC_CODE_CLIENT_ERROR and res[5].ok
    assert h.backend.state == "connected"
    assert h.events == []


def test_server_error_keeps_the_connection():
    h = Harness()
    proto, transport = h.connect()
    h.send(1, b"set k 0 0 1\r\n", b"a\r\n")
    h.send(2, b"get k\r\n")
    proto.dataReceived(b"SERVER_ERROR out of memory storing object\r\nEND\r\n")
    first, second = h.results.responses()
    assert first.ok and first.hit and first.code == MCMC_CODE_SERVER_ERROR
    assert second.ok and not second.hit
    assert not transport.disconnected


def test_elapsed_is_microseconds():
    h = Harness()
    proto, _ = h.connect()
    h.send(1, b"get a\r\n")
    h.clock.advance(0.25)
    proto.dataReceived(b"END\r\n")
    assert h.results.responses()[0].elapsed == 250000


def test_callback_errors_do_not_hurt_other_requests():
    h = Harness()
    proto, _ = h.connect()

    def boom(res):
        raise RuntimeError("route bug")

    h.backend.send(req(b"get a\r\n"), boom)
    h.send(2, b"get b\r\n")
    proto.dataReceived(b"END\r\nEND\r\n")
    assert h.results.tags == [2]
    assert h.backend.state == "connected"
    assert any(e.get("log_failure") for e in h.events)


# Resets


def test_reset_fails_every_queued_request_individually_in_order():
    h = Harness()
    proto, transport = h.connect()
    for i in range(5):
        h.send(i, b"get k%d\r\n" % i)
    proto.dataReceived(b"END\r\n")
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert h.results.tags == [0, 1, 2, 3, 4]
    failed = h.results.responses()[1:]
    assert all(not r.ok and not r.hit and r.reason == FAIL_DISCONNECTED for r in failed)
    assert len({id(r) for r in failed}) == 4
    # EOF of a healthy connection: reconnect, no failure counted
    assert (h.backend.failures, h.stats.backend_failed) == (0, 0)
    assert h.backend.state == "connecting" and h.attempts == 2
    assert len(h.events) == 1
    event = h.events[0]
    assert (event["label"], event["host"], event["port"], event["reason"],
            event["requests"]) == ("b1", "127.0.0.1", "11211", FAIL_DISCONNECTED, 4)


@pytest.mark.parametrize(("reply", "reason"), [
    (b"bogus\r\n", FAIL_PARSING),
    (b"\r\n", FAIL_PARSING),
    (b"VALUE a 0 1\r\nx\r\nVALUE b 0 1\r\ny\r\nEND\r\n", FAIL_MISSINGEND),
    (b"STAT pid 1\r\n", FAIL_UNHANDLEDRES),
    (b"VERSION 1.6.18\r\n", FAIL_UNHANDLEDRES),
    (b"END\r\nEND\r\nEND\r\n", FAIL_TRAILINGDATA),
])
def test_desync_resets(reply, reason):
    h = Harness()
    proto, transport = h.connect()
    h.send(1, b"get a\r\n")
    h.send(2, b"get b\r\n")
    proto.dataReceived(reply)
    assert h.results.tags == [1, 2]
    answered = 2 if reason == FAIL_TRAILINGDATA else 0
    assert [r.reason for r in h.results.responses()] == (
        [None] * answered + [reason] * (2 - answered))
    assert transport.disconnected
    assert h.backend.state == "connecting" and h.attempts == 2
    assert [e["reason"] for e in h.events] == [reason]


def test_bytes_when_nothing_is_queued():
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"STORED\r\n")
    assert transport.disconnected
    assert h.events[0]["reason"] == FAIL_TRAILINGDATA


def test_send_from_a_failure_callback_waits_for_the_reconnect():
    h = Harness()
    proto, _ = h.connect()
    retried = Results()

    def retry(res):
        h.backend.send(req(b"get a\r\n"), retried.cb("again"))

    h.backend.send(req(b"get a\r\n"), retry)
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert retried.got == [] and h.backend.depth == 1
    proto2, transport2 = h.connect()
    assert transport2.value() == b"get a\r\n"
    proto2.dataReceived(b"END\r\n")
    assert retried.tags == ["again"]


# Read timeouts


def test_read_timeout_is_per_request_deadline():
    """A request's time runs from its send, or from the previous reply."""
    h = Harness(read_timeout=3.0)
    proto, _ = h.connect()
    h.send("a", b"get a\r\n")         # t=0, due 3
    h.clock.advance(1.0)
    h.send("b", b"get b\r\n")         # t=1, due 4
    h.clock.advance(0.5)
    proto.dataReceived(b"END\r\n")    # a answered at 1.5
    h.clock.advance(0.5)
    h.send("c", b"get c\r\n")         # t=2
    h.clock.advance(1.0)              # t=3: b is not late yet
    assert h.results.tags == ["a"]
    proto.dataReceived(b"END\r\n")    # b answered at 3: c due at 3 + 3
    h.clock.advance(2.9)              # t=5.9
    assert h.results.tags == ["a", "b"]
    h.clock.advance(0.1)              # t=6: c is late
    assert h.results.tags == ["a", "b", "c"]
    assert h.results.responses()[2].reason == FAIL_TIMEOUT
    assert h.results.responses()[2].elapsed == 4000000
    assert (h.backend.failures, h.stats.backend_failed) == (1, 1)
    assert h.events[-1]["reason"] == FAIL_TIMEOUT


def test_steady_traffic_cannot_postpone_a_stuck_reply():
    h = Harness(read_timeout=3.0)
    h.connect()
    for _ in range(30):
        h.send("x", b"get x\r\n")
        h.clock.advance(0.1)
    assert len(h.results.got) == 30
    assert all(r.reason == FAIL_TIMEOUT for r in h.results.responses())


def test_one_timer_for_many_requests():
    h = Harness()
    h.connect()
    for i in range(100):
        h.send(i, b"get k\r\n")
    assert len(h.clock.getDelayedCalls()) == 1


def test_idle_connection_has_no_timer_firing():
    h = Harness(read_timeout=3.0)
    proto, _ = h.connect()
    h.send(1, b"get a\r\n")
    proto.dataReceived(b"END\r\n")
    h.clock.advance(10)
    assert h.clock.getDelayedCalls() == []
    assert h.backend.state == "connected" and h.events == []


def test_never_answering_backend_is_never_marked_bad():
    h = Harness(read_timeout=1.0, failure_limit=1)
    for _ in range(5):
        h.connect()
        h.send(1, b"get a\r\n")
        h.clock.advance(1.0)
        assert h.backend.failures == 1
    assert h.stats.backend_marked_bad == 0
    assert h.stats.backend_failed == 5


# Failure limit, bad backends, retries


def test_failure_limit_marks_bad_then_retries():
    h = Harness(failure_limit=3, retry_timeout=2.0)
    h.backend.connect()
    for n in range(1, 4):
        h.refuse()
        assert h.backend.state == "failed" and h.backend.failures == n
    assert h.stats.backend_failed == 3
    h.refuse()
    assert h.backend.state == "bad" and h.backend.failures == 4
    assert h.stats.backend_marked_bad == 1
    assert h.attempts == 4
    assert [e["reason"] for e in h.events] == [FAIL_CONNECTING] * 4

    h.send(1, b"get a\r\n")
    assert h.results.got == []          # never inside send
    h.clock.advance(0)
    assert [r.reason for r in h.results.responses()] == [FAIL_MARKEDBAD]
    assert h.attempts == 4              # socket untouched

    h.clock.advance(2.0)                # retry probe
    assert h.attempts == 5 and h.backend.state == "bad"
    h.refuse()
    assert h.backend.state == "bad"
    assert h.stats.backend_marked_bad == 1
    assert len(h.events) == 4           # already known bad: not logged again
    h.clock.advance(1.9)
    assert h.attempts == 5
    h.clock.advance(0.1)
    assert h.attempts == 6
    proto, transport = h.connect()
    assert h.backend.failures == 0
    assert h.events[-1]["log_format"].endswith("is back after {failures} failures")
    h.send(2, b"get a\r\n")
    proto.dataReceived(b"END\r\n")
    assert h.results.responses()[-1].ok


def test_success_resets_the_count():
    h = Harness(failure_limit=2)
    h.backend.connect()
    h.refuse()
    h.refuse()
    h.connect()
    assert h.backend.failures == 0
    assert h.stats.backend_marked_bad == 0


def test_down_backend_never_connects():
    h = Harness(down=True)
    assert h.backend.state == "bad"
    h.backend.connect()
    h.send(1, b"get a\r\n")
    assert h.attempts == 0 and h.results.got == []
    h.clock.advance(0)
    assert [r.reason for r in h.results.responses()] == [FAIL_MARKEDBAD]
    assert h.clock.getDelayedCalls() == []


def test_port_that_is_not_a_number_fails_to_connect():
    clock = MemoryReactorClock()
    backend = Backend("b1", "127.0.0.1", "memcache", BackendOptions(failure_limit=0),
                      ProxyStats(), reactor=clock)
    backend.log = Logger(observer=lambda event: None)
    backend.connect()
    clock.advance(0)
    assert clock.tcpClients == []
    assert backend.state == "bad" and backend.failures == 1


# Depth limit


def test_depth_limit_fails_fast():
    h = Harness(depth_limit=2)
    h.send(1, b"get a\r\n")
    h.send(2, b"get b\r\n")
    h.send(3, b"get c\r\n")             # while connecting
    proto, transport = h.connect()
    h.send(4, b"get d\r\n")             # connected
    assert h.backend.depth == 2
    assert h.results.got == []
    h.clock.advance(0)
    assert h.results.tags == [3, 4]
    assert {r.reason for r in h.results.responses()} == {FAIL_DEPTH}
    proto.dataReceived(b"END\r\n")
    h.send(5, b"get e\r\n")
    assert transport.value() == b"get a\r\nget b\r\nget e\r\n"


# Closing


def test_close_fails_queue_and_fires_when_gone():
    h = Harness()
    proto, transport = h.connect()
    h.send(1, b"get a\r\n")
    d = h.backend.close()
    assert [r.reason for r in h.results.responses()] == [FAIL_CLOSED]
    assert h.backend.state == "closed"
    assert transport.disconnected
    fired = []
    d.addCallback(fired.append)
    assert fired == []
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert fired == [None]
    assert h.clock.getDelayedCalls() == []
    h.send(2, b"get b\r\n")
    h.clock.advance(0)
    assert h.results.responses()[-1].reason == FAIL_CLOSED
    assert h.attempts == 1
    assert h.events == []


def test_close_while_connecting():
    h = Harness()
    h.send(1, b"get a\r\n")
    fired = []
    h.backend.close().addCallback(fired.append)
    assert fired == [None]
    assert h.clock.connectors[0].stoppedConnecting
    assert h.clock.getDelayedCalls() == []
    assert h.results.responses()[0].reason == FAIL_CLOSED


def test_close_while_bad():
    h = Harness(failure_limit=0)
    h.backend.connect()
    h.refuse()
    assert h.backend.state == "bad"
    fired = []
    h.backend.close().addCallback(fired.append)
    assert fired == [None] and h.clock.getDelayedCalls() == []


# End to end against a real memcached


def wait_until(predicate, timeout: float = 5.0, expire: bool = False) -> defer.Deferred:
    """Fire once predicate() is true, polling on the real reactor.

    Past the timeout this fails, or with ``expire`` simply fires (a sleep).
    """
    from twisted.internet import reactor

    @defer.inlineCallbacks
    def poll():
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                if expire:
                    return
                raise AssertionError("timed out waiting")
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


class RealMemcachedTests(unittest.TestCase):
    """A Backend on the real reactor talking to a real memcached."""

    timeout = 20

    @pytest.fixture(autouse=True)
    def _server(self, memcached):
        self.server = memcached

    def backend(self, **options) -> Backend:
        options.setdefault("connect_timeout", 2.0)
        options.setdefault("read_timeout", 2.0)
        backend = Backend("real", "127.0.0.1", str(self.server.port),
                          BackendOptions(**options), ProxyStats())
        backend.log = Logger(observer=lambda event: None)
        self.addCleanup(backend.close)
        backend.connect()
        return backend

    @defer.inlineCallbacks
    def test_pipelined_sets_and_gets(self):
        backend = self.backend()
        results = Results()
        for i in range(100):
            data = b"%d" % i
            backend.send(req(b"set k%d 0 0 %d\r\n" % (i, len(data)), data + b"\r\n"),
                         results.cb(("set", i)))
            backend.send(req(b"get k%d\r\n" % i), results.cb(("get", i)))
        yield wait_until(lambda: len(results.got) == 200)
        expected = [(op, i) for i in range(100) for op in ("set", "get")]
        self.assertEqual(results.tags, expected)
        for (op, i), res in results.got:
            if op == "set":
                self.assertEqual(res.line, b"STORED\r\n")
            else:
                self.assertEqual(res.value, b"%d\r\n" % i)
                self.assertTrue(res.hit)
        self.assertEqual(backend.state, "connected")
        self.assertEqual(backend.depth, 0)

    @defer.inlineCallbacks
    def test_one_megabyte_value_both_ways(self):
        backend = self.backend()
        value = bytes(range(256)) * 3906 + b"\r\n"    # 999,936 bytes of data
        results = Results()
        backend.send(req(b"set big 0 0 %d\r\n" % (len(value) - 2), value),
                     results.cb("set"))
        backend.send(req(b"get big\r\n"), results.cb("get"))
        backend.send(req(b"mg big v s\r\n"), results.cb("mg"))
        yield wait_until(lambda: len(results.got) == 3)
        set_res, get_res, mg_res = results.responses()
        self.assertEqual(set_res.line, b"STORED\r\n")
        self.assertEqual(get_res.value, value)
        self.assertEqual(mg_res.value, value)
        self.assertEqual(self.server.get(b"big"), value[:-2])

    @defer.inlineCallbacks
    def test_killed_server_fails_each_request_then_recovers(self):
        backend = self.backend(failure_limit=2, retry_timeout=0.2)
        results = Results()
        backend.send(req(b"set k 0 0 1\r\n", b"a\r\n"), results.cb("warm"))
        yield wait_until(lambda: len(results.got) == 1)
        self.assertTrue(results.responses()[0].ok)

        self.server.pause()
        for i in range(10):
            backend.send(req(b"get k\r\n"), results.cb(i))
        yield wait_until(lambda: False, timeout=0.05, expire=True)
        self.assertEqual(backend.depth, 10)
        self.server.stop()
        yield wait_until(lambda: len(results.got) == 11)
        failed = results.responses()[1:]
        self.assertEqual(results.tags[1:], list(range(10)))
        self.assertTrue(all(not r.ok for r in failed))
        self.assertEqual(len({id(r) for r in failed}), 10)

        yield wait_until(lambda: backend.state == "bad")
        self.assertGreaterEqual(backend.stats.backend_marked_bad, 1)
        self.server.start()
        yield wait_until(lambda: backend.state == "connected")
        backend.send(req(b"set k 0 0 1\r\n", b"b\r\n"), results.cb("set"))
        backend.send(req(b"get k\r\n"), results.cb("get"))
        yield wait_until(lambda: len(results.got) == 13)
        self.assertEqual(results.responses()[-1].value, b"b\r\n")
        self.assertEqual(backend.failures, 0)


# Client multigets: one backend request per run of keys


def mg(key: bytes, command: bytes = b"get"):
    r = parse_request(command + b" " + key + b"\r\n")
    r.multiget = True
    return r


@pytest.fixture
def flushes(monkeypatch) -> list:
    """Write batches wait until the test runs them: ``flushes.pop()()``."""
    from mcproxy.writes import batch

    pending: list = []
    monkeypatch.setattr(batch, "schedule", pending.append)
    return pending


def test_multiget_keys_are_merged_and_the_reply_split(flushes):
    h = Harness()
    proto, transport = h.connect()
    for key in (b"a", b"b", b"a", b"c"):
        h.backend.send(mg(key), h.results.cb(key))
    h.backend.send(req(b"get single\r\n"), h.results.cb("single"))
    h.backend.send(mg(b"d", b"gets"), h.results.cb("d"))
    h.backend.send(mg(b"e", b"gets"), h.results.cb("e"))
    flushes.pop()()
    assert transport.value() == b"get a b a c\r\nget single\r\ngets d e\r\n"
    reply = (b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nVALUE c 0 1\r\n3\r\nEND\r\n"
             b"END\r\nVALUE e 0 1 77\r\n5\r\nEND\r\n")
    for i in range(len(reply)):
        proto.dataReceived(reply[i:i + 1])
    assert h.results.tags == [b"a", b"b", b"a", b"c", "single", "d", "e"]
    got = h.results.responses()
    assert [r.value for r in got] == [b"1\r\n", None, b"1\r\n", b"3\r\n", None, None, b"5\r\n"]
    assert [r.hit for r in got] == [True, False, True, True, False, False, True]
    assert got[6].line == b"VALUE e 0 1 77\r\n"
    assert h.backend.state == "connected"


def test_merged_multiget_out_of_order_key_resets(flushes):
    h = Harness()
    proto, transport = h.connect()
    for key in (b"a", b"b"):
        h.backend.send(mg(key), h.results.cb(key))
    flushes.pop()()
    proto.dataReceived(b"VALUE b 0 1\r\n2\r\nVALUE a 0 1\r\n1\r\nEND\r\n")
    assert h.results.tags == [b"a", b"b"]
    assert [r.ok for r in h.results.responses()] == [False, False]


def test_merged_multiget_error_line_answers_every_key(flushes):
    h = Harness()
    proto, transport = h.connect()
    for key in (b"a", b"b"):
        h.backend.send(mg(key), h.results.cb(key))
    flushes.pop()()
    proto.dataReceived(b"SERVER_ERROR out of memory\r\n")
    assert [r.line for r in h.results.responses()] == [b"SERVER_ERROR out of memory\r\n"] * 2
    assert h.backend.state == "connected"


# KeyBatch: the keys of one client multiget, sent and answered as one request


def batch_cb(got: list, tag: object):
    """Records (tag, result): a Single's Response, a KeyBatch's key replies."""
    return lambda result: got.append((tag, result))


def test_key_batch_is_one_request_answered_whole(flushes):
    h = Harness()
    proto, transport = h.connect()
    got = []
    h.backend.send(mg(b"x"), batch_cb(got, "x"))  # never merged with a batch
    h.backend.send_unit(KeyBatch(b"get", [b"a", b"b", b"a", b"c"], batch_cb(got, "get")))
    h.backend.send_unit(KeyBatch(b"gets", [b"d", b"e"], batch_cb(got, "gets")))
    h.backend.send(req(b"get single\r\n"), batch_cb(got, "single"))
    h.backend.send_unit(KeyBatch(b"get", [b"y"], batch_cb(got, "y")))
    h.backend.send(mg(b"z"), batch_cb(got, "z"))
    assert h.backend.depth == 1 + 4 + 2 + 1 + 1 + 1
    flushes.pop()()
    assert transport.value() == (b"get x\r\nget a b a c\r\ngets d e\r\nget single\r\n"
                                 b"get y\r\nget z\r\n")
    reply = (b"END\r\n"
             b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nVALUE c 0 1\r\n3\r\nEND\r\n"
             b"VALUE e 0 1 77\r\n5\r\nEND\r\n"
             b"END\r\nEND\r\nEND\r\n")
    for i in range(len(reply)):
        proto.dataReceived(reply[i:i + 1])
    assert [tag for tag, _ in got] == ["x", "get", "gets", "single", "y", "z"]
    assert got[4][1] == [b""]
    assert got[1][1] == [b"VALUE a 0 1\r\n1\r\n", b"", b"VALUE a 0 1\r\n1\r\n",
                         b"VALUE c 0 1\r\n3\r\n"]
    assert got[2][1] == [b"", b"VALUE e 0 1 77\r\n5\r\n"]
    assert h.backend.latency.count == 1 + 4 + 2 + 1 + 1 + 1
    assert h.backend.depth == 0 and h.backend.state == "connected"


def test_key_batch_error_line_and_desync(flushes):
    h = Harness()
    proto, transport = h.connect()
    got = []
    h.backend.send_unit(KeyBatch(b"get", [b"a", b"b"], batch_cb(got, 1)))
    h.backend.send_unit(KeyBatch(b"get", [b"a", b"b"], batch_cb(got, 2)))
    h.backend.send_unit(KeyBatch(b"get", [b"c"], batch_cb(got, 3)))
    flushes.pop()()
    proto.dataReceived(b"SERVER_ERROR out of memory\r\n"
                       b"VALUE b 0 1\r\n2\r\nVALUE a 0 1\r\n1\r\nEND\r\n")
    assert got == [(1, [b"SERVER_ERROR out of memory\r\n"] * 2),
                   (2, [errors.BACKEND_FAILURE] * 2), (3, [errors.BACKEND_FAILURE])]
    assert h.stats.backend_mismatches == 1 and transport.disconnected


def test_key_batch_fails_whole_when_the_backend_drops_mid_reply(flushes):
    h = Harness()
    proto, transport = h.connect()
    got = []
    h.backend.send_unit(KeyBatch(b"get", [b"a", b"b", b"c"], batch_cb(got, 1)))
    flushes.pop()()
    proto.dataReceived(b"VALUE a 0 1\r\n1\r\nVALUE b 0 5\r\n12")
    assert got == []
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert got == [(1, [errors.BACKEND_FAILURE] * 3)]
    assert h.events[-1]["reason"] == "disconnected"


def test_key_batch_sent_before_the_connection_is_written_once_validated(monkeypatch):
    from mcproxy.writes import batch

    monkeypatch.setattr(batch, "schedule", lambda f: f())
    h = Harness()
    got = []
    h.backend.send_unit(KeyBatch(b"get", [b"a", b"b"], batch_cb(got, 1)))
    assert h.backend.state == "connecting" and h.backend.depth == 2
    proto, transport = h.accept()
    transport.clear()
    proto.dataReceived(VERSION_REPLY)
    assert transport.value() == b"get a b\r\n"
    proto.dataReceived(b"VALUE b 0 1\r\n2\r\nEND\r\n")
    assert got == [(1, [b"", b"VALUE b 0 1\r\n2\r\n"])]


# PlainRun: plain requests of one client, sent as they came, answered as bytes


def plain_run(data: bytes, done) -> PlainRun:
    """The PlainRun of ``data`` as the client protocol finds it (scan_plain)."""
    stop, keys, _, sets, widths = scan_plain(data, 0, True, 1 << 20, multigets=16384)
    assert stop == len(data)
    run = PlainRun(data, keys, sets, widths)
    run.done = done
    return run


def test_plain_run_is_sent_as_it_came_and_answered_as_the_bytes_that_came(flushes):
    h = Harness()
    proto, transport = h.connect()
    got = []
    h.backend.send(mg(b"x"), h.results.cb("x"))  # never merged with a run
    run = plain_run(b"get a\r\nset b 0 0 1\r\n1\r\nget b\r\n", got.append)
    h.backend.send_unit(run)
    h.backend.send(mg(b"y"), h.results.cb("y"))
    h.backend.send_unit(plain_run(b"get c\r\n", got.append))
    assert h.backend.depth == 1 + 3 + 1 + 1
    flushes.pop()()
    assert transport.value() == (b"get x\r\nget a\r\nset b 0 0 1\r\n1\r\nget b\r\n"
                                 b"get y\r\nget c\r\n")
    replies = b"END\r\nSTORED\r\nVALUE b 0 1\r\n1\r\nEND\r\n"
    reply = b"END\r\n" + replies + b"END\r\nVALUE c 0 1 5\r\nc\r\nEND\r\n"
    for i in range(len(reply)):
        proto.dataReceived(reply[i:i + 1])
    assert got == [replies, b"VALUE c 0 1 5\r\nc\r\nEND\r\n"]
    assert h.results.tags == ["x", "y"]
    assert h.backend.latency.count == 6
    assert h.backend.depth == 0 and h.backend.state == "connected"


def test_plain_runs_of_several_clients_answered_from_one_chunk(flushes):
    """Runs queued one after another are answered in turn from one read,
    a failing callback hurting none of the others, up to the first whose
    replies have not all come."""
    h = Harness()
    proto, _ = h.connect()
    got = []

    def boom(reply):
        raise RuntimeError("route bug")

    h.backend.send_unit(plain_run(b"get a\r\n", got.append))
    h.backend.send_unit(plain_run(b"get b\r\nset c 0 0 1\r\nc\r\n", boom))
    h.backend.send_unit(plain_run(b"get d\r\n", got.append))
    h.backend.send_unit(plain_run(b"get e\r\nget f\r\n", got.append))
    h.backend.send(mg(b"x"), h.results.cb("x"))
    flushes.pop()()
    h.clock.advance(2)
    proto.dataReceived(b"END\r\nEND\r\nSTORED\r\nVALUE d 0 1\r\nd\r\nEND\r\nEND\r\nVAL")
    assert got == [b"END\r\n", b"VALUE d 0 1\r\nd\r\nEND\r\n"]
    assert any(e.get("log_failure") for e in h.events)
    assert proto.answered_at == h.clock.seconds()
    assert h.backend.depth == 3 and h.backend.latency.count == 4
    proto.dataReceived(b"UE f 0 1\r\nf\r\nEND\r\nEND\r\n")
    assert got[2:] == [b"END\r\nVALUE f 0 1\r\nf\r\nEND\r\n"]
    assert h.results.tags == ["x"]
    assert h.backend.depth == 0 and h.backend.state == "connected"


def sent_run(flushes: list, data: bytes):
    """A PlainRun written on a connected backend: the connection, the run,
    and the list its callback appends to."""
    h = Harness()
    proto, _ = h.connect()
    got: list = []
    run = plain_run(data, got.append)
    h.backend.send_unit(run)
    flushes.pop()()
    return proto, run, got


def test_plain_run_reply_in_one_chunk_is_passed_on_whole(flushes):
    proto, _, got = sent_run(flushes, b"get a\r\nget b\r\n")
    reply = b"END\r\nSERVER_ERROR out of memory\r\n"
    proto.dataReceived(reply)
    assert got == [reply] and got[0] is reply


def test_plain_run_keeps_the_replies_before_a_failure(flushes):
    """A run failed part way gets the replies that came, then a failure for
    each request left."""
    proto, run, got = sent_run(flushes, b"get a\r\nget b\r\nget c\r\n")
    proto.dataReceived(b"VALUE a 0 1\r\n1\r\nEND\r\nVALUE b 0 5\r\n12")
    assert got == []
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert got == [b"VALUE a 0 1\r\n1\r\nEND\r\n" + errors.BACKEND_FAILURE * 2]
    assert run.answered == 1


def test_plain_run_garbage_after_good_replies(flushes):
    proto, run, got = sent_run(flushes, b"get a\r\nset b 0 0 1\r\nb\r\nget c\r\n")
    proto.dataReceived(b"END\r\nSTORED\r\nnonsense\r\n")
    assert got == [b"END\r\nSTORED\r\n" + errors.BACKEND_FAILURE]
    assert run.answered == 2 and proto.owner is None


def test_plain_run_with_multigets_is_answered_as_the_bytes_that_came(flushes):
    proto, run, got = sent_run(flushes, b"get a b\r\nget c\r\nget d e f\r\n")
    backend = proto.owner
    assert run.size == 6 and backend.depth == 6
    reply = b"VALUE b 0 1\r\n2\r\nEND\r\nEND\r\nVALUE d 0 1\r\n4\r\nVALUE f 0 1\r\n6\r\nEND\r\n"
    for i in range(len(reply)):
        proto.dataReceived(reply[i:i + 1])
    assert got == [reply]
    assert backend.latency.count == 6 and backend.depth == 0


def test_plain_run_failed_inside_a_multiget(flushes):
    """The replies before it are kept; the multiget gets a failure for each
    of its keys and END (as when its keys are routed together), and so does
    each request left."""
    proto, run, got = sent_run(flushes, b"get a b\r\nget c\r\nget d e f\r\nget g h\r\n")
    proto.dataReceived(b"VALUE b 0 1\r\n2\r\nEND\r\nEND\r\nVALUE d 0 1\r\n4\r\nVAL")
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert run.answered == 2
    assert got == [b"VALUE b 0 1\r\n2\r\nEND\r\nEND\r\n"
                   + errors.BACKEND_FAILURE * 3 + errors.END
                   + errors.BACKEND_FAILURE * 2 + errors.END]


# Every reply is checked against its request (a shifted stream is reset)


@pytest.mark.parametrize(("line", "value", "reply"), [
    (b"get a\r\n", None, b"VALUE b 0 1\r\nx\r\nEND\r\n"),     # another key's value
    (b"gets a\r\n", None, b"STORED\r\n"),                      # a set's reply to a get
    (b"set a 0 0 1\r\n", b"x\r\n", b"END\r\n"),                # a get's reply to a set
    (b"delete a\r\n", None, b"STORED\r\n"),
    (b"incr a 1\r\n", None, b"DELETED\r\n"),
    (b"touch a 1\r\n", None, b"5\r\n"),
    (b"mg a v\r\n", None, b"END\r\n"),                          # text reply to meta
    (b"mg a v O123\r\n", None, b"VA 1 O124\r\nx\r\n"),          # another opaque
    (b"mg a v k\r\n", None, b"VA 1 kb\r\nx\r\n"),               # another key
    (b"mg a v\r\n", None, b"HD O1\r\n"),                        # an opaque not asked for
    (b"ms a 1\r\n", b"x\r\n", b"EN\r\n"),
    (b"md a\r\n", None, b"VA 1\r\nx\r\n"),
    (b"me a\r\n", None, b"ME b exp=-1 la=1 cas=1 fetch=no cls=1 size=63\r\n"),
])
def test_a_reply_of_another_request_resets_the_connection(line, value, reply):
    """The request and every one queued behind it on the connection get
    their own failure; the reset is counted and logged with what did not
    match."""
    h = Harness()
    proto, transport = h.connect()
    h.send(1, line, value)
    h.send(2, b"get z\r\n")
    proto.dataReceived(reply + b"END\r\n")
    assert h.results.tags == [1, 2]
    assert [r.reason for r in h.results.responses()] == ["mismatch", "mismatch"]
    assert transport.disconnected and h.backend.state == "connecting"
    assert h.stats.backend_mismatches == 1
    assert "does not answer its request" in h.events[0]["log_format"]
    assert repr(reply.split(b"\r\n")[0])[2:-1] in h.events[0]["detail"]


@pytest.mark.parametrize(("line", "reply"), [
    (b"get a\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\n"),
    (b"get a\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"set a 0 0 1\r\n", b"NOT_STORED\r\n"),
    (b"incr a 1\r\n", b"5\r\n"),
    (b"mg a v O123 k\r\n", b"VA 1 O123 ka\r\nx\r\n"),
    (b"mg a v O123 k\r\n", b"EN\r\n"),              # older memcached: no flags on a miss
    (b"mg YQ== b k v\r\n", b"VA 1 kYQ== b\r\nx\r\n"),
    (b"mg aw== b v k\r\n", b"VA 1 kk\r\nx\r\n"),     # a base64 key given back decoded
    (b"mg a v kx\r\n", b"VA 1 ka\r\nx\r\n"),        # a flag is its first byte
    (b"ms a 1 T0\r\n", b"HD\r\n"),
    (b"me a\r\n", b"ME a exp=-1 la=1 cas=1 fetch=no cls=1 size=63\r\n"),
    (b"ma a\r\n", b"NF\r\n"),
])
def test_replies_that_answer_their_request_pass(line, reply):
    h = Harness()
    proto, _ = h.connect()
    h.send(1, line, b"x\r\n" if b" 0 0 1" in line or line.startswith(b"ms") else None)
    proto.dataReceived(reply)
    [res] = h.results.responses()
    assert res.ok and h.stats.backend_mismatches == 0


@pytest.mark.parametrize("reply", [
    b"VALUE c 0 1\r\nx\r\nEND\r\n",                            # a key not asked for
    b"VALUE b 0 1\r\nx\r\nVALUE a 0 1\r\nx\r\nEND\r\n",        # out of order
    b"STORED\r\n",                                             # not a get's reply
])
def test_merged_and_batched_multigets_check_their_keys(flushes, reply):
    for send in ("merged", "batch"):
        h = Harness()
        proto, _ = h.connect()
        got = []
        if send == "merged":
            h.backend.send(mg(b"a"), lambda res, got=got: got.append(res.line))
            h.backend.send(mg(b"b"), lambda res, got=got: got.append(res.line))
        else:
            h.backend.send_unit(KeyBatch(b"get", [b"a", b"b"], got.extend))
        flushes.pop()()
        proto.dataReceived(reply)
        assert got == [errors.BACKEND_FAILURE] * 2, send
        assert h.stats.backend_mismatches == 1
        assert h.events[-1]["reason"] == "mismatch"


def test_plain_run_reply_of_another_key_fails_the_rest(flushes):
    proto, run, got = sent_run(flushes, b"get a\r\nset b 0 0 1\r\nb\r\nget c\r\n")
    stats = proto.owner.stats
    proto.dataReceived(b"END\r\nSTORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n")
    assert got == [b"END\r\nSTORED\r\n" + errors.BACKEND_FAILURE]
    assert run.answered == 2 and stats.backend_mismatches == 1


# The client a KeyBatch or PlainRun is for (units.ReplySink)


class Sink:
    """Counts the bytes arriving for it; unwanted past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrived = 0

    def arriving(self, size: int) -> None:
        self.arrived += size

    @property
    def wanted(self) -> bool:
        return self.arrived <= self.limit


def test_key_batch_reply_counted_as_it_arrives_and_dropped_once_unwanted(flushes):
    h = Harness()
    proto, _ = h.connect()
    got = []
    sink = Sink(limit=40)
    first = KeyBatch(b"get", [b"a", b"b", b"c"], batch_cb(got, 1), sink)
    h.backend.send_unit(first)
    h.backend.send_unit(KeyBatch(b"get", [b"a"], batch_cb(got, 2), Sink(limit=100)))
    flushes.pop()()
    item = b"VALUE a 0 10\r\n0123456789\r\n"
    proto.dataReceived(item)
    assert sink.arrived == len(item) and sink.wanted
    assert first._values == [item]
    proto.dataReceived(item.replace(b"a", b"b"))
    assert not sink.wanted and first._values == [None, None]
    proto.dataReceived(b"VALUE c 0 1\r\n3\r\nEND\r\n" + item + b"END\r\n")
    assert got == [(1, [b"", b"", b""]), (2, [item])]  # dropped, still checked
    assert h.backend.state == "connected"


def test_plain_run_replies_dropped_once_unwanted(flushes):
    h = Harness()
    proto, _ = h.connect()
    got = []
    sink = Sink(limit=10)
    run = PlainRun(b"get a\r\nget b c\r\nget d\r\n", [b"a", b"b c", b"d"], None, {1: 2}, sink)
    run.done = got.append
    h.backend.send_unit(run)
    flushes.pop()()
    proto.dataReceived(b"VALUE a 0 1\r\n1\r\nEND\r\n")
    assert not sink.wanted
    proto.dataReceived(b"VALUE b 0 1\r\n2\r\n")
    assert proto.reader._held == [b""]
    proto.dataReceived(b"VALUE c 0 1\r\n3\r\nEND\r\nEND\r\n")
    assert got == [b""] and h.backend.state == "connected"


@pytest.mark.parametrize(("received", "rbuf"), [
    (b"VALUE b 0 1\r\n2\r\nEND\r\nVAL", b"VAL"),
    (b"VALUE b 0 5\r\n12", b"VALUE b 0 5\r\n12"),
    (b"", b""),
])
def test_reset_event_carries_depth_and_unread_bytes(flushes, received, rbuf):
    """A reset's backend event says how many queued requests it failed
    (``depth``) and what had arrived unread (``rbuf``), as memcached 1.6.45's
    proxy's watch lines do."""
    h = Harness()
    proto, _ = h.connect()
    h.backend.send_unit(plain_run(b"get b\r\nget c\r\nget d\r\n", [].append))
    flushes.pop()()
    proto.dataReceived(received)
    proto.connectionLost(Failure(error.ConnectionLost()))
    [reset] = [e for e in h.events if e.get("log_format") == LOG_RESET]
    assert reset["requests"] == 3 and reset["rbuf"] == rbuf
