"""The remaining names of memcached 1.6.45's proxy API, in mcproxy and in the
1.6.45 binary running the same config of two files (tests/e2e/names/
pools.lua:routes.lua, as ``-o proxy_config=a:b`` takes them): rate limits,
a global one, rctx:sleep, wait timeouts, tunables and backend options. Each
request is sent on its own connection, in order (the rate limits count).
Skipped, with the reason, where the reference binary cannot run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.e2e.test_v2_differential import ANCHOR, anchor_can_run, ask
from tests.servers import Memcached, Proxy, free_port, wait_for_port

HERE = Path(__file__).resolve().parent / "names"
CONFIG = f"{HERE / 'pools.lua'}:{HERE / 'routes.lua'}"

CORPUS = [
    b"set direct/k 0 0 2\r\nhi\r\n",
    b"mg direct/k v\r\n",
    # a route's token bucket: full at 50, 15 a take while more than 15 are left
    *[b"mg rl/k\r\n"] * 4,
    # the global one from mcp_config_pools: 3, one a take while more than 1
    *[b"mg grl/k\r\n"] * 3,
    # rctx:sleep returns true, then the request goes on (to a miss)
    b"mg sleep/direct/k\r\n",
    # waits on a backend that never answers, with a timeout
    b"mg cond/k\r\n",
    b"mg handle/k\r\n",
    b"mg waith/k\r\n",
    # a wait answered in time returns its count alone
    b"mg intime/direct/k\r\n",
    # a handle to mcp.internal_handler: the proxy's own cache
    b"ms int/k 2 T0\r\nxy\r\n",
    b"mg int/k v\r\n",
    b"get int/k int/none\r\n",
    b"mg int/none v\r\n",
]

#: Asked after the corpus; its lines come in no set order.
FUNCSTATS = b"stats proxyfuncs\r\n"


class Hole:
    """A backend that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def anchor(env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-l", "127.0.0.1",
            "-p", str(port), "-o", f"proxy_config={CONFIG}"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return proc, port


@pytest.fixture(scope="module")
def replies():
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    server, hole = Memcached().start(), Hole()
    env = {**os.environ, "NAMES_A": str(server.port), "NAMES_HOLE": str(hole.port)}
    proc, port = anchor(env)
    try:
        theirs = [ask(port, request) for request in CORPUS + [FUNCSTATS]]
    finally:
        proc.kill()
        proc.wait()
    assert server.call(b"flush_all\r\n") == b"OK\r\n"
    proxy = Proxy(CONFIG, env=env).start()
    try:
        ours = [ask(proxy.port, request) for request in CORPUS + [FUNCSTATS]]
    finally:
        proxy.stop()
        hole.stop()
        server.stop()
    return list(zip(CORPUS + [FUNCSTATS], theirs, ours, strict=True))


def test_same_replies_as_memcached_1_6_45(replies):
    replies = replies[:-1]
    assert [(request, ours) for request, _, ours in replies] == \
        [(request, theirs) for request, theirs, _ in replies]


def test_same_funcgen_stats_as_memcached_1_6_45(replies):
    _, theirs, ours = replies[-1]
    # The keys of a multiget start together, as in 1.6.45 (two slots busy).
    assert b"STAT slots_int 2\r\n" in theirs
    assert sorted(ours.split(b"\r\n")) == sorted(theirs.split(b"\r\n"))
    assert b"STAT funcs_mcp_router 1\r\nSTAT slots_mcp_router 0\r\n" in theirs


def test_what_the_names_answered(replies):
    """What 1.6.45 answered, written down (so a change of either shows)."""
    assert [theirs for _, theirs, _ in replies[:-1]] == [
        b"STORED\r\n", b"VA 2\r\nhi\r\n",
        b"HD ok\r\n", b"HD ok\r\n", b"HD ok\r\n", b"SERVER_ERROR slow down\r\n",
        b"HD true\r\n", b"HD true\r\n", b"HD false\r\n",
        b"HD true false\r\n",  # slept, then a miss
        b"HD 0 true\r\n", b"HD nil true\r\n", b"HD nil true\r\n",
        b"HD 1 nil false\r\n",
        b"HD\r\n", b"VA 2\r\nxy\r\n", b"VALUE int/k 0 2\r\nxy\r\nEND\r\n", b"EN\r\n",
    ]
