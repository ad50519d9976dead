"""End to end: the multi-zone example config and memcached-compatible key
placement, against real memcached servers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.servers import Memcached, Proxy, exchange, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def zones():
    """foo: three zones of two servers; bar: zone 1 down, zones 2-3 up."""
    servers = {f"foo_z{z}": [Memcached().start() for _ in range(2)] for z in (1, 2, 3)}
    servers |= {f"bar_z{z}": [Memcached().start() for _ in range(2)] for z in (2, 3)}
    env = {name.upper(): ",".join(f"127.0.0.1:{m.port}" for m in ms)
           for name, ms in servers.items()}
    env["BAR_Z1"] = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    proxy = Proxy(EXAMPLES / "zones.lua", env=env).start()
    yield proxy, servers
    proxy.stop()
    for ms in servers.values():
        for m in ms:
            m.stop()


def holders(servers, zone: str, key: bytes) -> list[bytes | None]:
    return [m.get(key) for m in servers[zone]]


def call(proxy, request: bytes, expected: bytes) -> bytes:
    with proxy.connect() as s:
        return exchange(s, request, expected)


def test_set_goes_to_every_zone(zones):
    proxy, servers = zones
    assert call(proxy, b"set /foo/k1 0 0 2\r\nv1\r\n", b"STORED\r\n") == b"STORED\r\n"
    for zone in ("foo_z1", "foo_z2", "foo_z3"):
        assert sorted(holders(servers, zone, b"/foo/k1"), key=bool) == [None, b"v1"]
    # the same server index in every zone: pools hash alike
    indexes = {holders(servers, z, b"/foo/k1").index(b"v1") for z in ("foo_z1", "foo_z2")}
    assert len(indexes) == 1


def test_read_fails_over_to_other_zones_on_miss(zones):
    proxy, servers = zones
    call(proxy, b"set /foo/k2 0 0 2\r\nv2\r\n", b"STORED\r\n")
    for m in servers["foo_z1"]:
        m.call(b"delete /foo/k2\r\n")
    expected = b"VALUE /foo/k2 0 2\r\nv2\r\nEND\r\n"
    assert call(proxy, b"get /foo/k2\r\n", expected) == expected
    assert b"failed to find /foo/k2 in zone 1" in proxy.log().encode()


def test_delete_goes_to_every_zone(zones):
    proxy, servers = zones
    call(proxy, b"set /foo/k3 0 0 2\r\nv3\r\n", b"STORED\r\n")
    assert call(proxy, b"delete /foo/k3\r\n", b"DELETED\r\n") == b"DELETED\r\n"
    for zone in ("foo_z1", "foo_z2", "foo_z3"):
        assert holders(servers, zone, b"/foo/k3") == [None, None]
    assert call(proxy, b"get /foo/k3\r\n", b"END\r\n") == b"END\r\n"


def test_prefix_whose_first_zone_is_down(zones):
    proxy, servers = zones
    assert call(proxy, b"set /bar/b1 0 0 2\r\nhi\r\n", b"STORED\r\n") == b"STORED\r\n"
    for zone in ("bar_z2", "bar_z3"):
        assert b"hi" in holders(servers, zone, b"/bar/b1")
    expected = b"VALUE /bar/b1 0 2\r\nhi\r\nEND\r\n"
    assert call(proxy, b"get /bar/b1\r\n", expected) == expected


def test_add_does_not_fail_over_on_not_stored(zones):
    proxy, servers = zones
    call(proxy, b"set /foo/a 0 0 3\r\nmoo\r\n", b"STORED\r\n")
    assert call(proxy, b"add /foo/a 0 0 3\r\ngoo\r\n", b"NOT_STORED\r\n") == b"NOT_STORED\r\n"
    assert b"moo" in holders(servers, "foo_z1", b"/foo/a")


def test_no_route_and_user_stat(zones):
    proxy, _ = zones
    reply = b"SERVER_ERROR no route\r\n"
    assert call(proxy, b"get /nope/k\r\n", reply) == reply
    with proxy.connect() as s:
        s.sendall(b"stats proxy\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(4096)
    assert b"STAT user_no_route 1\r\n" in data


# -- key placement is memcached's (mcp-api.md section 7.5) ----------------------

KEYS = [b"", b"a", b"foo", b"/foo/a1", b"/bar/b1", b"hello world", b"key:1234567890",
        b"{user1}:profile"]


def placement_config(pool_options: str, servers) -> str:
    backends = ", ".join(f'mcp.backend("s{i}", "{m.host}", "{m.port}")'
                         for i, m in enumerate(servers))
    return f"""
    function mcp_config_pools()
        return mcp.pool({{ {backends} }}{pool_options})
    end
    function mcp_config_routes(pool)
        mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
    end
    """


def placed(proxy, servers) -> list[int]:
    with proxy.connect() as s:
        for key in KEYS[1:]:
            assert exchange(s, b"set " + key.replace(b" ", b"_") + b" 0 0 1\r\nx\r\n",
                            b"STORED\r\n") == b"STORED\r\n"
    return [[m.get(key.replace(b" ", b"_")) for m in servers].index(b"x") for key in KEYS[1:]]


@pytest.mark.parametrize("options, expected", [
    ("", [1, 2, 1, 1, 0, 1, 0]),
    (', { seed = "z1" }', [1, 0, 0, 1, 1, 2, 2]),
])
def test_jump_hash_places_keys_like_memcached(memcached_factory, options, expected):
    # Vectors of section 7.5 for n=3; keys with a space are sent with "_"
    # instead, so "hello world" is checked through test_hashing only.
    servers = [memcached_factory() for _ in range(3)]
    proxy = Proxy(None, config_text=placement_config(options, servers)).start()
    try:
        got = placed(proxy, servers)
    finally:
        proxy.stop()
    from mcproxy.backends.hashing import jump_hash, pool_seed, xxh3_key_hash
    seed = pool_seed(b"z1") if "seed" in options else 0
    predicted = [jump_hash(xxh3_key_hash(k.replace(b" ", b"_"), seed), 3) for k in KEYS[1:]]
    assert got == predicted
    # the keys without spaces must match the published vectors exactly
    for key, index, vector in zip(KEYS[1:], got, expected, strict=True):
        if b" " not in key:
            assert index == vector, key


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def test_ring_hash_places_keys_like_memcached(memcached_factory):
    addresses = [("127.0.0.1", 11211), ("127.0.0.2", 11212), ("127.0.0.3", 11213)]
    if not all(_can_bind(h, p) for h, p in addresses):
        pytest.skip("the section 7.5 ring addresses are in use")
    servers = [memcached_factory(host=h, port=p) for h, p in addresses]
    options = ', { dist = mcp.dist_ring_hash, omode = "ketama", hash = mcp.dist_ring_hash.hash }'
    proxy = Proxy(None, config_text=placement_config(options, servers)).start()
    try:
        got = placed(proxy, servers)
    finally:
        proxy.stop()
    # section 7.5, ketama with the MD5 key hash: 1,1,1,1,1,0,1,1 (keys 2..8)
    expected = [1, 1, 1, 1, 0, 1, 1]
    for key, index, vector in zip(KEYS[1:], got, expected, strict=True):
        if b" " not in key:
            assert index == vector, key
