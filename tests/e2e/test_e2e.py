"""End to end: clients -> ``twistd -n mcproxy`` -> real memcached servers."""

from __future__ import annotations

import socket
import time

import pytest
from pymemcache.client.base import Client

from mcproxy.wire import errors
from tests.ops.test_stats import MEMCACHED_CMD_ORDER
from tests.servers import Memcached, Proxy, exchange, read_until

# Keys under "slow/" go to pool A, everything else to pool B (two servers,
# sharded by jump hash); routes can also answer with strings or misbehave.
CONFIG = """
function mcp_config_pools()
    local a = mcp.pool({ mcp.backend("a1", "127.0.0.1", "%(a)d") })
    local b = mcp.pool({
        mcp.backend("b1", "127.0.0.1", "%(b1)d"),
        mcp.backend("b2", "127.0.0.1", "%(b2)d"),
    })
    local down = mcp.pool({ mcp.backend("down", "127.0.0.1", "%(down)d") })
    mcp.add_stat(1, "no_route")
    return { a = a, b = b, down = down }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        local key = r:key()
        if string.find(key, "^slow/") then
            return p.a(r)
        elseif string.find(key, "^down/") then
            return p.down(r)
        elseif string.find(key, "^string/") then
            return "SERVER_ERROR no route\\r\\n"
        elseif string.find(key, "^nil/") then
            return nil
        elseif string.find(key, "^number/") then
            return 42
        elseif string.find(key, "^error/") then
            error("deliberate failure")
        elseif string.find(key, "^norc/") then
            mcp.stat(1, 1)
            return "SERVER_ERROR no route\\r\\n"
        end
        return p.b(r)
    end)
end
"""


@pytest.fixture(scope="module")
def cluster():
    servers = {name: Memcached().start() for name in ("a", "b1", "b2")}
    ports = {name: s.port for name, s in servers.items()}
    ports["down"] = Memcached().port  # nothing listens there
    proxy = Proxy(None, config_text=CONFIG % ports).start()
    yield proxy, servers
    proxy.stop()
    for s in servers.values():
        s.stop()


@pytest.fixture
def proxy(cluster):
    return cluster[0]


@pytest.fixture
def client(proxy):
    c = Client(("127.0.0.1", proxy.port), timeout=10, connect_timeout=5)
    yield c
    c.close()


def test_set_get_delete(client):
    assert client.set("k1", b"v1", noreply=False)
    assert client.get("k1") == b"v1"
    assert client.delete("k1", noreply=False)
    assert client.get("k1") is None


def test_text_commands_through_the_proxy(proxy):
    steps = [
        (b"set t/k 5 0 3\r\nabc\r\n", b"STORED\r\n"),
        (b"get t/k\r\n", b"VALUE t/k 5 3\r\nabc\r\nEND\r\n"),
        (b"add t/k 0 0 1\r\nx\r\n", b"NOT_STORED\r\n"),
        (b"replace t/k 0 0 3\r\nxyz\r\n", b"STORED\r\n"),
        (b"append t/k 0 0 2\r\n12\r\n", b"STORED\r\n"),
        (b"prepend t/k 0 0 2\r\n00\r\n", b"STORED\r\n"),
        (b"get t/k\r\n", b"VALUE t/k 0 7\r\n00xyz12\r\nEND\r\n"),
        (b"touch t/k 100\r\n", b"TOUCHED\r\n"),
        (b"gat 100 t/k\r\n", b"VALUE t/k 0 7\r\n00xyz12\r\nEND\r\n"),
        (b"set t/n 0 0 1\r\n5\r\n", b"STORED\r\n"),
        (b"incr t/n 10\r\n", b"15\r\n"),
        (b"decr t/n 20\r\n", b"0\r\n"),
        (b"delete t/n\r\n", b"DELETED\r\n"),
        (b"delete t/n\r\n", b"NOT_FOUND\r\n"),
        (b"incr t/n 1\r\n", b"NOT_FOUND\r\n"),
        (b"get t/missing\r\n", b"END\r\n"),
    ]
    with proxy.connect() as s:
        for request, expected in steps:
            assert exchange(s, request, expected) == expected, request


def test_gets_and_cas(proxy):
    with proxy.connect() as s:
        s.sendall(b"set c/k 0 0 2\r\nv1\r\ngets c/k\r\n")
        reply = read_until(s, b"END\r\n")
        assert reply.startswith(b"STORED\r\nVALUE c/k 0 2 ")
        cas = reply.split(b"\r\n")[1].split()[4]
        s.sendall(b"cas c/k 0 0 2 %s\r\nv2\r\n" % cas)
        assert read_until(s, b"\r\n") == b"STORED\r\n"
        s.sendall(b"cas c/k 0 0 2 %s\r\nv3\r\n" % cas)
        assert read_until(s, b"\r\n") == b"EXISTS\r\n"
        s.sendall(b"gats 0 c/k\r\n")
        assert read_until(s, b"END\r\n").startswith(b"VALUE c/k 0 2 ")


def test_meta_commands(proxy):
    with proxy.connect() as s:
        for request, expected in [
            (b"ms m/k 2 T0 F7\r\nhi\r\n", b"HD\r\n"),
            (b"mg m/k v f\r\n", b"VA 2 f7\r\nhi\r\n"),
            (b"mg m/missing v\r\n", b"EN\r\n"),
            (b"ma m/n N0 J13\r\n", b"HD\r\n"),
            (b"ma m/n v\r\n", b"VA 2\r\n14\r\n"),
            (b"md m/k\r\n", b"HD\r\n"),
            (b"md m/k\r\n", b"NF\r\n"),
            (b"mn\r\n", b"MN\r\n"),
        ]:
            assert exchange(s, request, expected) == expected, request


def test_meta_quiet_mode(proxy):
    with proxy.connect() as s:
        s.sendall(b"ms q/k 1 q\r\nx\r\nmg q/missing v q\r\nmg q/k v q\r\n"
                  b"md q/missing q\r\nmn\r\n")
        assert read_until(s, b"MN\r\n") == b"VA 1\r\nx\r\nNF\r\nMN\r\n"


def test_noreply(proxy, cluster):
    with proxy.connect() as s:
        s.sendall(b"set nr/k 0 0 1 noreply\r\nx\r\ndelete nr/k noreply\r\n"
                  b"set nr/j 0 0 1 noreply\r\ny\r\nget nr/k nr/j\r\n")
        assert read_until(s, b"END\r\n") == b"VALUE nr/j 0 1\r\ny\r\nEND\r\n"


def test_multiget_hits_and_misses(proxy):
    with proxy.connect() as s:
        s.sendall(b"".join(b"set mg/%d 0 0 1\r\n%d\r\n" % (i, i) for i in range(0, 10, 2)))
        assert read_until(s, b"STORED\r\n" * 5) == b"STORED\r\n" * 5
        s.sendall(b"get " + b" ".join(b"mg/%d" % i for i in range(10)) + b"\r\n")
        expected = b"".join(b"VALUE mg/%d 0 1\r\n%d\r\n" % (i, i) for i in range(0, 10, 2))
        assert read_until(s, b"END\r\n") == expected + b"END\r\n"


def test_keys_with_high_bytes(proxy, cluster):
    key = bytes(range(0x80, 0x100))[:100]
    with proxy.connect() as s:
        s.sendall(b"set " + key + b" 0 0 2\r\nhi\r\nget " + key + b" x\r\n")
        assert read_until(s, b"END\r\n") == (
            b"STORED\r\nVALUE " + key + b" 0 2\r\nhi\r\nEND\r\n")
    holders = [m for name, m in cluster[1].items() if m.get(key) == b"hi"]
    assert len(holders) == 1


def test_large_values(proxy):
    value = bytes(range(256)) * 2000  # 512,000 bytes
    with proxy.connect() as s:
        s.sendall(b"set big/k 0 0 %d\r\n%s\r\nget big/k\r\n" % (len(value), value))
        reply = read_until(s, b"END\r\n")
    assert reply == b"STORED\r\nVALUE big/k 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)


def test_pipelined_100_in_one_write(proxy):
    data = b"".join(b"set p/%d 0 0 %d\r\n%s\r\n" % (i, len(str(i)), str(i).encode())
                    for i in range(50))
    data += b"".join(b"get p/%d\r\n" % i for i in range(50))
    expected = b"STORED\r\n" * 50 + b"".join(
        b"VALUE p/%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(str(i)), i) for i in range(50))
    with proxy.connect() as s:
        s.sendall(data)
        assert read_until(s, b"VALUE p/49 0 2\r\n49\r\nEND\r\n") == expected


def test_replies_stay_in_order_when_backends_differ_in_speed(proxy, cluster):
    slow = cluster[1]["a"]
    with proxy.connect() as s:
        s.sendall(b"set slow/k 0 0 4\r\nslow\r\nset fast/k 0 0 4\r\nfast\r\n")
        assert read_until(s, b"STORED\r\nSTORED\r\n") == b"STORED\r\nSTORED\r\n"
        slow.pause()
        try:
            s.sendall(b"get slow/k\r\nget fast/k\r\nget slow/k fast/k\r\n")
            time.sleep(0.3)  # the fast backend answers now; nothing may be written
            s.setblocking(False)
            try:
                early = s.recv(100)
            except BlockingIOError:
                early = b""
            s.settimeout(10)
            assert early == b""
        finally:
            slow.resume()
        expected = (b"VALUE slow/k 0 4\r\nslow\r\nEND\r\n"
                    b"VALUE fast/k 0 4\r\nfast\r\nEND\r\n"
                    b"VALUE slow/k 0 4\r\nslow\r\nVALUE fast/k 0 4\r\nfast\r\nEND\r\n")
        assert exchange(s, b"", expected) == expected


@pytest.mark.parametrize("request_bytes, expected", [
    (b"flurb\r\n", errors.ERROR),
    (b"config get cluster\r\n", errors.ERROR),
    (b"shutdown\r\n", errors.PARSING_REQUEST),
    (b"version\n", errors.PARSING_REQUEST),
    (b"get string/k\r\n", b"SERVER_ERROR no route\r\n"),
    (b"get error/k\r\n", errors.LUA_FAILURE),
    (b"get nil/k\r\n", errors.BAD_RESPONSE),
    (b"get number/k\r\n", errors.BAD_RESPONSE),
    (b"get down/k\r\n", errors.BACKEND_FAILURE),
    (b"set k 0 0 1\r\nxyz", errors.BAD_DATA_CHUNK),
    (b"get a " + b"k" * 251 + b"\r\n", errors.KEY_TOO_LONG + errors.END),
])
def test_error_replies_keep_the_connection(proxy, request_bytes, expected):
    with proxy.connect() as s:
        s.sendall(request_bytes)
        assert read_until(s, expected) .endswith(expected)
        s.sendall(b"version\r\n")
        assert read_until(s, b"\r\n").startswith(b"VERSION ")


def test_backend_failure_inside_a_multiget(proxy):
    with proxy.connect() as s:
        s.sendall(b"set ok/k 0 0 1\r\nx\r\nget down/k ok/k\r\n")
        assert read_until(s, b"END\r\n") == (
            b"STORED\r\n" + errors.BACKEND_FAILURE + b"VALUE ok/k 0 1\r\nx\r\nEND\r\n")


def test_request_too_long_closes(proxy):
    with proxy.connect() as s:
        s.sendall(b"get " + b"k" * 500 + b"\r\n")
        assert read_until(s, b"\r\n") == errors.REQUEST_TOO_LONG
        assert s.recv(10) == b""


def test_unterminated_line_closes_silently(proxy):
    with proxy.connect() as s:
        s.sendall(b"set " + b"k" * 1100)
        assert s.recv(10) == b""


def test_local_version_and_stats(proxy):
    with proxy.connect() as s:
        s.sendall(b"get norc/k\r\nversion\r\nstats\r\n")
        reply = read_until(s, b"END\r\n")
        assert b"SERVER_ERROR no route\r\nVERSION " in reply
        for name in (b"proxy_conn_requests", b"proxy_conn_errors", b"proxy_req_active",
                     b"proxy_config_reloads", b"proxy_backend_total"):
            assert b"STAT " + name + b" " in reply
        s.sendall(b"stats proxy\r\n")
        reply = read_until(s, b"END\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"STAT user_no_route ")
    assert int(lines[0].split()[2]) >= 1
    names = [line.split()[1].decode() for line in lines[1:21]]
    assert names == MEMCACHED_CMD_ORDER


def test_stats_cachedump_and_detail(proxy):
    """pymemcache's ``test_misc`` sends these; memcached answers as below."""
    want = b"END\r\nEND\r\nOK\r\nOK\r\n" + errors.ILLEGAL_SLAB_ID
    with proxy.connect() as s:
        s.sendall(b"stats cachedump 1 1\r\nstats detail dump\r\nstats detail on\r\n"
                  b"stats detail off\r\nstats cachedump 64 1\r\n")
        assert read_until(s, want) == want


def test_client_disconnects_mid_flight(proxy, cluster):
    slow = cluster[1]["a"]
    slow.pause()
    try:
        for data in (b"get slow/k\r\nget fast/k\r\n", b"set fast/x 0 0 100\r\nabc"):
            s = proxy.connect()
            s.sendall(data)
            time.sleep(0.05)
            s.close()
    finally:
        slow.resume()
    with proxy.connect() as s:
        s.sendall(b"set fast/y 0 0 1\r\nz\r\nget fast/y\r\n")
        assert read_until(s, b"END\r\n") == b"STORED\r\nVALUE fast/y 0 1\r\nz\r\nEND\r\n"
    time.sleep(0.2)
    assert "Traceback" not in proxy.log()


def test_many_concurrent_clients(proxy):
    socks = [proxy.connect() for _ in range(50)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"set cc/%d 0 0 %d\r\n%d\r\nget cc/%d\r\n" % (i, len(str(i)), i, i))
        for i, s in enumerate(socks):
            assert read_until(s, b"END\r\n") == (
                b"STORED\r\nVALUE cc/%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(str(i)), i))
    finally:
        for s in socks:
            s.close()


def test_no_tracebacks_in_log(proxy):
    assert "Traceback" not in proxy.log()


def test_bad_config_stops_twistd():
    proxy = Proxy(None, config_text="function mcp_config_pools()\n  return nil + 1\nend\n")
    proxy.start(wait=False)
    code = proxy.proc.wait(30)
    output = proxy.proc.stdout.read().decode()
    proxy.stop()
    assert code != 0
    assert "route.lua:2:" in output
    assert "attempt to perform arithmetic" in output


def test_syntax_error_names_file_and_line():
    proxy = Proxy(None, config_text="function mcp_config_pools()\n  return {\nend\n")
    proxy.start(wait=False)
    code = proxy.proc.wait(30)
    output = proxy.proc.stdout.read().decode()
    proxy.stop()
    assert code != 0
    assert "route.lua:3:" in output


def test_no_socket_left_behind_by_a_closing_client(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"quit\r\n")
    assert s.recv(10) == b""
    s.close()
