"""TLS on both sides: clients on an ``ssl:`` --listen endpoint, backends
with ``mcp.backend{..., tls = true}``.

Certificates are self-signed and made here (the ``cryptography`` package
comes with pyOpenSSL, which Twisted's TLS needs). Backends are real
memcached servers with TLS on (``-Z``), plain ones, and an mcproxy that
terminates TLS in front of a plain memcached.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.testing import MemoryReactorClock

from mcproxy.backends.backend import Backend
from mcproxy.backends.options import BackendOptions
from mcproxy.routing.engine import ConfigError
from mcproxy.wire import errors
from tests.servers import Memcached, Proxy, free_port, read_until, wait_for_port


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and 127.0.0.1 (its own
    CA), written as ``name.key``/``name.pem``; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mcproxy test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """(key, cert) of the servers, and the cert of a CA that signed neither."""
    directory = tmp_path_factory.mktemp("tls")
    key, cert = make_certificate(directory, "server")
    _, other = make_certificate(directory, "other")
    return key, cert, other


def ssl_listen(port: int, key: Path, cert: Path) -> str:
    return f"--listen=ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"


class TLSMemcached(Memcached):
    """memcached with TLS on its port (Debian's build has it: ``-Z``)."""

    def __init__(self, key: Path, cert: Path) -> None:
        super().__init__()
        self.key, self.cert = key, cert

    def options(self) -> list[str]:
        return ["-Z", "-o", f"ssl_chain_cert={self.cert},ssl_key={self.key}"]


def tls_connect(port: int, cert: Path) -> ssl.SSLSocket:
    """A verifying TLS client connection to 127.0.0.1:port."""
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# -- clients over TLS ----------------------------------------------------------

# Everything goes to one plain memcached.
ONE_BACKEND = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("m", "127.0.0.1", "%(port)d") })
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p(r) end)
end
"""


@pytest.fixture(scope="module")
def tls_proxy(certs):
    """A proxy on a TCP and an ssl: endpoint, in front of one memcached."""
    key, cert, _ = certs
    server = Memcached().start()
    tls_port = free_port()
    proxy = Proxy(None, ssl_listen(tls_port, key, cert),
                  config_text=ONE_BACKEND % {"port": server.port}).start()
    wait_for_port(tls_port, proc=proxy.proc)
    proxy.tls_port = tls_port
    yield proxy
    proxy.stop()
    server.stop()


def test_tls_client_set_get(tls_proxy, certs):
    with tls_connect(tls_proxy.tls_port, certs[1]) as s:
        s.sendall(b"set t/k 3 0 5\r\nhello\r\n")
        assert read_until(s, b"\r\n") == b"STORED\r\n"
        s.sendall(b"get t/k\r\n")
        assert read_until(s, b"END\r\n") == b"VALUE t/k 3 5\r\nhello\r\nEND\r\n"
        s.sendall(b"version\r\n")
        assert read_until(s, b"\r\n").startswith(b"VERSION ")


def test_tls_client_large_value(tls_proxy, certs):
    value = os.urandom(1_000_000)
    with tls_connect(tls_proxy.tls_port, certs[1]) as s:
        s.sendall(b"set t/big 0 0 %d\r\n%s\r\n" % (len(value), value))
        assert read_until(s, b"\r\n") == b"STORED\r\n"
        s.sendall(b"get t/big\r\n")
        expected = b"VALUE t/big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        assert read_exactly(s, len(expected)) == expected


def test_tls_client_pipelined(tls_proxy, certs):
    count = 500
    requests = b"".join(b"set t/p%d 0 0 %d\r\n%d\r\n" % (i, len(b"%d" % i), i)
                        for i in range(count))
    requests += b"".join(b"get t/p%d\r\n" % i for i in range(count))
    expected = b"STORED\r\n" * count + b"".join(
        b"VALUE t/p%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(b"%d" % i), i) for i in range(count))
    with tls_connect(tls_proxy.tls_port, certs[1]) as s:
        s.sendall(requests)
        assert read_exactly(s, len(expected)) == expected


def test_tls_client_that_reads_late(tls_proxy, certs):
    """Replies far larger than the socket buffers, to a client that reads
    only once it has sent everything: the proxy must pause and resume
    through the TLS transport and lose nothing."""
    value = os.urandom(1_000_000)
    gets = 48
    with tls_connect(tls_proxy.tls_port, certs[1]) as s:
        s.sendall(b"set t/late 0 0 %d\r\n%s\r\n" % (len(value), value))
        assert read_until(s, b"\r\n") == b"STORED\r\n"
        s.sendall(b"get t/late\r\n" * gets)
        one = b"VALUE t/late 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        for _ in range(gets):
            assert read_exactly(s, len(one)) == one
        s.sendall(b"mn\r\n")
        assert read_until(s, b"\r\n") == b"MN\r\n"


def test_tls_and_tcp_clients_at_once(tls_proxy, certs):
    """A TLS and a plain client, each pipelining in its own thread."""
    results: dict[str, bytes] = {}

    def expected(name: str) -> bytes:
        return b"".join(b"STORED\r\nVALUE %s/%d 0 2\r\nok\r\nEND\r\n" % (name.encode(), i)
                        for i in range(300))

    def client(name: str, sock: socket.socket) -> None:
        with sock:
            sock.sendall(b"".join(b"set %s/%d 0 0 2\r\nok\r\nget %s/%d\r\n"
                                  % (name.encode(), i, name.encode(), i)
                                  for i in range(300)))
            results[name] = read_exactly(sock, len(expected(name)))

    threads = [
        threading.Thread(target=client, args=("tls", tls_connect(tls_proxy.tls_port,
                                                                 certs[1]))),
        threading.Thread(target=client, args=("tcp", tls_proxy.connect())),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in ("tls", "tcp"):
        assert results[name] == expected(name)


def test_plain_client_on_the_tls_port_gets_nothing(tls_proxy):
    with socket.create_connection(("127.0.0.1", tls_proxy.tls_port), timeout=5) as s:
        s.sendall(b"version\r\n")
        assert b"VERSION" not in read_until(s, b"\r\n")
    assert tls_proxy.call(b"version\r\n").startswith(b"VERSION")


# -- backends over TLS -----------------------------------------------------------

# Keys "<pool>/..." go to the pool of that name, each one backend.
BACKENDS = """
function mcp_config_pools()
    local pools = {}
    for _, b in ipairs({
        { label = "ca", port = %(tls)d, tls = true, tls_ca = "%(ca)s" },
        { label = "name", port = %(tls)d, tls = true, tls_ca = "%(ca)s",
          tls_hostname = "localhost" },
        { label = "noverify", port = %(tls)d, tls = true, tls_verify = false },
        { label = "systrust", port = %(tls)d, tls = true },
        { label = "othername", port = %(tls)d, tls = true, tls_ca = "%(ca)s",
          tls_hostname = "other.example" },
        { label = "otherca", port = %(tls)d, tls = true, tls_ca = "%(other)s" },
        { label = "plain", port = %(plain)d, tls = true, tls_verify = false },
        { label = "chain", port = %(chain)d, tls = true, tls_ca = "%(ca)s" },
    }) do
        b.host = "127.0.0.1"
        pools[b.label] = mcp.pool({ mcp.backend(b) })
    end
    return pools
end

function mcp_config_routes(pools)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        return pools[string.match(r:key(), "^(%%w+)/")](r)
    end)
end
"""


@pytest.fixture(scope="module")
def backends(certs):
    """A proxy whose backends are a TLS memcached (reached with several
    verification settings), a plain memcached it wrongly expects TLS from,
    and a proxy that terminates TLS in front of the plain one."""
    key, cert, other = certs
    tls_server = TLSMemcached(key, cert).start()
    plain = Memcached().start()
    chain_port = free_port()
    chain = Proxy(None, ssl_listen(chain_port, key, cert),
                  config_text=ONE_BACKEND % {"port": plain.port}).start()
    wait_for_port(chain_port, proc=chain.proc)
    proxy = Proxy(None, config_text=BACKENDS % {
        "tls": tls_server.port, "plain": plain.port, "chain": chain_port,
        "ca": cert, "other": other}).start()
    yield proxy, plain
    proxy.stop()
    chain.stop()
    plain.stop()
    tls_server.stop()


@pytest.mark.parametrize("pool", ["ca", "name", "noverify", "chain"])
def test_tls_backend(backends, pool):
    proxy, _ = backends
    with proxy.connect() as s:
        s.sendall(b"set %s/k 0 0 3\r\nabc\r\nget %s/k\r\n" % (pool.encode(), pool.encode()))
        assert read_until(s, b"END\r\n") == (
            b"STORED\r\nVALUE %s/k 0 3\r\nabc\r\nEND\r\n" % pool.encode())


def test_tls_backend_large_value_through_a_tls_proxy(backends):
    """proxy --TLS--> proxy --TCP--> memcached, checked at the memcached."""
    proxy, plain = backends
    value = os.urandom(1_000_000)
    with proxy.connect() as s:
        s.sendall(b"set chain/big 0 0 %d\r\n%s\r\n" % (len(value), value))
        assert read_until(s, b"\r\n") == b"STORED\r\n"
    with socket.create_connection(plain.address, timeout=10) as s:
        s.sendall(b"get chain/big\r\n")
        expected = b"VALUE chain/big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        assert read_exactly(s, len(expected)) == expected


@pytest.mark.parametrize("pool", ["systrust", "othername", "otherca", "plain"])
def test_tls_backend_that_fails_verification_or_handshake(backends, pool):
    proxy, _ = backends
    assert proxy.call(b"get %s/k\r\n" % pool.encode()) == errors.BACKEND_FAILURE
    assert f"backend {pool} (127.0.0.1:" in proxy.log()
    if pool != "plain":
        assert "TLS failed" in proxy.log()


# -- config -------------------------------------------------------------------------

POOLS_WITH = """
function mcp_config_pools()
    %s
    return mcp.pool({ mcp.backend(%s) })
end
function mcp_config_routes(p) end
"""


def test_backend_use_tls_makes_later_backends_tls(engine, load, certs):
    load(POOLS_WITH % ("mcp.init_tls() mcp.backend_use_tls(true)",
                       f'{{ label = "t", host = "127.0.0.1", port = 1, tls_ca = "{certs[1]}" }}'))
    [backend] = engine.registry.live
    assert backend.options.tls and backend.options.tls_ca == str(certs[1])
    assert backend.options.tls_verify


def test_changing_tls_settings_makes_a_new_backend(engine, load, certs):
    plain = '{ label = "t", host = "127.0.0.1", port = 1 }'
    tls = f'{{ label = "t", host = "127.0.0.1", port = 1, tls = true, tls_ca = "{certs[1]}" }}'
    first = load(POOLS_WITH % ("", plain)).backends[0]
    second = load(POOLS_WITH % ("", tls)).backends[0]
    assert second is not first and second.options.tls
    assert load(POOLS_WITH % ("", tls)).backends[0] is second


@pytest.mark.parametrize("args, message", [
    ('{ label = "t", host = "h", tls = "yes" }', "'tls' must be a boolean"),
    ('{ label = "t", host = "h", tls = true, tls_ca = 1 }', "'tls_ca' must be a string"),
    ('{ label = "t", host = "h", tls_ca = "ca.pem" }', "'tls_ca' needs tls = true"),
    ('{ label = "t", host = "h", tls_verify = false }', "'tls_verify' needs tls = true"),
    ('{ label = "t", host = "h", tls = true, tls_ca = "/nonexistent/ca.pem" }',
     "tls_ca /nonexistent/ca.pem: No such file or directory"),
    ('{ label = "t", host = "h", tls = true, tls_ca = "%(route)s" }',
     "no PEM certificate in it"),
])
def test_tls_option_errors(load, tmp_path, args, message):
    with pytest.raises(ConfigError) as e:
        load(POOLS_WITH % ("", args % {"route": tmp_path / "route.lua"}))
    assert message in str(e.value)


def test_backend_connects_with_tls_only_when_asked(certs):
    reactor = MemoryReactorClock()
    Backend("p", "127.0.0.1", 11211, reactor=reactor).connect()
    Backend("t", "127.0.0.1", 11212, BackendOptions(tls=True, tls_ca=str(certs[1])),
            reactor=reactor).connect()
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 11211)]
    assert [c[:2] for c in reactor.sslClients] == [("127.0.0.1", 11212)]


def test_workers_serve_tls_endpoints(certs):
    """Under --workers the supervisor binds the ssl: port and every worker
    serves TLS on its socket (plaintext would fail the handshake)."""
    key, cert, _ = certs
    server = Memcached().start()
    tls_port = free_port()
    proxy = Proxy(None, "--workers=2", ssl_listen(tls_port, key, cert),
                  config_text=ONE_BACKEND % {"port": server.port}).start()
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        workers = set()
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            with tls_connect(tls_port, cert) as s:
                s.sendall(b"set w/k 0 0 2\r\nok\r\nget w/k\r\n")
                assert read_until(s, b"END\r\n") == b"STORED\r\nVALUE w/k 0 2\r\nok\r\nEND\r\n"
                s.sendall(b"stats\r\n")
                stats = read_until(s, b"END\r\n")
                workers.add(re.search(rb"STAT worker_id (\d+)", stats).group(1))
        assert workers == {b"0", b"1"}
    finally:
        proxy.stop()
        server.stop()
