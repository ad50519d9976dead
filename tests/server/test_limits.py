"""Client limits: --max-connections, --idle-timeout and --client-output-limit."""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher
from twisted.python import usage

from mcproxy.app.service import ProxyService
from mcproxy.app.tap import Options
from mcproxy.ops.watch import WatchRegistry
from mcproxy.server.protocol import (
    CLIENT_OUTPUT_LIMIT,
    LOG_OUTPUT_LIMIT,
    TOO_MANY_CONNECTIONS,
    ProxyServerFactory,
)
from mcproxy.wire.behaviour import WIRE_1_6_15
from tests.server.memorycore import MemoryCore
from tests.servers import Proxy, read_until

# -- in process ------------------------------------------------------------------


class Engine:
    """Routes every request, and never answers."""

    plain_runs = None  # plain requests go one by one
    gathers = 0
    wire = WIRE_1_6_15

    def hooked(self, command):
        return True

    def route(self, req, done):
        pass

    def route_keys(self, req, keys, done, sink=None):
        return False


class Unrouted:
    """Routes nothing: every command is answered locally."""

    plain_runs = None
    gathers = 0
    wire = WIRE_1_6_15

    def hooked(self, command):
        return False


def make_core(router=None, watchers=None) -> MemoryCore:
    core = MemoryCore(Engine() if router is None else router, watchers=watchers)
    core.events = []
    return core


def connect(factory):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_beyond_the_limit_clients_are_told_and_closed():
    factory = ProxyServerFactory(make_core(), max_connections=2)
    (first, _), (_, t2) = connect(factory), connect(factory)
    _, t3 = connect(factory)
    assert t3.value() == TOO_MANY_CONNECTIONS and t3.disconnecting
    assert not t2.disconnecting and factory.rejected == 1
    first.connectionLost()
    _, t4 = connect(factory)
    assert t4.value() == b"" and not t4.disconnecting


def test_idle_sweep_spares_active_clients_and_pending_replies():
    core = make_core()
    factory = ProxyServerFactory(core, idle_timeout=10)
    (idle, t_idle), (busy, t_busy), (active, t_active) = (connect(factory) for _ in range(3))
    busy.dataReceived(b"get k\r\n")  # its reply is still pending
    core.clock.advance(9)
    active.dataReceived(b"version\r\n")
    core.clock.advance(1)
    factory.close_idle()
    assert t_idle.disconnecting
    assert not t_busy.disconnecting and not t_active.disconnecting


def test_idle_clients_are_closed_by_the_sweep_on_the_clock():
    """--idle-timeout: the sweep runs on the core's clock while the factory
    listens; a client that keeps sending, and a watcher, stay."""
    core = make_core(router=Unrouted(), watchers=WatchRegistry(reactor=Clock(),
                                                             publisher=LogPublisher()))
    factory = ProxyServerFactory(core, idle_timeout=0.4)
    factory.doStart()
    (_, t_idle), (active, t_active), (watcher, t_watcher) = (connect(factory)
                                                              for _ in range(3))
    watcher.dataReceived(b"watch proxyevents\r\n")
    for _ in range(3):
        core.clock.advance(0.1)
        active.dataReceived(b"version\r\n")
    assert not t_idle.disconnecting  # 0.3 s: not idle yet
    for _ in range(9):
        core.clock.advance(0.1)
        active.dataReceived(b"version\r\n")
    assert t_idle.disconnecting
    assert not t_active.disconnecting and not t_watcher.disconnecting
    assert factory.clients == {active}
    factory.doStop()
    assert not core.clock.getDelayedCalls()


# -- the output limit ----------------------------------------------------------

KB = 1024
#: The output limit of these tests: reading pauses past 64 KB waiting.
LIMIT = 1024 * KB


class KeysEngine:
    """Routes every request and every multiget (whole, with its sink) for
    the test to answer by hand."""

    plain_runs = None
    gathers = 0
    wire = WIRE_1_6_15

    def __init__(self) -> None:
        self.routed: list = []
        self.batches: list = []

    def hooked(self, command):
        return True

    def route(self, req, done):
        self.routed.append(done)

    def route_keys(self, req, keys, done, sink=None):
        self.batches.append((done, sink))
        return True


def output_client(limit: int = LIMIT):
    service = make_core(router=KeysEngine())
    factory = ProxyServerFactory(service, output_limit=limit)
    proto, transport = connect(factory)
    proto.log = Logger(observer=service.events.append)
    return proto, transport, service


def test_replies_waiting_pause_reading_and_resume_once_written():
    proto, transport, service = output_client()
    proto.dataReceived(b"get a\r\nget b\r\nget c\r\n")
    head, second, third = service.router.routed
    second(b"x" * 40 * KB)
    assert proto._waiting == 40 * KB and transport.producerState == "producing"
    third(b"y" * 40 * KB)  # 80 KB wait behind the head: past LIMIT / 16
    assert transport.producerState == "paused"
    proto.dataReceived(b"get d\r\n")
    assert len(service.router.routed) == 3  # read later
    proto.pauseProducing()  # Twisted's buffer is full: what it gets still waits
    head(b"h")
    assert transport.value().endswith(b"y" * 40 * KB)
    assert proto._waiting == 80 * KB + 1 and transport.producerState == "paused"
    proto.resumeProducing()  # Twisted wrote it all
    assert proto._waiting == 0 and transport.producerState == "producing"
    assert len(service.router.routed) == 4
    assert service.stats.conn_output_closed == 0


def test_past_the_limit_the_client_is_closed_counted_and_logged():
    proto, transport, service = output_client()
    proto.dataReceived(b"get a\r\nget b\r\nget c\r\n")
    head, second, third = service.router.routed
    second(b"x" * (LIMIT // 2))
    assert not transport.disconnecting
    third(b"y" * (LIMIT // 2 + 1))
    assert transport.disconnecting and service.stats.conn_output_closed == 1
    assert service.stats.curr_connections == 0 and not proto._slots
    head(b"late")  # an answer still coming is dropped
    assert transport.value() == b""
    [event] = [e for e in service.events if e["log_format"] == LOG_OUTPUT_LIMIT]
    assert event["waiting"] == LIMIT + 1 and event["limit"] == LIMIT
    assert event["client"] == "192.168.1.1:54321"
    proto.connectionLost()
    assert service.stats.curr_connections == 0


def test_a_multiget_counts_its_reply_while_it_arrives():
    proto, transport, service = output_client()
    proto.dataReceived(b"get a b c\r\n")
    [(done, sink)] = service.router.batches
    sink.arriving(100 * KB)
    assert proto._waiting == 100 * KB and transport.producerState == "paused"
    done(b"VALUE a 0 1\r\n1\r\nEND\r\n")  # the real bytes replace the count
    assert proto._waiting == 0 and transport.producerState == "producing"
    assert transport.value() == b"VALUE a 0 1\r\n1\r\nEND\r\n"
    proto.dataReceived(b"get a b c\r\n")
    done, sink = service.router.batches[1]
    sink.arriving(LIMIT)
    assert sink.wanted and not transport.disconnecting
    sink.arriving(1)
    assert not sink.wanted and transport.disconnecting
    assert service.stats.conn_output_closed == 1


def test_a_client_that_reads_is_not_cut_off():
    proto, transport, service = output_client()
    for _ in range(64):
        proto.dataReceived(b"get a b\r\n")
        done, sink = service.router.batches[-1]
        sink.arriving(LIMIT // 2)
        done(b"v" * (LIMIT // 2))
    assert not transport.disconnecting and proto._waiting == 0
    assert len(transport.value()) == 32 * LIMIT


def test_no_output_limit():
    proto, transport, service = output_client(limit=0)
    proto.dataReceived(b"get a b\r\n")
    done, sink = service.router.batches[-1]
    sink.arriving(64 * LIMIT)
    assert transport.producerState == "producing" and not transport.disconnecting


def test_the_option_reaches_the_clients():
    options = Options()
    options.parseOptions([])
    assert options["client-output-limit"] * 2**20 == CLIENT_OUTPUT_LIMIT
    options.parseOptions(["--client-output-limit=16"])
    service = ProxyService(None, [], output_limit=options["client-output-limit"] * 2**20)
    assert service.factory.buildProtocol(None).output_limit == 16 * 2**20


@pytest.mark.parametrize("args", [["--max-connections=-1"], ["--idle-timeout=-2"],
                                  ["--idle-timeout=soon"], ["--client-output-limit=-1"]])
def test_bad_limits_are_usage_errors(args):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


# -- end to end ----------------------------------------------------------------------


def is_open(sock: socket.socket) -> bool:
    """Whether the proxy still holds the connection open (nothing to read)."""
    sock.settimeout(0.05)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(10)


def admitted(proxy) -> tuple[socket.socket | None, bytes]:
    """A new client and its answer to ``version`` (None: it was turned away)."""
    sock = proxy.connect()
    sock.sendall(b"version\r\n")
    reply = read_until(sock, b"\r\n")
    if reply.startswith(b"VERSION"):
        return sock, reply
    sock.close()
    return None, reply


def retry_admitted(proxy) -> tuple[socket.socket, int]:
    """A client once the proxy has noticed earlier hang-ups (its own startup
    probe, a client just closed); and how many tries were turned away."""
    for rejected in range(50):
        sock, reply = admitted(proxy)
        if sock is not None:
            return sock, rejected
        assert reply == TOO_MANY_CONNECTIONS
        time.sleep(0.05)
    pytest.fail("never admitted")


@pytest.mark.e2e
def test_max_connections():
    proxy = Proxy(None, "--max-connections=2").start()
    try:
        first, rejected = retry_admitted(proxy)
        second, more = retry_admitted(proxy)
        with proxy.connect() as extra:
            assert read_until(extra, b"\r\n") == TOO_MANY_CONNECTIONS
            assert extra.recv(10) == b""
        rejected += more + 1
        second.close()
        stats_client, more = retry_admitted(proxy)
        rejected += more
        stats_client.sendall(b"stats\r\n")
        stats = read_until(stats_client, b"END\r\n")
        assert b"STAT rejected_connections %d\r\n" % rejected in stats
        assert b"STAT curr_connections 2\r\n" in stats
        first.close()
        stats_client.close()
    finally:
        proxy.stop()


@pytest.mark.e2e
def test_idle_timeout():
    """--idle-timeout through twistd (the sweep on the real reactor)."""
    proxy = Proxy(None, "--idle-timeout=0.4").start()
    try:
        idle, active = proxy.connect(), proxy.connect()
        watcher = proxy.connect()
        watcher.sendall(b"watch proxyevents\r\n")
        assert read_until(watcher, b"\r\n") == b"OK\r\n"
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            active.sendall(b"version\r\n")
            assert read_until(active, b"\r\n").startswith(b"VERSION")
            time.sleep(0.1)
        assert not is_open(idle)
        assert is_open(active) and is_open(watcher)  # watchers are never idle
    finally:
        proxy.stop()
