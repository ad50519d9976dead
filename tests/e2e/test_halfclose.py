"""Half-closed clients and bursts of connections, against ``twistd -n mcproxy``
and a real memcached (see README.rst, "Half-closed clients and connection
bursts")."""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time

import pytest

from tests.servers import Memcached, Proxy

CONFIG = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("a", "127.0.0.1", "%d") })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
"""

#: A value larger than the sockets' buffers, so its reply is still being
#: written when the client's EOF is read.
LARGE = bytes(range(256)) * 3000


@pytest.fixture(scope="module")
def memcached():
    server = Memcached().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["routed", "embedded"])
def proxy(request, memcached):
    """The proxy routing to memcached, and with no route config at all."""
    if request.param == "routed":
        proxy = Proxy(None, config_text=CONFIG % memcached.port)
    else:
        proxy = Proxy(None)
    yield proxy.start()
    proxy.stop()


def pipeline(prefix: bytes) -> tuple[bytes, bytes]:
    """Many pipelined requests (sets, gets, a multi-key get, a large value,
    then many small gets) and the exact replies memcached gives them."""
    requests, replies = [], []
    for i in range(300):
        key, value = b"%s/%d" % (prefix, i), b"v%d" % i
        requests.append(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        replies.append(b"STORED\r\n")
        requests.append(b"get %s\r\n" % key)
        replies.append(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value))
    keys = [b"%s/%d" % (prefix, i) for i in range(0, 300, 7)]
    requests.append(b"get %s %s/missing\r\n" % (b" ".join(keys), prefix))
    replies.append(b"".join(b"VALUE %s 0 %d\r\nv%s\r\n" % (k, len(k.split(b"/")[-1]) + 1,
                                                           k.split(b"/")[-1]) for k in keys)
                   + b"END\r\n")
    big = prefix + b"/big"
    requests.append(b"set %s 0 0 %d\r\n%s\r\n" % (big, len(LARGE), LARGE))
    replies.append(b"STORED\r\n")
    for _ in range(3):
        requests.append(b"get %s\r\n" % big)
        replies.append(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (big, len(LARGE), LARGE))
    # More replies than one send takes (MAX_IOV), left to Twisted to write.
    for i in range(1000):
        key, value = b"%s/%d" % (prefix, i % 300), b"v%d" % (i % 300)
        requests.append(b"get %s\r\n" % key)
        replies.append(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value))
    requests.append(b"mn\r\n")
    replies.append(b"MN\r\n")
    return b"".join(requests), b"".join(replies)


def half_closed_exchange(address: tuple[str, int], requests: bytes) -> bytes:
    """Send every request, shut down the write side, then read until EOF.

    The requests are sent from a thread, so that a server that stops reading
    until its replies are read cannot stall the client; reading starts a
    little after the EOF was sent, as with a script that writes everything
    before it reads."""
    with socket.create_connection(address, timeout=10) as s:
        def send() -> None:
            s.sendall(requests)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.2)
        received = []
        try:
            while chunk := s.recv(1 << 20):
                received.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        sender.join(10)
    return b"".join(received)


def test_memcached_answers_a_half_closed_client(memcached):
    requests, replies = pipeline(b"hc-direct")
    assert half_closed_exchange(memcached.address, requests) == replies


def test_half_closed_client_gets_every_reply_in_order(proxy, request):
    requests, replies = pipeline(b"hc-" + request.node.callspec.id.encode())
    got = half_closed_exchange(("127.0.0.1", proxy.port), requests)
    assert len(got) == len(replies)
    assert got == replies


def test_half_closed_clients_in_a_row(proxy):
    """Short exchanges, many times: the EOF often arrives with the requests."""
    for i in range(50):
        request = b"set hc-row/%d 0 0 1\r\nx\r\nget hc-row/%d\r\n" % (i, i)
        want = b"STORED\r\nVALUE hc-row/%d 0 1\r\nx\r\nEND\r\n" % i
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got == want


def test_half_close_behind_more_requests_than_the_proxy_takes_at_once(proxy):
    """More requests than MAX_CLIENT_INFLIGHT: the proxy stops reading with
    the EOF still unread, and must answer the rest once it reads again."""
    requests = b"".join(b"get hc-many/%d\r\n" % i for i in range(6000))
    assert half_closed_exchange(("127.0.0.1", proxy.port), requests) == b"END\r\n" * 6000


#: Connections opened at once in the burst test.
BURST = 3000
#: Seconds within which every connection of the burst must be answered.
BURST_SECONDS = 3.0


@pytest.fixture(scope="module")
def routed_proxy(memcached):
    """A proxy routing to memcached, able to hold BURST clients (it inherits
    the descriptor limit of the test process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = BURST + 500
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    proxy = Proxy(None, config_text=CONFIG % memcached.port).start()
    yield proxy
    proxy.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def burst(port: int, count: int, timeout: float) -> tuple[int, float]:
    """Open ``count`` connections at once (non-blocking, one thread), send
    one ``get`` on each as soon as it is connected, and read its reply.
    Returns how many were answered, and the seconds until the last was."""
    selector = selectors.DefaultSelector()
    replies: dict[socket.socket, bytes] = {}
    start = time.monotonic()
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        replies[s] = b""
        selector.register(s, selectors.EVENT_WRITE, b"get burst/%d\r\n" % i)
    answered, last = 0, start
    try:
        while answered < count and time.monotonic() - start < timeout:
            for key, events in selector.select(0.1):
                s = key.fileobj
                if events & selectors.EVENT_WRITE:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        selector.unregister(s)  # refused or reset: never answered
                        continue
                    s.send(key.data)
                    selector.modify(s, selectors.EVENT_READ)
                    continue
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                replies[s] += chunk
                if replies[s] == b"END\r\n" or not chunk:
                    selector.unregister(s)
                    if replies[s] == b"END\r\n":
                        answered += 1
                        last = time.monotonic()
    finally:
        selector.close()
        for s in replies:
            s.close()
    return answered, last - start


def test_a_burst_of_connections_is_answered_at_once(routed_proxy):
    answered, seconds = burst(routed_proxy.port, BURST, timeout=BURST_SECONDS + 5)
    assert answered == BURST
    assert seconds < BURST_SECONDS
