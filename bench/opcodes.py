"""Interpreter opcodes mcproxy runs per request, by function: a figure for
hot-path work that, unlike CPU time on a shared machine, is the same on
every run.

``python bench/opcodes.py`` builds the proxy in-process from
``bench/route.lua`` (one pool of one backend; ``--route FILE`` another
config of one pool of one backend): a ProxyService on a
MemoryReactorClock, its backend connected to a StringTransport, and
``--clients`` client connections on StringTransports. Each round every
client sends one ``get`` (``--multiget N``: of N keys; ``--pipeline N``:
N such gets in one read), the write batch is
flushed as the reactor would after a poll, the backend answers every get
in one read (whatever way the proxy grouped the keys into backend gets),
and the batch is flushed again. After a warm-up round it
counts, with ``sys.settrace`` per opcode, what ``--rounds`` rounds run and
prints opcodes per request, in total and for each function. It checks that
every client got exactly its own reply, so the count is of a right path.

The count covers mcproxy's Python code and the Python code it calls,
less the fake transports'; where mcproxy's compiled modules are built
(mcproxy.compiled), the tool runs itself again with ``MCPROXY_PURE_PYTHON``
naming those built from their own Python (the protocol, writes, units), as
compiled code runs no opcodes (the framing loops stay compiled, as in
earlier counts).
Twisted's per-event code (doRead and the reactor loop) and system calls
are not in it, as no real socket or reactor is. Nor is C code: lupa's
crossings into Lua and the Lua a route runs cost no opcodes.

``--time`` measures those too, as a development tool: it runs the same
rounds (``--rounds``, best of ``--repeat``) untraced and prints the CPU
time (``time.process_time``) per request, of the harness included, with
the garbage collector's threshold of the ``twistd`` process;
``--profile`` prints cProfile's figures of those rounds instead. Both vary
with the machine and its load: published figures come from
``bench/run.py`` only.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock, StringTransport

from mcproxy import compiled, writes
from mcproxy.app.process import raise_gc_threshold
from mcproxy.app.service import ProxyService
from mcproxy.server.protocol import ProxyServerProtocol

ROUTE = Path(__file__).resolve().parent / "route.lua"
VALUE = b"x" * 100


class Transport(StringTransport):
    """A StringTransport with the TCP option setters a backend calls."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


class Proxy:
    """mcproxy in-process: the backend of ``route`` (bench/route.lua) and
    ``clients`` client connections, every transport a StringTransport."""

    def __init__(self, clients: int, multiget: int, route: Path = ROUTE,
                 pipeline: int = 1) -> None:
        self.after: list = []
        writes.batch.schedule = self.after.append
        os.environ.setdefault("MCPROXY_BENCH_BACKEND_PORT", "11211")
        clock = MemoryReactorClock()
        service = ProxyService(str(route), [], reactor=clock)
        service.engine.load(str(route))
        [backend] = service.registry.live
        backend.connect()
        self.backend = clock.tcpClients[-1][2].buildProtocol(None)
        self.backend_transport = Transport()
        self.backend.makeConnection(self.backend_transport)
        self.backend.dataReceived(b"VERSION 1.6.18\r\n")  # the connection's validation
        self.backend_transport.clear()
        if backend.state != "connected":
            raise RuntimeError(f"backend is {backend.state}, not connected")
        self.clients = []
        for _ in range(clients):
            client = ProxyServerProtocol(service)
            client.makeConnection(Transport())
            self.clients.append(client)
        gets = [[[b"key:%06d" % ((i * pipeline + g) * multiget + k) for k in range(multiget)]
                 for g in range(pipeline)] for i in range(clients)]
        self.requests = [b"".join(b"get " + b" ".join(ks) + b"\r\n" for ks in client)
                         for client in gets]
        #: every key the clients ask for in a round, in order
        self.keys = [key for client in gets for ks in client for key in ks]
        self.replies = [b"".join(b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(VALUE), VALUE)
                                          for k in ks) + b"END\r\n" for ks in client)
                        for client in gets]

    def answer(self, sent: bytes) -> bytes:
        """The backend's reply to ``sent``: each of its ``get`` lines
        answered with a VALUE per key and END. The keys must be those the
        clients asked for, each once and in order, in lines as the client
        sent them or as the proxy merges them (keys of one client's
        multiget, or neighbours in a write batch, in one ``get``)."""
        lines = sent.split(b"\r\n")
        if lines.pop() != b"" or not all(line.startswith(b"get ") for line in lines):
            raise AssertionError(f"the backend was sent {sent[:200]!r}")
        keys = [line.split(b" ")[1:] for line in lines]
        if [key for line in keys for key in line] != self.keys:
            raise AssertionError(f"the backend was sent {sent[:200]!r}")
        return b"".join(b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(VALUE), VALUE)
                                 for key in line) + b"END\r\n" for line in keys)

    def flush(self) -> None:
        """What the reactor does once the events of a poll are handled."""
        calls = self.after[:]
        self.after.clear()
        for call in calls:
            call()

    def round(self) -> None:
        """Every client sends its get (one poll of that many events); the
        backend answers all in one read (a poll of its own)."""
        writes.batch.events = len(self.clients)
        for client, request in zip(self.clients, self.requests, strict=True):
            client.dataReceived(request)
        self.flush()
        sent = self.backend_transport.value()
        self.backend_transport.clear()
        writes.batch.events = 1
        self.backend.dataReceived(self.answer(sent))
        self.flush()
        writes.batch.events = writes.MANY_EVENTS  # the default, for whatever runs next
        for client, reply in zip(self.clients, self.replies, strict=True):
            got = client.transport.value()
            if got != reply:
                raise AssertionError(f"a client got {got[:200]!r}, not {reply[:200]!r}")
            client.transport.clear()


def count(proxy: Proxy, rounds: int) -> Counter:
    """Opcodes run in ``rounds`` rounds, by ``file:function`` (files of
    mcproxy by their path in the package, e.g. ``server/protocol.py``)."""
    ops: Counter = Counter()
    names: dict[str, str] = {}

    def label(filename: str) -> str:
        path = Path(filename)
        parts = path.parts
        if "mcproxy" in parts:
            return "/".join(parts[len(parts) - parts[::-1].index("mcproxy"):])
        return path.name

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            name = names.get(code.co_filename)
            if name is None:
                name = names[code.co_filename] = label(code.co_filename)
            ops[f"{name}:{code.co_name}"] += 1
        return trace

    proxy.round()  # warm-up: lazily made objects, first-time paths
    sys.settrace(trace)
    try:
        for _ in range(rounds):
            proxy.round()
    finally:
        sys.settrace(None)
    for name in [n for n in ops if n.startswith(("opcodes.py:", "testing.py:"))]:
        del ops[name]  # the harness's own, and the fake transports'
    return ops


def cpu_time(proxy: Proxy, rounds: int, repeat: int) -> float:
    """The least CPU seconds ``rounds`` rounds took, of ``repeat`` tries."""
    proxy.round()  # warm-up, as for count
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(rounds):
            proxy.round()
        best = min(best, time.process_time() - started)
    return best


def profile(proxy: Proxy, rounds: int, top: int) -> None:
    """Print cProfile's figures of ``rounds`` rounds, by own time."""
    proxy.round()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        proxy.round()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--multiget", type=int, default=1, help="keys per get")
    parser.add_argument("--pipeline", type=int, default=1, help="gets per read")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    parser.add_argument("--route", type=Path, default=ROUTE,
                        help="route config (one pool of one backend)")
    parser.add_argument("--time", action="store_true",
                        help="CPU time per request instead of opcodes (a development tool)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile's figures instead of opcodes (a development tool)")
    parser.add_argument("--repeat", type=int, default=5, help="tries of --time")
    args = parser.parse_args(argv)
    sourced = [name for name in compiled.running() if compiled.MODULES[name]]
    if not (args.time or args.profile) and sourced:  # count their Python
        os.environ[compiled.ENVIRON] = ",".join(sourced)
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    proxy = Proxy(args.clients, args.multiget, args.route, args.pipeline)
    requests = args.clients * args.rounds * args.pipeline
    if args.time or args.profile:
        raise_gc_threshold()  # as twistd's process runs (mcproxy.app.process)
    if args.time:
        seconds = cpu_time(proxy, args.rounds, args.repeat)
        print(f"{seconds / requests * 1e6:.2f} us CPU per request "
              f"({args.clients} clients x {args.rounds} rounds x {args.pipeline}, "
              f"{args.multiget}-key gets, best of {args.repeat})")
        return 0
    if args.profile:
        profile(proxy, args.rounds, args.top)
        return 0
    ops = count(proxy, args.rounds)
    print(f"{sum(ops.values()) / requests:.0f} opcodes per request "
          f"({args.clients} clients x {args.rounds} rounds x {args.pipeline}, "
          f"{args.multiget}-key gets)")
    for name, n in ops.most_common(args.top):
        print(f"  {n / requests:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
