"""Hostile clients against ``twistd -n mcproxy`` and two real memcached servers.

Each case checks the exact bytes the hostile client gets (and that it is
closed where memcached's proxy closes), that a well-behaved client on
another connection is served meanwhile, and, where memory is at stake, that
the proxy's resident memory (``VmRSS``) stays bounded. The in-process tests
at the end pin the limits themselves (see README.rst, "Reliability").
"""

from __future__ import annotations

import resource
import socket
import time

import pytest

from mcproxy.server.protocol import (
    BINARY_HEADER_WAIT,
    MAX_CLIENT_INFLIGHT_BYTES,
    MAX_MULTIGET_KEYS,
    MAX_MULTIGET_LINE,
    MAX_PAYLOAD,
)
from mcproxy.wire import errors
from tests.server.test_server import BINARY_GETK, BINARY_GETK_REFUSAL, connect, feed
from tests.servers import Memcached, Proxy, exchange, read_until

CONFIG = """
function mcp_config_pools()
    return mcp.pool({
        mcp.backend("a", "127.0.0.1", "%d"),
        mcp.backend("b", "127.0.0.1", "%d"),
    })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
"""

#: Connections in the many-connections test (the test process and the
#: proxy, which inherits its limits, each need a descriptor per connection).
MANY = 2000


@pytest.fixture(scope="module")
def proxy():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MANY * 2 + 200
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    servers = [Memcached().start() for _ in range(2)]
    proxy = Proxy(None, config_text=CONFIG % tuple(s.port for s in servers)).start()
    yield proxy
    proxy.stop()
    for s in servers:
        s.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def good(proxy):
    """A well-behaved client on its own connection."""
    sock = proxy.connect()
    yield sock
    sock.close()


def served(sock: socket.socket, tag: bytes = b"x") -> None:
    """The well-behaved client sets and reads back a key, exactly."""
    key = b"good/" + tag
    assert exchange(sock, b"set %s 0 0 4\r\nfine\r\n" % key, b"STORED\r\n") == b"STORED\r\n"
    want = b"VALUE %s 0 4\r\nfine\r\nEND\r\n" % key
    assert exchange(sock, b"get %s\r\n" % key, want) == want


def rss_mb(proxy, field: str = "VmRSS") -> float:
    """The proxy's resident memory now (VmHWM: its peak so far), in MB."""
    with open(f"/proc/{proxy.proc.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the proxy hangs up (reading and dropping anything before)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_byte_at_a_time(proxy, good):
    request = b"set slow/k 0 0 5\r\nhello\r\nget slow/k\r\nmn\r\n"
    with proxy.connect() as s:
        for i, byte in enumerate(request):
            s.sendall(bytes([byte]))
            if i % 8 == 0:
                served(good, b"%d" % i)
            time.sleep(0.001)
        want = b"STORED\r\nVALUE slow/k 0 5\r\nhello\r\nEND\r\nMN\r\n"
        assert read_until(s, b"MN\r\n") == want


def test_ten_thousand_keys_in_one_get(proxy, good):
    keys = [b"many/%d" % i for i in range(10000)]
    stored = keys[::97]
    with proxy.connect() as s:
        s.sendall(b"".join(b"set %s 0 0 %d noreply\r\n%s\r\n" % (k, len(k), k) for k in stored))
        assert exchange(s, b"mn\r\n", b"MN\r\n") == b"MN\r\n"
        before = rss_mb(proxy)
        s.sendall(b"get " + b" ".join(keys) + b"\r\n")
        served(good)
        want = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(k), k) for k in stored) + b"END\r\n"
        s.settimeout(30)
        assert read_until(s, b"END\r\n") == want
        assert exchange(s, b"mn\r\n", b"MN\r\n") == b"MN\r\n"
    assert rss_mb(proxy) - before < 40


def test_too_many_keys_in_one_get(proxy, good):
    with proxy.connect() as s:
        s.sendall(b"get " + b" ".join(b"%d" % i for i in range(MAX_MULTIGET_KEYS + 1)) + b"\r\n")
        served(good)
        assert read_until(s, b"\r\n") == errors.REQUEST_TOO_LONG
        assert closed(s)


def test_endless_get_line_is_cut_off(proxy, good):
    before = rss_mb(proxy)
    with proxy.connect() as s:
        s.sendall(b"get ")
        sent = 0
        try:
            while sent < 3 * MAX_MULTIGET_LINE:
                s.sendall(b"k " * 32768)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        served(good)
        assert read_until(s, b"\r\n") in (errors.REQUEST_TOO_LONG, b"")
        assert closed(s)
    assert rss_mb(proxy) - before < 30


@pytest.mark.parametrize("request_, reply", [
    # memcached's proxy: a key line too long for a route; closed after it
    (b"get " + b"k" * 2**20 + b"\r\n", errors.REQUEST_TOO_LONG),
    # over 1024 bytes without a newline and not a get: closed, no reply
    (b"set " + b"k" * 2**20 + b" 0 0 1\r\nx\r\n", b""),
    (b"mg " + b"k" * 2**20 + b" v\r\n", b""),
])
def test_one_megabyte_keys(proxy, good, request_, reply):
    with proxy.connect() as s:
        try:
            s.sendall(request_)
        except (BrokenPipeError, ConnectionResetError):
            pass
        served(good)
        assert read_until(s, b"\r\n") == reply
        assert closed(s)


@pytest.mark.parametrize("line", [
    b"set neg/k 0 0 -1\r\n",
    b"set neg/k 0 0 -2147483648\r\n",
    b"set neg/k 0 0 2147483646\r\n",  # over INT_MAX - 2
    b"set neg/k 0 0 4294967297\r\n",
    b"set neg/k 0 0 99999999999999999999999999\r\n",
    b"cas neg/k 0 0 -1 1\r\n",
    b"ms neg/k -1\r\n",
    b"ms neg/k 18446744073709551617\r\n",
])
def test_negative_and_overflowing_lengths(proxy, good, line):
    with proxy.connect() as s:
        s.sendall(line)
        served(good)
        want = errors.PARSING_REQUEST + b"MN\r\n"
        assert exchange(s, b"mn\r\n", want) == want


def test_payload_longer_than_declared(proxy, good):
    with proxy.connect() as s:
        s.sendall(b"set long/k 0 0 3\r\nabcdef\r\n")
        served(good)
        want = errors.BAD_DATA_CHUNK + errors.PARSING_REQUEST + b"END\r\nMN\r\n"
        assert exchange(s, b"get long/k\r\nmn\r\n", want) == want


def test_payload_shorter_than_declared(proxy, good):
    with proxy.connect() as s:
        s.sendall(b"set short/k 0 0 10\r\nabc\r\n")
        served(good)
        # The next request is read as the rest of the payload, as memcached does.
        assert exchange(s, b"get x\r\n", b"STORED\r\n") == b"STORED\r\n"
        want = b"VALUE short/k 0 10\r\nabc\r\nget x\r\nEND\r\n"
        assert exchange(s, b"get short/k\r\n", want) == want


def test_declared_payload_over_the_limit_is_dropped_as_it_comes(proxy, good):
    before = rss_mb(proxy)
    with proxy.connect() as s:
        s.sendall(b"set huge/k 0 0 %d\r\n" % (MAX_PAYLOAD + 1))
        assert read_until(s, b"\r\n") == errors.OBJECT_TOO_LARGE
        chunk = b"x" * 2**20
        for _ in range(MAX_PAYLOAD // len(chunk)):
            s.sendall(chunk)
        served(good)
        want = b"END\r\nMN\r\n"
        assert exchange(s, b"x\r\nget huge/k\r\nmn\r\n", want) == want
    assert rss_mb(proxy) - before < 30


def test_binary_protocol_is_refused_and_closed(proxy, good):
    with proxy.connect() as s:
        s.sendall(BINARY_GETK)
        served(good)
        assert read_until(s, errors.BINARY_PROTOCOL) == BINARY_GETK_REFUSAL
        assert closed(s)
    # Only the first byte of a connection counts.
    with proxy.connect() as s:
        want = b"MN\r\n" + errors.ERROR
        assert exchange(s, b"mn\r\n\x80 k\r\n", want) == want


def test_idle_connections_held_open(proxy, good):
    idle = [proxy.connect() for _ in range(300)]
    try:
        time.sleep(0.5)
        served(good)
        for s in idle[::50]:
            assert exchange(s, b"mn\r\n", b"MN\r\n") == b"MN\r\n"
    finally:
        for s in idle:
            s.close()


def test_two_thousand_concurrent_connections(proxy, good):
    """The proxy inherits this process's RLIMIT_NOFILE, raised by the fixture."""
    before = rss_mb(proxy)
    socks = []
    try:
        for _ in range(MANY):
            socks.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=20))
        for i, s in enumerate(socks):
            s.sendall(b"set conn/%d 0 0 %d\r\n%d\r\nmg conn/%d v\r\n" % (i, len(b"%d" % i), i, i))
        served(good)
        for i, s in enumerate(socks):
            want = b"STORED\r\nVA %d\r\n%d\r\n" % (len(b"%d" % i), i)
            assert read_until(s, want) == want
        grown = rss_mb(proxy) - before
        assert grown < MANY * 20 / 1024  # under 20 KB per busy connection
    finally:
        for s in socks:
            s.close()


def test_client_that_never_reads_its_replies(proxy, good):
    value = b"v" * 4096
    with proxy.connect() as s:
        assert exchange(s, b"set lazy/k 0 0 4096\r\n%s\r\n" % value, b"STORED\r\n") \
            == b"STORED\r\n"
        before = rss_mb(proxy)
        s.setblocking(False)
        request = b"get lazy/k\r\n" * 1000
        sent = 0
        stalled = 0
        deadline = time.monotonic() + 15
        while sent < 40_000_000 and time.monotonic() < deadline:
            try:
                sent += s.send(request)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                if stalled > 20:  # 1 s without the proxy reading
                    break
                time.sleep(0.05)
        assert stalled > 20, f"the proxy kept reading ({sent} bytes)"
        served(good)
        grown = rss_mb(proxy) - before
        # at most 4096 requests in flight plus a write buffer, not `sent`
        assert sent < 40_000_000 and grown < 60
    served(good, b"after")


def stat(sock: socket.socket, name: bytes) -> int:
    sock.sendall(b"stats\r\n")
    reply = read_until(sock, b"END\r\n")
    return int(reply.split(b"STAT %s " % name)[1].split(b"\r\n")[0])


#: --client-output-limit of the proxy below, in MB.
OUTPUT_LIMIT_MB = 16


@pytest.fixture(scope="module", params=["direct", "lua"])
def limited(request):
    """A proxy with a small output limit, so that what a client can make
    it hold is seen in its resident memory at once; its route a direct pool
    call, or one that runs Lua per request (and hands each value to Lua)."""
    servers = [Memcached().start() for _ in range(2)]
    config = CONFIG % tuple(s.port for s in servers)
    if request.param == "lua":
        config = config.replace("return pool(r)", "local res = pool(r) return res")
    proxy = Proxy(None, f"--client-output-limit={OUTPUT_LIMIT_MB}",
                  config_text=config).start()
    proxy.route = request.param
    yield proxy
    proxy.stop()
    for s in servers:
        s.stop()


def test_multigets_of_large_values_never_read(limited):
    """Each line of 16,000 keys asks for 512 MB of one 32 KB item: the
    proxy stops reading at 1 MB waiting and closes the client past 16 MB,
    dropping the rest as it comes."""
    value = b"v" * 32768
    with limited.connect() as good:
        assert exchange(good, b"set k 0 0 32768\r\n%s\r\n" % value, b"STORED\r\n") \
            == b"STORED\r\n"
        before = rss_mb(limited, "VmHWM")
        started = time.monotonic()
        with limited.connect() as s:
            s.setblocking(False)
            line = b"get " + b" ".join([b"k"] * 16000) + b"\r\n"
            for _ in range(3):
                try:
                    s.send(line)
                except BlockingIOError:
                    break
            while not stat(good, b"proxy_conn_output_closed"):
                assert time.monotonic() - started < 15, "the client was never closed"
                time.sleep(0.02)
            served(good)
            s.setblocking(True)
            assert closed(s)
        time.sleep(1)  # what still comes for it is dropped
        served(good, b"after")
        assert time.monotonic() - started < 20
    grown = rss_mb(limited, "VmHWM") - before
    # Besides the replies: the state of the line's 16,000 requests, which a
    # Lua route holds as a coroutine each until its reply (about 3.5 KB).
    assert grown < OUTPUT_LIMIT_MB + (24 if limited.route == "direct" else 72)
    assert f"over the output limit of {OUTPUT_LIMIT_MB * 2**20}" in limited.log()


# -- the limits, in process -------------------------------------------------------


@pytest.mark.parametrize("chunks", [[b"\x80\x01"], [b"", b"\x80"]])
def test_binary_magic_on_the_first_byte(chunks):
    """An empty first read (none on a real socket) must not use up the check."""
    proto, transport, service = connect()
    feed(proto, *chunks)
    service.clock.advance(BINARY_HEADER_WAIT)
    assert transport.value().endswith(errors.BINARY_PROTOCOL) and transport.disconnecting


def test_unterminated_multiget_line_cap():
    proto, transport, service = connect()
    feed(proto, b"get ")
    for _ in range(MAX_MULTIGET_LINE // 65536 - 1):
        feed(proto, b"k " * 32768)
    assert not transport.disconnecting
    feed(proto, b"k " * 32768)
    assert transport.value() == errors.REQUEST_TOO_LONG and transport.disconnecting
    assert not service.router.routed and not proto._buffer


def test_multiget_key_cap():
    proto, transport, service = connect()
    keys = b" ".join(b"%d" % i for i in range(MAX_MULTIGET_KEYS))
    feed(proto, b"get " + keys + b"\r\n")
    assert len(service.router.routed) == MAX_MULTIGET_KEYS
    proto, transport, service = connect()
    feed(proto, b"get " + keys + b" more\r\n")
    assert transport.value() == errors.REQUEST_TOO_LONG and transport.disconnecting
    assert not service.router.routed


def test_payload_cap_swallows_and_keeps_the_connection_in_step():
    proto, transport, service = connect()
    feed(proto, b"set k 0 0 %d\r\n" % (MAX_PAYLOAD + 1))
    assert transport.value() == errors.OBJECT_TOO_LARGE
    for _ in range(64):
        feed(proto, b"x" * 2**20)
    assert not proto._payload_chunks
    feed(proto, b"x\r\nmn\r\n")
    assert transport.value() == errors.OBJECT_TOO_LARGE + b"MN\r\n"
    assert not service.router.routed
    # At the limit, the value goes through.
    feed(proto, b"set k 0 0 %d\r\n" % MAX_PAYLOAD, b"y" * MAX_PAYLOAD, b"\r\n")
    [(req, _)] = service.router.routed
    assert len(req.value) == MAX_PAYLOAD + 2


def test_reading_pauses_on_payload_bytes_in_flight():
    proto, transport, service = connect()
    value = b"v" * 2**20
    count = MAX_CLIENT_INFLIGHT_BYTES // len(value)
    for i in range(count - 1):
        feed(proto, b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
    assert transport.producerState == "producing"
    feed(proto, b"set last 0 0 %d\r\n%s\r\nmn\r\n" % (len(value), value))
    assert transport.producerState == "paused"
    assert len(service.router.routed) == count  # mn waits in the buffer
    routed = service.router.routed[:]
    del service.router.routed[:]
    for _req, done in routed[: count // 2 + 1]:
        done(b"STORED\r\n")
    assert transport.producerState == "producing"
    for _req, done in routed[count // 2 + 1:]:
        done(b"STORED\r\n")
    assert transport.value() == b"STORED\r\n" * count + b"MN\r\n"
    assert proto._inflight_bytes == 0
