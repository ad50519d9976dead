"""Routes run natively (mcproxy/routing/native/) against real memcached
servers, a dead port and a backend that hangs: routes.failover,
routes.all_sync and routes.zfailover through twistd, and routelib's lone
route_failover, route_allsync and route_split compared byte for byte with
memcached 1.6.45's proxy running the same file (skipped, with the reason,
where that binary cannot run).
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from tests.e2e.test_v2_differential import ANCHOR, anchor_can_run, ask
from tests.fakebackend import FakeBackend, Hang
from tests.servers import Memcached, Proxy, free_port, wait_for_port


@pytest.fixture(scope="module")
def servers():
    a, b = Memcached().start(), Memcached().start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def fake():
    backend = FakeBackend().start()
    yield backend
    backend.stop()


def v1_config(pools: str, route: str) -> str:
    return textwrap.dedent(f"""
        local routes = require("mcproxy.routes")
        mcp_config_pools, mcp_config_routes = routes.config{{
            tunables = {{ backend_read_timeout = 0.5, backend_connect_timeout = 0.5 }},
            pools = {{ {pools} }},
            routes = {route},
        }}
    """)


def test_failover_past_a_dead_pool_and_misses_all_sync_writes(servers):
    a, b = servers
    for server in servers:
        assert server.call(b"flush_all\r\n") == b"OK\r\n"
    pools = (f'dead = {{ backends = {{ "127.0.0.1:{free_port()}" }} }}, '
             f'a = {{ backends = {{ "127.0.0.1:{a.port}" }} }}, '
             f'b = {{ backends = {{ "127.0.0.1:{b.port}" }} }}')
    route = ('{ reads = routes.failover({ "dead", "a", "b" }, { miss = true }), '
             'writes = routes.all_sync{ "a", "b" } }')
    proxy = Proxy(None, config_text=v1_config(pools, route)).start()
    try:
        assert proxy.call(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert a.get(b"k") == b"v" and b.get(b"k") == b"v"
        assert b.call(b"set onlyb 0 0 1\r\nb\r\n") == b"STORED\r\n"
        assert proxy.call(b"get onlyb\r\n", b"END\r\n") == b"VALUE onlyb 0 1\r\nb\r\nEND\r\n"
        assert proxy.call(b"get none\r\n", b"END\r\n") == b"END\r\n"
        assert proxy.call(b"get k none onlyb k\r\n", b"END\r\n") == (
            b"VALUE k 0 1\r\nv\r\nVALUE onlyb 0 1\r\nb\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
        assert proxy.call(b"mg onlyb v\r\n", b"b\r\n") == b"VA 1\r\nb\r\n"
        # a cas unique is one replica's: all_sync sends the cas to Lua,
        # which serves it at the primary (a) and copies the write to b
        cas = proxy.call(b"gets k\r\n", b"END\r\n").split(b"\r\n")[0].split()[-1]
        assert proxy.call(b"cas k 0 0 1 %s\r\nw\r\n" % cas) == b"STORED\r\n"
        assert a.get(b"k") == b"w" and b.get(b"k") == b"w"
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


def test_failover_past_a_backend_that_hangs(servers, fake):
    a, _ = servers
    assert a.call(b"set slow 0 0 1\r\na\r\n") == b"STORED\r\n"
    assert a.call(b"set other 0 0 1\r\no\r\n") == b"STORED\r\n"
    pools = (f'fake = {{ backends = {{ "127.0.0.1:{fake.port}" }} }}, '
             f'a = {{ backends = {{ "127.0.0.1:{a.port}" }} }}')
    proxy = Proxy(None, config_text=v1_config(pools, 'routes.failover{ "fake", "a" }')).start()
    try:
        fake.fault(b"slow", Hang())
        assert proxy.call(b"get slow\r\n", b"END\r\n") == b"VALUE slow 0 1\r\na\r\nEND\r\n"
        fake.fault(b"slow", Hang())
        assert proxy.call(b"get slow other\r\n", b"END\r\n") == (
            b"VALUE slow 0 1\r\na\r\nVALUE other 0 1\r\no\r\nEND\r\n")
        assert b"get slow other\r\n" in fake.lines()
    finally:
        proxy.stop()


def test_zfailover_reads_the_far_zone_on_a_miss(servers):
    a, b = servers
    for server in servers:
        assert server.call(b"flush_all\r\n") == b"OK\r\n"
    assert a.call(b"set near 0 0 1\r\na\r\n") == b"STORED\r\n"
    assert b.call(b"set far 0 0 1\r\nb\r\n") == b"STORED\r\n"
    pools = (f'zones = {{ za = {{ backends = {{ "127.0.0.1:{a.port}" }} }}, '
             f'zb = {{ backends = {{ "127.0.0.1:{b.port}" }} }} }}')
    proxy = Proxy(None, config_text=v1_config(pools, 'routes.zfailover("zones", "za")')).start()
    try:
        assert proxy.call(b"get far\r\n", b"END\r\n") == b"VALUE far 0 1\r\nb\r\nEND\r\n"
        assert proxy.call(b"get near far none\r\n", b"END\r\n") == (
            b"VALUE near 0 1\r\na\r\nVALUE far 0 1\r\nb\r\nEND\r\n")
        assert proxy.call(b"mg none v\r\n") == b"EN\r\n"
    finally:
        proxy.stop()


ROUTELIB_POOLS = """
pools{
    a = { backends = { "127.0.0.1:" .. os.getenv("RL_A") } },
    b = { backends = { "127.0.0.1:" .. os.getenv("RL_B") } },
    down = { backend_options = { connecttimeout = 1 }, backends = {
        "127.0.0.1:" .. os.getenv("RL_DOWN") } },
}
"""
#: Lone routelib routes, each run natively by mcproxy, and what the corpus
#: sets up on a and b directly before asking the proxies.
ROUTELIB_FILES = {
    "failover": 'route_failover{ children = { "down", "a", "b" } }',
    "failover on misses": 'route_failover{ children = { "a", "down", "b" }, miss = true }',
    "allsync": 'route_allsync{ children = { "a", "b" } }',
    "allsync with a dead child": 'route_allsync{ children = { "a", "down" } }',
    "split": 'route_split{ child_a = "b", child_b = "a" }',
    "split to a dead child": 'route_split{ child_a = "a", child_b = "down" }',
}
SETUP = [b"set ka 0 0 1\r\na\r\n", b"set both 0 0 1\r\nA\r\n"], [
    b"set kb 0 0 1\r\nb\r\n", b"set both 0 0 1\r\nB\r\n"]
CORPUS = [
    b"get ka\r\n", b"get kb\r\n", b"get both\r\n", b"get none\r\n",
    b"get ka kb none both ka\r\n", b"gets none\r\n",
    b"mg kb v\r\n", b"mg none v\r\n", b"mg ka k v t\r\n",
    b"set new 0 0 1\r\nn\r\n", b"get new\r\n",
    b"delete kb\r\n", b"delete none\r\n", b"incr none 1\r\n", b"touch ka 10\r\n",
    b"ms meta 2 T0\r\nmm\r\n", b"mg meta v\r\n",
]


def routelib_replies(port: int, servers) -> list[bytes]:
    for server, setup in zip(servers, SETUP, strict=True):
        assert server.call(b"flush_all\r\n") == b"OK\r\n"
        for request in setup:
            assert server.call(request) == b"STORED\r\n"
    return [ask(port, request) for request in CORPUS]


@pytest.mark.parametrize("name", sorted(ROUTELIB_FILES))
def test_routelib_route_same_bytes_as_memcached_1_6_45(servers, tmp_path, name):
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    a, b = servers
    routes = tmp_path / "routes.lua"
    routes.write_text(ROUTELIB_POOLS + f"routes{{ default = {ROUTELIB_FILES[name]} }}\n")
    extra = {"RL_A": str(a.port), "RL_B": str(b.port), "RL_DOWN": str(free_port())}
    port = free_port()
    args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-l", "127.0.0.1",
            "-p", str(port), "-o", f"proxy_config=routelib,proxy_arg={routes}"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    anchor = subprocess.Popen(args, env={**os.environ, **extra}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    proxy = Proxy("routelib", f"--config-arg={routes}", env=extra)
    try:
        wait_for_port(port, proc=anchor)
        proxy.start()
        theirs = routelib_replies(port, servers)
        ours = routelib_replies(proxy.port, servers)
    finally:
        proxy.stop()
        anchor.kill()
        anchor.wait()
    assert dict(zip(CORPUS, ours, strict=True)) == dict(zip(CORPUS, theirs, strict=True))
