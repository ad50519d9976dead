"""The same V2 route config (tests/e2e/v2/routes.lua) in mcproxy and in
memcached 1.6.45's proxy, in front of the same memcached servers: every
request of a corpus gets the same bytes from both (bad requests too: a V2
config gets 1.6.45's wire behaviour, tests/e2e/test_wire_differential.py).

The corpus runs against one proxy, the servers are flushed, and it runs
against the other; each request is sent on its own connection followed by
``version``, whose line marks the end of the reply (and is left out).
Skipped, with the reason, where the reference binary cannot run.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.servers import Memcached, Proxy, free_port, wait_for_port

ROUTES = Path(__file__).resolve().parent / "v2" / "routes.lua"
#: memcached 1.6.45 built with its proxy (see ../shared/anchors/README.md).
ANCHOR = Path(os.environ.get(
    "MEMCACHED_PROXY_1645",
    Path(__file__).resolve().parents[3] / "shared" / "anchors" / "memcached-proxy-1.6.45"))

HIT_A = b"set a/k 0 0 2\r\nva\r\n"
CORPUS = [
    # direct to one pool: storage, reads, misses, multigets, meta
    HIT_A,
    b"get a/k\r\n",
    b"get a/miss\r\n",
    b"get a/k a/miss a/k\r\n",
    b"set b/k 0 0 2\r\nvb\r\n",
    b"get a/k b/k a/none b/none\r\n",
    b"mg a/k v\r\n",
    b"mg a/miss v\r\n",
    b"ms a/m 1\r\nx\r\n",
    b"mg a/m v f t\r\n",
    # quiet mode: what each meta command keeps silent (mn shows the rest)
    b"mg a/m q\r\nmn\r\n",
    b"mg a/m q s\r\nmn\r\n",
    b"mg a/none q\r\nmn\r\n",
    b"ms a/n 1 q\r\n5\r\nmn\r\n",
    b"ma a/n q v\r\nmn\r\n",
    b"ma a/n q\r\nmn\r\n",
    b"ma a/none q\r\nmn\r\n",
    b"ma a/viv q N0 J13 v\r\nmn\r\n",
    b"md a/n q\r\nmn\r\n",
    b"md a/n q\r\nmn\r\n",
    b"md a/m\r\n",
    b"md a/m\r\n",
    b"set a/n 0 0 1\r\n5\r\n",
    b"incr a/n 10\r\n",
    b"gat 100 a/n\r\n",
    b"gat 100 a/n a/none a/n\r\n",
    b"incr a/none 1\r\n",
    b"decr a/n 3\r\n",
    b"incr a/k 1\r\n",
    b"add a/k 0 0 1\r\nx\r\n",
    b"append a/k 0 0 1\r\nz\r\n",
    b"get a/k\r\n",
    b"delete a/k\r\n",
    b"delete a/k\r\n",
    b"touch =?=x__k 10\r\n",
    b"touch =?=y__k 10\r\n",
    b"touch other 10\r\n",
    # a failing backend, alone and in a multiget
    b"get down/k\r\n",
    b"get down/k a/n down/j\r\n",
    b"set down/k 0 0 1\r\nx\r\n",
    # route errors and bad returns
    b"get err/k\r\n",
    b"get none/k\r\n",
    # router misses: no such prefix, no separator, empty prefix, command maps
    b"get nowhere/k\r\n",
    b"get noseparator\r\n",
    b"get /k\r\n",
    b"mg cmd/k v\r\n",
    b"get cmd/k\r\n",
    b"mg cmdany/k v\r\n",
    b"set cmdany/k 0 0 1\r\nq\r\n",
    b"get cmdany/k\r\n",
    # request contexts: waits, results, callbacks
    b"get all/k\r\n",
    b"set both/k 0 0 1\r\nr\r\n",
    b"get a/both/k b/both/k\r\n",
    b"get all/k\r\n",
    b"get good/k\r\n",
    b"get good/nothing\r\n",
    b"get ok/k\r\n",
    b"set a/fo/k 0 0 1\r\nf\r\n",
    b"get fo/k\r\n",
    b"get fo/missing\r\n",
    b"get zero/k\r\n",
    b"get wh/k\r\n",
    b"get cb/k\r\n",
    # funcgens as handles
    b"set b/sub/1k 0 0 1\r\ns\r\n",
    b"get sub/1k\r\n",
    b"get sub/2k\r\n",
    b"set sub/2k 0 0 1\r\nt\r\n",
    b"get b/sub/2k\r\n",
    b"get sub/3k\r\n",
    b"get sub/4k\r\n",
    b"get sub/all\r\n",
    # what both read as bad requests
    b"set a/bad 0 0 1\r\nxy\r\n",
    b"get\r\n",
    b"bogus\r\n",
    b"get a/" + b"x" * 249 + b"\r\n",
    b"mn\r\n",
    b"get a/k\n",
    b"set a/lf 0 0 1\nx\r\n",
]

#: Keys the corpus writes: flushed between the two runs.
FLUSH = b"flush_all\r\n"


def anchor_can_run() -> str | None:
    """Why the reference binary cannot run here, or None."""
    if not ANCHOR.is_file():
        return f"{ANCHOR} is not there"
    try:
        subprocess.run([str(ANCHOR), "-V"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{ANCHOR} does not run: {e}"
    return None


class Anchor:
    """memcached 1.6.45's proxy running ROUTES on a free port."""

    def __init__(self, env: dict) -> None:
        self.port = free_port()
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Anchor:
        args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-l", "127.0.0.1",
                "-p", str(self.port), "-o", f"proxy_config={ROUTES}"]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def ask(port: int, request: bytes) -> bytes:
    """The reply to one request, on its own connection (see the module)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request + b"version\r\n")
        try:
            while not (b"VERSION " in data and data.endswith(b"\r\n")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    reply, marker, _ = data.rpartition(b"VERSION ")
    return reply if marker else data


def run_corpus(port: int, servers: list[Memcached]) -> list[bytes]:
    for server in servers:
        assert server.call(FLUSH) == b"OK\r\n"
    return [ask(port, request) for request in CORPUS]


@pytest.fixture(scope="module")
def replies():
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    a, b = Memcached().start(), Memcached().start()
    env = {**os.environ, "V2_A": str(a.port), "V2_B": str(b.port),
           "V2_DOWN": str(free_port())}
    anchor = Anchor(env).start()
    proxy = Proxy(ROUTES, env=env).start()
    try:
        theirs = run_corpus(anchor.port, [a, b])
        ours = run_corpus(proxy.port, [a, b])
    finally:
        proxy.stop()
        anchor.stop()
        a.stop()
        b.stop()
    return dict(zip(CORPUS, zip(theirs, ours, strict=True), strict=True))


@pytest.mark.parametrize("request_bytes", CORPUS, ids=[r[:40].decode() for r in CORPUS])
def test_same_reply_as_memcached_1_6_45(replies, request_bytes):
    theirs, ours = replies[request_bytes]
    assert ours == theirs
