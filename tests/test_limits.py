"""Client limits: --max-connections and --idle-timeout."""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet.testing import StringTransport
from twisted.python import usage

from mcproxy.protocols.server import TOO_MANY_CONNECTIONS, ProxyServerFactory
from mcproxy.stats import ProxyStats
from mcproxy.tap import Options

from .servers import Proxy, read_until

# -- in process ------------------------------------------------------------------


class Service:
    def __init__(self) -> None:
        self.stats = ProxyStats()
        self.store = None
        self.version_line = b"VERSION test\r\n"

        class Engine:
            plain_runs = None  # plain requests go one by one

            def hooked(self, command):
                return True

            def route(self, req, done):
                pass  # never answered

            def route_keys(self, req, keys, done):
                return False

        self.engine = Engine()


def connect(factory):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_beyond_the_limit_clients_are_told_and_closed():
    factory = ProxyServerFactory(Service(), max_connections=2)
    (first, _), (_, t2) = connect(factory), connect(factory)
    _, t3 = connect(factory)
    assert t3.value() == TOO_MANY_CONNECTIONS and t3.disconnecting
    assert not t2.disconnecting and factory.rejected == 1
    first.connectionLost()
    _, t4 = connect(factory)
    assert t4.value() == b"" and not t4.disconnecting


def test_idle_sweep_spares_active_clients_and_pending_replies():
    factory = ProxyServerFactory(Service(), idle_timeout=10)
    (idle, t_idle), (busy, t_busy), (active, t_active) = (connect(factory) for _ in range(3))
    busy.dataReceived(b"get k\r\n")  # its reply is still pending
    idle.last_active -= 11
    busy.last_active -= 11
    factory.close_idle()
    assert t_idle.disconnecting
    assert not t_busy.disconnecting and not t_active.disconnecting


@pytest.mark.parametrize("args", [["--max-connections=-1"], ["--idle-timeout=-2"],
                                  ["--idle-timeout=soon"]])
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


def test_idle_timeout():
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
