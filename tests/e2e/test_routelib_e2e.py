"""The route library (``--config=routelib --config-arg=FILE``) against real
memcached servers, and the same FILE in memcached 1.6.45's proxy
(``proxy_config=routelib,proxy_arg=FILE``): every request of a corpus gets
the same bytes from both, except those recorded in DIFFERENT.

As in test_v2_differential: the corpus runs against one proxy, the servers
are flushed, and it runs against the other; each request goes on its own
connection, followed by ``version``. Skipped, with the reason, where the
reference binary cannot run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_v2_differential import ANCHOR, anchor_can_run, ask
from tests.servers import Memcached, Proxy, free_port, wait_for_port

ROUTES = Path(__file__).resolve().parent / "routelib" / "routes.lua"

CORPUS = [
    # the default route and plain prefixes
    b"set k 0 0 1\r\nd\r\n",
    b"get k\r\n",
    b"set a/k 0 0 2\r\nva\r\n",
    b"get a/k a/miss a/k\r\n",
    b"mg a/k v\r\n",
    b"set b/k 0 0 2\r\nvb\r\n",
    b"get b/k\r\n",
    b"get nowhere/k\r\n",
    # failover: past a dead pool, on a miss, and not on a miss; a count
    b"get fo/x\r\n",
    b"set fo/x 0 0 1\r\nf\r\n",
    b"get fo/x\r\n",
    b"set b/fomiss/k 0 0 1\r\nm\r\n",
    b"get fomiss/k\r\n",
    b"set b/fonomiss/k 0 0 1\r\nn\r\n",
    b"get fonomiss/k\r\n",
    b"get focount/k\r\n",
    # all children: every answer, the worst; the fastest
    b"set sync/k 0 0 1\r\ns\r\n",
    b"get sync/k\r\n",
    b"set syncdown/k 0 0 1\r\ns\r\n",
    b"set fast/k 0 0 1\r\nq\r\n",
    b"mg fast/k v\r\n",
    b"set fastdown/k 0 0 1\r\nw\r\n",
    b"mg fastdown/k v\r\n",
    b"get fastdown/k\r\n",
    b"get fastnone/k\r\n",
    # allsync where the children disagree: a hit and a miss, deleted and not found
    b"set syncm/k 0 0 1\r\nh\r\n",
    b"get syncm/k\r\n",
    b"mg syncm/k v\r\n",
    b"mg syncm/none v\r\n",
    b"delete syncm/k\r\n",
    # split: both children written, child_a answers
    b"set split/k 0 0 1\r\np\r\n",
    b"get split/k\r\n",
    b"set a/splitsub/k 0 0 1\r\nx\r\n",
    b"get splitsub/k\r\n",
    # ttl: storage commands get the route's ttl, others an error
    b"set ttl/k 0 0 1\r\nt\r\n",
    b"ms ttl/m 1\r\nt\r\n",
    b"ms ttl/n 1 T5\r\nt\r\n",
    b"add ttl/a 0 0 1\r\nt\r\n",
    b"mg a/ttl/k t v\r\n",
    b"mg a/ttl/m t v\r\n",
    b"mg a/ttl/n t v\r\n",
    b"get ttl/k\r\n",
    b"append ttl/k 0 0 1\r\nt\r\n",
    # null: what nothing answers, per command
    b"set null/k 0 0 1\r\nn\r\n",
    b"get null/k\r\n",
    b"get null/a null/b null/c\r\n",
    b"delete null/k\r\n",
    b"incr null/k 1\r\n",
    b"touch null/k 1\r\n",
    b"mg null/k v\r\n",
    b"ms null/k 1\r\nn\r\n",
    b"md null/k\r\n",
    # zone failover: the local zone, then the far ones on a miss
    b"set b/z/k 0 0 1\r\nz\r\n",
    b"get z/k\r\n",
    b"set a/z/far 0 0 1\r\nf\r\n",
    b"get z/far\r\n",
    b"get z/none\r\n",
    # command maps: per prefix, and the top-level cmap
    b"set cmd/k 0 0 1\r\nc\r\n",
    b"get cmd/k\r\n",
    b"get a/cmd/k\r\n",
    b"mg cmd/k v\r\n",
    b"touch k 10\r\n",
    b"touch b/k 10\r\n",
]

#: Requests whose replies differ, and why mcproxy keeps its own.
DIFFERENT: dict[bytes, tuple[bytes, bytes]] = {}

FLUSH = b"flush_all\r\n"


def run_corpus(port: int, servers: list[Memcached]) -> list[bytes]:
    for server in servers:
        assert server.call(FLUSH) == b"OK\r\n"
    return [ask(port, request) for request in CORPUS]


def routelib_proxy(env: dict, routes: Path = ROUTES) -> Proxy:
    return Proxy("routelib", f"--config-arg={routes}", env=env)


@pytest.fixture(scope="module")
def servers():
    a, b = Memcached().start(), Memcached().start()
    env = {"RL_A": str(a.port), "RL_B": str(b.port), "RL_DOWN": str(free_port())}
    yield a, b, env
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def replies(servers):
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    a, b, extra = servers
    env = {**os.environ, **extra}
    port = free_port()
    args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-l", "127.0.0.1",
            "-p", str(port), "-o", f"proxy_config=routelib,proxy_arg={ROUTES}"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    anchor = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    proxy = routelib_proxy(extra)
    try:
        wait_for_port(port, proc=anchor)
        proxy.start()
        theirs = run_corpus(port, [a, b])
        ours = run_corpus(proxy.port, [a, b])
    finally:
        proxy.stop()
        anchor.kill()
        anchor.wait()
    return dict(zip(CORPUS, zip(theirs, ours, strict=True), strict=True))


@pytest.mark.parametrize("request_bytes", CORPUS, ids=[r[:40].decode() for r in CORPUS])
def test_same_reply_as_memcached_1_6_45(replies, request_bytes):
    theirs, ours = replies[request_bytes]
    if request_bytes in DIFFERENT:
        assert (theirs, ours) == DIFFERENT[request_bytes]
    else:
        assert ours == theirs


def test_sighup_rereads_the_route_file(servers, tmp_path):
    """A reload reads FILE again: a prefix added to it is routed after SIGHUP."""
    a, b, env = servers
    routes = tmp_path / "routes.lua"
    first = (f'pools{{ a = {{ backends = {{ "127.0.0.1:{a.port}" }} }}, b = {{ backends = '
             f'{{ "127.0.0.1:{b.port}" }} }} }}\n')
    routes.write_text(first + 'routes{ default = route_direct{ child = "a" } }\n')
    proxy = routelib_proxy(env, routes).start()
    try:
        assert ask(proxy.port, b"set x/k 0 0 1\r\n1\r\n") == b"STORED\r\n"
        assert b.call(b"get x/k\r\n") == b"END\r\n"
        routes.write_text(first + 'routes{ map = { x = route_direct{ child = "b" } },'
                          ' default = route_direct{ child = "a" } }\n')
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b"status=done" not in proxy.log().encode() and "reloaded" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.05)
        assert ask(proxy.port, b"set x/k 0 0 1\r\n2\r\n") == b"STORED\r\n"
        assert b.call(b"get x/k\r\n") == b"VALUE x/k 0 1\r\n2\r\nEND\r\n"
    finally:
        proxy.stop()


def test_unknown_option_stops_startup(servers, tmp_path):
    """memcached ignores an unknown option; mcproxy refuses it, naming it."""
    a, _, env = servers
    routes = tmp_path / "routes.lua"
    routes.write_text(f'pools{{ a = {{ backends = {{ "127.0.0.1:{a.port}" }} }} }}\n'
                      'routes{ default = route_direct{ child = "a", chlid = "a" } }\n')
    proxy = routelib_proxy(env, routes).start(wait=False)
    assert proxy.proc.wait(30) != 0
    output = proxy.proc.stdout.read().decode()
    assert "route_direct: unknown option 'chlid'" in output + proxy.log()
