"""End to end: ``flush_all`` through ``twistd -n mcproxy --config=...`` flushes
every real memcached server behind the routes (each checked directly)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.servers import Proxy, exchange, free_port, read_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Keys go to one server each (by prefix); the pools "left" and "right"
#: share server b, so b is in three pools.
CONFIG = """
local routes = require("mcproxy.routes")

mcp_config_pools, mcp_config_routes = routes.config{{
    pools = {{
        a = {{ backends = {{ "127.0.0.1:{a}" }} }},
        b = {{ backends = {{ "127.0.0.1:{b}" }} }},
        c = {{ backends = {{ "127.0.0.1:{c}" }} }},
        left = {{ backends = {{ "127.0.0.1:{a}", "127.0.0.1:{b}" }} }},
        right = {{ backends = {{ "127.0.0.1:{b}", "127.0.0.1:{c}" }} }},
        {extra}
    }},
    routes = routes.prefix_router{{ stop = "/", map = {{ a = "a", b = "b", c = "c" }} }},
}}
"""

DOWN_POOL = """down = { backends = { { label = "down", host = "127.0.0.1", port = %d,
                                    connecttimeout = 0.5, retrytimeout = 0.2 } } },"""

REFUSE = """
local pools_phase, routes_phase = mcp_config_pools, mcp_config_routes
function mcp_config_routes(pools)
    routes_phase(pools)
    mcp.attach(mcp.CMD_FLUSH_ALL, function(r)
        return "SERVER_ERROR flush_all disabled on this proxy\\r\\n"
    end)
end
"""

KEYS = [b"a/1", b"a/2", b"b/1", b"c/1"]


@pytest.fixture(scope="module")
def servers():
    from tests.servers import Memcached
    started = [Memcached().start() for _ in range(3)]
    yield dict(zip("abc", started, strict=True))
    for server in started:
        server.stop()


def config(servers, extra: str = "") -> str:
    return CONFIG.format(a=servers["a"].port, b=servers["b"].port, c=servers["c"].port,
                         extra=extra)


@pytest.fixture
def proxy_of(servers):
    started: list[Proxy] = []

    def start(text: str, **kwargs) -> Proxy:
        proxy = Proxy(None, config_text=text, **kwargs).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def connect(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def fill(sock: socket.socket, servers) -> None:
    """Set every key through the proxy; each is on its own server."""
    for key in KEYS:
        assert exchange(sock, b"set %s 0 0 1\r\nv\r\n" % key, b"STORED\r\n") == b"STORED\r\n"
    for key in KEYS:
        assert servers[chr(key[0])].get(key) == b"v"


def held(servers) -> list[bytes]:
    """The keys the servers still hold (asked directly)."""
    return [key for key in KEYS if servers[chr(key[0])].get(key) is not None]


def test_flush_all_empties_every_server(servers, proxy_of):
    proxy = proxy_of(config(servers))
    with connect(proxy) as sock:
        fill(sock, servers)
        assert exchange(sock, b"flush_all\r\n", b"OK\r\n") == b"OK\r\n"
        assert held(servers) == []
        assert exchange(sock, b"get a/1\r\n", b"END\r\n") == b"END\r\n"
        # a pipelined set behind the flush, on the same connection, survives it
        fill(sock, servers)
        sock.sendall(b"flush_all\r\nset b/1 0 0 1\r\nw\r\n")
        assert read_until(sock, b"STORED\r\n") == b"OK\r\nSTORED\r\n"
        assert servers["b"].get(b"b/1") == b"w"


def test_flush_all_delay_is_passed_on(servers, proxy_of):
    proxy = proxy_of(config(servers))
    with connect(proxy) as sock:
        fill(sock, servers)
        assert exchange(sock, b"flush_all 2\r\n", b"OK\r\n") == b"OK\r\n"
        assert held(servers) == KEYS  # not yet: the servers flush in 1 to 2 s
        deadline = time.monotonic() + 5
        while held(servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held(servers) == []
    # memcached also drops what is written in the second the delay ends
    time.sleep(1.1)


def test_flush_all_noreply(servers, proxy_of):
    proxy = proxy_of(config(servers))
    with connect(proxy) as sock:
        fill(sock, servers)
        sock.sendall(b"flush_all noreply\r\nmn\r\n")
        assert read_until(sock, b"MN\r\n") == b"MN\r\n"
        assert held(servers) == []


def test_bad_flush_all_gets_memcached_answer(servers, proxy_of):
    proxy = proxy_of(config(servers))
    direct = servers["a"].call(b"flush_all x\r\n")
    assert direct.startswith(b"CLIENT_ERROR")
    with connect(proxy) as sock:
        fill(sock, servers)
        assert exchange(sock, b"flush_all x\r\n", direct) == direct
        assert held(servers) == KEYS
        sock.sendall(b"flush_all x noreply\r\nflush_all\r\n")
        assert read_until(sock, b"\r\n") == b"OK\r\n"
        assert held(servers) == []


def test_flush_all_with_a_backend_down(servers, proxy_of):
    proxy = proxy_of(config(servers, DOWN_POOL % free_port()))
    expected = b"SERVER_ERROR 1 of 4 backends failed to flush\r\n"
    with connect(proxy) as sock:
        fill(sock, servers)
        assert exchange(sock, b"flush_all\r\n", expected) == expected
        assert held(servers) == []  # the servers that are up are flushed
        fill(sock, servers)
        assert exchange(sock, b"flush_all noreply\r\n", expected) == expected


def test_flush_all_refused_by_the_config(servers, proxy_of):
    proxy = proxy_of(config(servers) + REFUSE)
    refused = b"SERVER_ERROR flush_all disabled on this proxy\r\n"
    with connect(proxy) as sock:
        fill(sock, servers)
        assert exchange(sock, b"flush_all\r\n", refused) == refused
        assert exchange(sock, b"flush_all noreply\r\n", refused) == refused
        assert held(servers) == KEYS


def test_pymemcache_flush_all(servers, proxy_of):
    pymemcache = pytest.importorskip("pymemcache")
    proxy = proxy_of(config(servers))
    client = pymemcache.Client(("127.0.0.1", proxy.port), timeout=5)
    try:
        for key in KEYS:
            client.set(key.decode(), b"v", noreply=False)
        assert client.flush_all(noreply=False) is True
        assert held(servers) == []
        for key in KEYS:
            client.set(key.decode(), b"v", noreply=False)
        assert client.flush_all() is True  # pymemcache's default: noreply
        assert client.get("a/1") is None
        assert held(servers) == []
    finally:
        client.close()


def test_flush_scope_example(servers, proxy_of):
    """The cookbook recipe: flush_all reaches the cache pool only."""
    env = {"CACHE": f"127.0.0.1:{servers['a'].port}",
           "SESSIONS": f"127.0.0.1:{servers['b'].port}"}
    proxy = proxy_of((EXAMPLES / "flush_scope.lua").read_text(), env=env)
    with connect(proxy) as sock:
        for key in (b"page:1", b"session:1"):
            assert exchange(sock, b"set %s 0 0 1\r\nv\r\n" % key, b"STORED\r\n") == b"STORED\r\n"
        assert servers["a"].get(b"page:1") == b"v"
        assert exchange(sock, b"flush_all\r\n", b"OK\r\n") == b"OK\r\n"
        assert servers["a"].get(b"page:1") is None
        assert servers["b"].get(b"session:1") == b"v"
    servers["b"].call(b"flush_all\r\n")


def test_flush_scope_example_refusing(servers, proxy_of):
    env = {"CACHE": f"127.0.0.1:{servers['a'].port}",
           "SESSIONS": f"127.0.0.1:{servers['b'].port}", "FLUSH": "refuse"}
    proxy = proxy_of((EXAMPLES / "flush_scope.lua").read_text(), env=env)
    refused = b"SERVER_ERROR flush_all disabled on this proxy\r\n"
    with connect(proxy) as sock:
        assert exchange(sock, b"set page:1 0 0 1\r\nv\r\n", b"STORED\r\n") == b"STORED\r\n"
        assert exchange(sock, b"flush_all\r\n", refused) == refused
        assert servers["a"].get(b"page:1") == b"v"
