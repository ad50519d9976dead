"""Python opcodes per request of mcproxy in a running reactor, the reactor's
own included: the part of the path ``bench/opcodes.py`` leaves out (its
harness has no reactor loop and no sockets).

``python bench/loop_opcodes.py [--requests N] [--conns C] [--route FILE]``
starts a memcached on a free loopback port (systems.Cluster, as bench/run.py
does), mcproxy's ProxyService on its ProxyReactor in this process
(``--route``: a config of one pool of one backend, as bench/route.lua, whose
port it reads from ``MCPROXY_BENCH_BACKEND_PORT``), and a client thread with ``--conns``
connections that each send one ``get`` at a time, all of them, then read
every reply (checked). After a warm-up it counts, with ``sys.settrace`` in
the reactor's thread only, the opcodes run while ``--requests`` rounds are
in flight, and prints them per request, in total and by function. At one
connection (the default) that is workload (d)'s path: two polls per
request, one for the client's read and one for the backend's.

Compiled modules (mcproxy.compiled) run no opcodes; ``MCPROXY_PURE_PYTHON``
counts their Python too. CPU time is bench/run.py's to measure.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from systems import HOST, Cluster, free_port, mc_set

ROUTE = Path(__file__).resolve().parent / "route.lua"
VALUE = b"x" * 100
KEY = "bench:loop"


def read_reply(sock: socket.socket, expected: bytes) -> None:
    got = b""
    while len(got) < len(expected):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {got!r}")
        got += chunk
    if got != expected:
        raise AssertionError(f"got {got[:200]!r}, not {expected[:200]!r}")


class Counting:
    """Counts the opcodes the calling thread runs, by ``file:function``,
    between ``start`` and ``stop`` (both called from the reactor's thread,
    inside its loop: the frames already running are traced too)."""

    def __init__(self) -> None:
        self.ops: Counter = Counter()

    def _trace(self, frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            self.ops[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
        return self._trace

    def start(self) -> None:
        sys.settrace(self._trace)
        frame = sys._getframe(1)
        while frame is not None:
            frame.f_trace = self._trace
            frame.f_trace_opcodes = True
            frame = frame.f_back

    def stop(self) -> None:
        sys.settrace(None)
        frame = sys._getframe(1)
        while frame is not None:
            frame.f_trace = None
            frame = frame.f_back


def run(requests: int, conns: int, route: Path) -> Counter:
    """Opcodes of ``requests`` rounds of ``conns`` gets, by function."""
    from mcproxy.app import reactor as proxy_reactor

    proxy_reactor.install()
    from twisted.internet import reactor

    from mcproxy.app.process import raise_gc_threshold
    from mcproxy.app.service import ProxyService

    counting = Counting()
    failures: list[BaseException] = []
    with tempfile.TemporaryDirectory() as logs, Cluster(Path(logs), Path(logs)) as cluster:
        backend_port = cluster.start_memcached().port
        mc_set(backend_port, KEY, VALUE)
        os.environ["MCPROXY_BENCH_BACKEND_PORT"] = str(backend_port)
        port = free_port()
        service = ProxyService(str(route), [f"tcp:{port}:interface={HOST}"])
        service.startService()  # (listening now: the client's connects wait for the loop)
        get = f"get {KEY}\r\n".encode()
        hit = f"VALUE {KEY} 0 {len(VALUE)}\r\n".encode() + VALUE + b"\r\nEND\r\n"

        def rounds(socks: list[socket.socket], count: int) -> None:
            for _ in range(count):
                for sock in socks:
                    sock.sendall(get)
                for sock in socks:
                    read_reply(sock, hit)

        def in_reactor(call) -> None:
            """Run ``call`` in the reactor's thread and wait for it."""
            done = threading.Event()
            reactor.callFromThread(lambda: (call(), done.set()))
            done.wait(10)

        def client() -> None:
            try:
                socks = [socket.create_connection((HOST, port)) for _ in range(conns)]
                rounds(socks, 200)  # warm-up
                in_reactor(counting.start)
                rounds(socks, requests)
                in_reactor(counting.stop)
                for sock in socks:
                    sock.close()
            except BaseException as e:  # reported by the main thread
                failures.append(e)
            finally:
                reactor.callFromThread(reactor.stop)

        threading.Thread(target=client, daemon=True).start()
        reactor.callLater(120, reactor.stop)  # (stops by itself)
        raise_gc_threshold()
        reactor.run(installSignalHandlers=False)
    if failures:
        raise failures[0]
    # the calls that started and stopped the count are the harness's
    for name in [n for n in counting.ops if n.startswith("loop_opcodes.py:")]:
        del counting.ops[name]
    return counting.ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="rounds counted")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--route", type=Path, default=ROUTE,
                        help="route config (one pool of one backend)")
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    args = parser.parse_args(argv)
    ops = run(args.requests, args.conns, args.route)
    total = args.requests * args.conns
    print(f"{sum(ops.values()) / total:.0f} opcodes per request "
          f"({args.conns} connections x {args.requests} gets, one in flight each, "
          f"route {args.route.name})")
    for name, n in ops.most_common(args.top):
        print(f"  {n / total:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
