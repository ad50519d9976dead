"""mcproxy.app.reactor: the epoll reactor without a log context per event."""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading

import pytest
from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from zope.interface import implementer

from mcproxy import compiled, writes
from mcproxy.app import reactor as mcreactor
from tests.servers import Proxy


def test_adopt_switches_only_twisteds_epoll_reactor():
    epoll = EPollReactor()
    assert mcreactor.adopt(epoll) and type(epoll) is mcreactor.ProxyReactor
    assert not mcreactor.adopt(epoll)  # already switched
    for other in (SelectReactor(), MemoryReactor()):
        assert not mcreactor.adopt(other) and type(other) is not mcreactor.ProxyReactor


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a bug in a protocol")
        self.transport.write(data)


class Client(Protocol):
    def connectionMade(self) -> None:
        self.got = b""
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if self.got == b"ping":
            self.transport.write(b"boom")

    def connectionLost(self, reason=None) -> None:
        self.factory.results.append((self.got, reason.type.__name__))
        self.factory.reactor.stop()


def test_proxy_reactor_serves_connections_and_closes_on_errors():
    """Reads, writes, a protocol's exception (logged, connection closed)
    and the peer seeing the close, on a ProxyReactor of its own."""
    reactor = mcreactor.ProxyReactor()
    errors = []
    server = Factory.forProtocol(Echo)
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    client = ClientFactory.forProtocol(Client)
    client.results, client.reactor = [], reactor
    reactor.connectTCP("127.0.0.1", port.getHost().port, client)
    reactor.callLater(10, reactor.stop)
    from twisted.python import log

    log.addObserver(errors.append)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        log.removeObserver(errors.append)
    assert client.results == [(b"ping", "ConnectionDone")]
    assert any("a bug in a protocol" in str(e.get("failure", "")) for e in errors)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A connection's events, in the order they came."""

    def connectionMade(self) -> None:
        self.seen = []
        self.factory.connections.append(self.seen)

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)

    def readConnectionLost(self) -> None:
        self.seen.append("read closed")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.seen.append(reason.type.__name__)
        if sum(seen[-1].startswith("Connection") for seen in self.factory.connections) == 2:
            self.factory.reactor.stop()


def test_reads_end_in_a_half_close_or_a_reset_as_twisted_ends_them():
    """A read event goes to doRead directly: a peer's shutdown of its
    writes still reaches readConnectionLost, a reset connectionLost with
    ConnectionLost."""
    reactor = mcreactor.ProxyReactor()
    server = Factory.forProtocol(Recorder)
    server.connections, server.reactor = [], reactor
    port = reactor.listenTCP(0, server, interface="127.0.0.1").getHost().port
    closing, resetting = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))

    def end() -> None:
        closing.sendall(b"a")
        closing.shutdown(socket.SHUT_WR)
        resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetting.close()

    reactor.callLater(0.2, end)
    reactor.callLater(10, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        closing.close()
    assert {tuple(seen) for seen in server.connections} == {
        (b"a", "read closed", "ConnectionDone"), ("ConnectionLost",)}


@pytest.mark.e2e
def test_twistd_mcproxy_runs_on_it():
    proxy = Proxy(None).start()
    try:
        assert proxy.call(b"version\r\n", b"\r\n").startswith(b"VERSION ")
        assert "switched the reactor to mcproxy.app.reactor.ProxyReactor" in proxy.log()
        # this checkout's install builds the compiled modules (gcc, Cython from PyPI)
        modules = ", ".join(m for m in compiled.MODULES if m not in compiled.switched())
        assert f"compiled modules: {modules or 'none (pure Python)'}" in proxy.log()
    finally:
        proxy.stop()


def test_call_after_events_runs_once_the_polls_events_are_handled():
    reactor = mcreactor.ProxyReactor()
    order = []

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            order.append(("read", data))
            reactor.call_after_events(lambda: order.append(("after", data)))

        def connectionLost(self, reason=None) -> None:
            reactor.stop()

    class Writer(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"x")
            reactor.callLater(0.2, self.transport.loseConnection)

    server = Factory.forProtocol(Reader)
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Writer))

    def outside() -> None:  # not in an event handler: on the next iteration
        reactor.call_after_events(lambda: order.append(("later", None)))
        order.append(("timer", None))

    reactor.callLater(0.1, outside)
    reactor.callLater(10, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert order == [("read", b"x"), ("after", b"x"), ("timer", None), ("later", None)]


def test_the_write_batch_learns_whether_a_poll_brought_several_events():
    """WriteBatch.events: 2 for a poll of two reads (two connections
    written to at once), 1 for a poll of one."""
    reactor = mcreactor.ProxyReactor()
    seen = []

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            seen.append((data, writes.batch.events))
            if len(seen) == 3:
                reactor.stop()

    port = reactor.listenTCP(0, Factory.forProtocol(Reader), interface="127.0.0.1")
    clients = []

    class Writer(Protocol):
        def connectionMade(self) -> None:
            clients.append(self)
            if len(clients) == 2:
                reactor.callLater(0.2, both)

    def both() -> None:  # one poll sees both reads, then one alone
        for client in clients:
            client.transport.write(b"x")
        reactor.callLater(0.2, clients[0].transport.write, b"y")

    for _ in range(2):
        reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Writer))
    reactor.callLater(10, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        writes.batch.events = writes.MANY_EVENTS
    assert seen == [(b"x", 2), (b"x", 2), (b"y", 1)]


class _Socket:
    """What a read gets: bytes, or the error to raise."""

    def __init__(self, result) -> None:
        self.result = result

    def recv(self, size: int) -> bytes:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class _Connection(tcp.Connection):
    """A TCP connection with Twisted's doRead, on a socket of our own."""

    def __init__(self, result) -> None:
        self.socket = _Socket(result)
        self.protocol = self
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class _Poller:
    def __init__(self, events: list) -> None:
        self.events = events

    def poll(self, timeout, count) -> list:
        return self.events


@pytest.mark.parametrize("result", [
    b"get k\r\n",
    b"",
    BlockingIOError(errno.EWOULDBLOCK, "no data"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
])
def test_a_tcp_read_is_what_twisteds_doread_makes_of_it(monkeypatch, result):
    """doPoll reads a TCP connection itself: what recv gives ends as
    Twisted's tcp.Connection.doRead ends it (data, the end of the stream,
    nothing yet, a lost connection)."""
    monkeypatch.setattr(writes.batch, "events", writes.batch.events)  # (the poll sets it)
    twisteds = _Connection(result)
    expected = twisteds.doRead()
    reactor = mcreactor.ProxyReactor()
    connection = _Connection(result)
    ended = []
    reactor._selectables[7] = connection
    reactor._poller = _Poller([(7, select.EPOLLIN)])
    reactor._disconnectSelectable = lambda sel, why, lost: ended.append((sel, why))
    reactor.doPoll(0)
    assert connection.received == twisteds.received
    assert ended == ([] if expected is None else [(connection, expected)])


def test_the_main_loop_runs_timed_and_thread_calls_and_survives_an_error(monkeypatch):
    """Timed calls run when due, calls from threads run, cancelled calls
    are cleaned up, and an error out of an iteration is logged and the loop
    goes on (the reactor still stops)."""
    monkeypatch.setattr(writes.batch, "events", writes.batch.events)  # (each poll sets it)
    reactor = mcreactor.ProxyReactor()
    ran = []
    reactor.callLater(0.05, ran.append, "timed")
    cancelled = [reactor.callLater(60, ran.append, "never") for _ in range(80)]
    poll = reactor.doPoll
    failed = []

    def poll_once_failing(timeout) -> None:
        if not failed:
            failed.append(timeout)
            raise RuntimeError("a failing poll")
        poll(timeout)

    reactor.doPoll = poll_once_failing

    def from_thread() -> None:
        for call in cancelled:
            call.cancel()
        threading.Thread(target=reactor.callFromThread, args=(ran.append, "thread")).start()
        reactor.callLater(0.2, ran.append, "later")
        reactor.callLater(0.3, reactor.stop)

    reactor.callLater(0.1, from_thread)
    reactor.callLater(10, reactor.stop)
    errors = []
    from twisted.python import log

    log.addObserver(errors.append)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        log.removeObserver(errors.append)
    assert ran == ["timed", "thread", "later"]
    assert failed and any("a failing poll" in str(e.get("failure", "")) for e in errors)
    assert len(reactor._pendingTimedCalls) < 10  # the cancelled ones gone, at most the 10 s
