"""The pipelined backend connection (backends/connection.py) on its own.

Driven on a StringTransport with a stand-in owner that records the calls a
Backend would get (the documented set in the module docstring), and a
task.Clock for the times: what is written per turn, which unit gets which
bytes, and what is reported when the stream cannot be trusted.
"""

from __future__ import annotations

from collections import deque

import pytest
from twisted.internet import error, task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcproxy.backends.connection import VALIDATE_REQUEST, BackendConnection
from mcproxy.backends.latency import LatencyWindow
from mcproxy.units import PlainRun, Single
from mcproxy.wire.request import parse_request
from mcproxy.wire.response import FAIL_BADVALIDATE, FAIL_MISMATCH, FAIL_TRAILINGDATA
from mcproxy.writes import batch


class Transport(StringTransport):
    """Records the TCP options set and how many writes were made."""

    nodelay = keepalive = False
    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.writes += 1
        super().writeSequence(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled


class Owner:
    """Stands in for a Backend: records the connection's calls."""

    label = "b1"

    def __init__(self, accept: bool = True) -> None:
        self.reactor = task.Clock()
        self.latency = LatencyWindow()
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)
        self.accept = accept
        self.calls: list[tuple] = []
        self.queue: deque = deque()

    def connection_made(self, connection) -> bool:
        self.calls.append(("made",))
        return self.accept

    def connection_validated(self, connection) -> None:
        self.calls.append(("validated",))

    def connection_failed(self, reason: str, detail: str = "") -> None:
        self.calls.append(("failed", reason, bool(detail)))

    def connection_lost(self, connection, reason) -> None:
        self.calls.append(("lost", reason.type))

    def send(self, connection, unit) -> None:
        """What Backend.send_unit does on a connected backend."""
        unit.sent = self.reactor.seconds()
        connection.write(unit)
        self.queue.append(unit)


@pytest.fixture
def turns(monkeypatch) -> list:
    """Write batches wait for the end of the turn: ``turns.pop()()``."""
    pending: list = []
    monkeypatch.setattr(batch, "schedule", pending.append)
    monkeypatch.setattr(batch, "pending", [])  # a turn a test left unrun stays its own
    monkeypatch.setattr(batch, "scheduled", False)
    return pending


def connected(keepalive: bool = False) -> tuple[Owner, BackendConnection, Transport]:
    owner = Owner()
    connection = BackendConnection(owner, owner.queue, keepalive)
    transport = Transport()
    connection.makeConnection(transport)
    assert transport.value() == VALIDATE_REQUEST
    connection.dataReceived(b"VERSION 1.6.21\r\n")
    assert owner.calls == [("made",), ("validated",)]
    owner.calls.clear()
    transport.clear()
    return owner, connection, transport


def single(line: bytes, got: list, multiget: bool = False) -> Single:
    request = parse_request(line)
    request.multiget = multiget
    return Single(request, got.append)


def test_validates_before_anything_else():
    owner = Owner()
    connection = BackendConnection(owner, owner.queue, keepalive=True)
    transport = Transport()
    connection.makeConnection(transport)
    assert transport.value() == VALIDATE_REQUEST
    assert transport.nodelay and transport.keepalive
    connection.dataReceived(b"VERSION 1.6")
    assert owner.calls == [("made",)]
    connection.dataReceived(b".21\r\n")
    assert owner.calls == [("made",), ("validated",)] and not connection.validating


def test_a_stale_attempt_is_dropped_unvalidated():
    owner = Owner(accept=False)
    connection = BackendConnection(owner, owner.queue)
    transport = Transport()
    connection.makeConnection(transport)
    assert transport.value() == b"" and transport.disconnected
    connection.dataReceived(b"VERSION 1\r\n")
    assert connection.owner is None and owner.calls == [("made",)]


@pytest.mark.parametrize(("reply", "reason"), [
    (b"ERROR\r\n", FAIL_BADVALIDATE),
    (b"garbage\r\n", FAIL_BADVALIDATE),
    (b"VERSION 1.6.21\r\nEND\r\n", FAIL_TRAILINGDATA),
])
def test_a_bad_validation_is_reported(reply, reason):
    owner = Owner()
    connection = BackendConnection(owner, owner.queue)
    connection.makeConnection(Transport())
    connection.dataReceived(reply)
    assert owner.calls == [("made",), ("failed", reason, False)]


def test_units_of_one_turn_leave_in_one_write(turns):
    owner, connection, transport = connected()
    got: list = []
    run = PlainRun(b"get b\r\nget c\r\n", [b"b", b"c"])
    run.done = got.append
    for unit in (single(b"get a\r\n", got), run, single(b"get x\r\n", got, multiget=True),
                 single(b"get y\r\n", got, multiget=True)):
        owner.send(connection, unit)
    assert transport.value() == b"" and connection.written == 0
    turns.pop()()
    assert transport.value() == b"get a\r\nget b\r\nget c\r\nget x y\r\n"
    assert connection.written == 4 and transport.writes == 2  # version, then the turn


def test_replies_go_to_the_unit_at_the_head_in_order(turns):
    owner, connection, _ = connected()
    got: list = []
    run = PlainRun(b"get b\r\nget c d\r\n", [b"b", b"c d"], widths={1: 2})
    run.done = got.append
    owner.send(connection, single(b"set a 0 0 1\r\n", got))
    owner.send(connection, run)
    turns.pop()()
    owner.reactor.advance(0.25)
    connection.dataReceived(b"STORED\r\nEND\r\nVALUE d 0 1\r")
    assert [r.line for r in got] == [b"STORED\r\n"] and len(owner.queue) == 1
    connection.dataReceived(b"\n4\r\nEND\r\n")
    assert got[1] == b"END\r\nVALUE d 0 1\r\n4\r\nEND\r\n"
    assert got[0].elapsed == 250000
    assert owner.latency.count == 1 + 3 and connection.answered_at == 0.25
    assert not owner.queue and connection.written == 0 and owner.calls == []


def test_a_unit_not_written_yet_gets_no_reply(turns):
    owner, connection, _ = connected()
    got: list = []
    owner.send(connection, single(b"get a\r\n", got))
    connection.dataReceived(b"END\r\n")  # before the turn wrote the get
    assert got == [] and owner.calls == [("failed", FAIL_TRAILINGDATA, False)]


def test_a_reply_of_another_request_is_reported_with_what_did_not_match(turns):
    owner, connection, _ = connected()
    got: list = []
    owner.send(connection, single(b"get a\r\n", got))
    turns.pop()()
    connection.dataReceived(b"VALUE b 0 1\r\nx\r\nEND\r\n")
    assert got == [] and owner.calls == [("failed", FAIL_MISMATCH, True)]


def test_the_head_units_client_is_told_of_bytes_as_they_arrive(turns):
    owner, connection, _ = connected()

    class Sink:
        arrived = 0
        wanted = True

        def arriving(self, size: int) -> None:
            self.arrived += size

    sink = Sink()
    got: list = []
    run = PlainRun(b"get a\r\n", [b"a"], sink=sink)
    run.done = got.append
    owner.send(connection, run)
    turns.pop()()
    connection.dataReceived(b"VALUE a 0 3\r\n")
    connection.dataReceived(b"abc\r\nEND\r\n")
    assert sink.arrived == 23 and got == [b"VALUE a 0 3\r\nabc\r\nEND\r\n"]


def test_a_failing_callback_hurts_no_other_unit(turns):
    owner, connection, _ = connected()
    got: list = []

    def boom(res):
        raise RuntimeError("route bug")

    owner.send(connection, Single(parse_request(b"get a\r\n"), boom))
    owner.send(connection, single(b"get b\r\n", got))
    turns.pop()()
    connection.dataReceived(b"END\r\nEND\r\n")
    assert len(got) == 1 and any(e.get("log_failure") for e in owner.events)


def test_an_abandoned_connection_ignores_everything(turns):
    owner, connection, transport = connected()
    got: list = []
    owner.send(connection, single(b"get a\r\n", got))
    connection.abandon()
    assert transport.disconnected
    turns.pop()()
    connection.dataReceived(b"END\r\n")
    connection.connectionLost(Failure(error.ConnectionDone()))
    assert transport.value() == b"" and got == [] and owner.calls == []


def test_lost_is_reported_and_on_lost_fires():
    owner, connection, _ = connected()
    fired: list = []
    connection.on_lost = Deferred()
    connection.on_lost.addCallback(fired.append)
    connection.connectionLost(Failure(error.ConnectionLost()))
    assert owner.calls == [("lost", error.ConnectionLost)] and fired == [None]
    assert connection.owner is None
