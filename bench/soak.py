"""Bounded load and soak: many clients through mcproxy to three memcached servers.

``python bench/soak.py`` runs ``twistd -n mcproxy`` (a pool of three
memcached servers behind ``CMD_ANY_STORAGE``) and 200 client connections
for 5 minutes (``--seconds``, ``--connections``). Each connection runs its
own mix of ``get``, ``set``, multi-key ``get``, ``mg``/``ms``/``md``,
``delete`` and ``mn`` over a key space of its own, with values of 10 bytes
to 500 KB (sizes spread evenly on a log scale), and checks every reply
against a model of what each of its keys holds: as no other connection
touches its keys, the model is exact and any difference is a proxy bug.

It reports throughput, p50/p99 latency, the proxy's peak resident memory,
and its resident memory and open file descriptors before the load and
after every client has gone (the fds must be back where they started).
Exit status 1 if a reply was wrong, a connection failed, or fds leaked.
Everything listens on loopback and every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import Memcached, Proxy  # noqa: E402

CONFIG = """
function mcp_config_pools()
    return mcp.pool({
        mcp.backend("m1", "127.0.0.1", "%d"),
        mcp.backend("m2", "127.0.0.1", "%d"),
        mcp.backend("m3", "127.0.0.1", "%d"),
    })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, %s)
end
"""
#: The route of CONFIG: the direct path, or with ``--lua`` one that runs in
#: Lua for every request (and every key of a multiget), which a long soak
#: is the way to see Lua's memory over time in.
ROUTES = {False: "function(r) return pool(r) end",
          True: "function(r) local res = pool(r) return res end"}

MIN_VALUE, MAX_VALUE = 10, 500 * 1024


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Mismatch(Exception):
    """A reply that is not what the model says it must be."""


class Conn:
    """One client connection, its keys and the model of their values."""

    def __init__(self, index: int, keys: int, rng: random.Random) -> None:
        self.keys = [b"soak:%d:%d" % (index, i) for i in range(keys)]
        self.model: dict[bytes, bytes | None] = dict.fromkeys(self.keys)
        self.rng = rng
        self.ops = 0
        self.bytes = 0

    def value(self) -> bytes:
        size = int(math.exp(self.rng.uniform(math.log(MIN_VALUE), math.log(MAX_VALUE))))
        return (b"%d:" % self.rng.getrandbits(32)) * (size // 11 + 1)

    async def run(self, host: str, port: int, deadline: float, lat: array) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=2 ** 21)
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                await self.step(reader, writer)
                lat.append(time.perf_counter() - start)
                self.ops += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def step(self, reader, writer) -> None:
        rng = self.rng
        key = rng.choice(self.keys)
        expected = self.model[key]
        op = rng.random()
        if op < 0.30:  # get
            writer.write(b"get %s\r\n" % key)
            await self.expect_values(reader, [key])
        elif op < 0.55:  # set
            value = self.value()
            writer.write(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
            await self.expect(reader, b"STORED\r\n")
            self.model[key] = value
            self.bytes += len(value)
        elif op < 0.70:  # multiget
            keys = rng.sample(self.keys, rng.randint(2, min(20, len(self.keys))))
            writer.write(b"get %s\r\n" % b" ".join(keys))
            await self.expect_values(reader, keys)
        elif op < 0.78:  # mg
            writer.write(b"mg %s v f\r\n" % key)
            if expected is None:
                await self.expect(reader, b"EN\r\n")
            else:
                await self.expect(reader, b"VA %d f0\r\n" % len(expected))
                await self.expect(reader, expected + b"\r\n")
                self.bytes += len(expected)
        elif op < 0.88:  # ms
            value = self.value()
            writer.write(b"ms %s %d T0\r\n%s\r\n" % (key, len(value), value))
            await self.expect(reader, b"HD\r\n")
            self.model[key] = value
            self.bytes += len(value)
        elif op < 0.93:  # delete
            writer.write(b"delete %s\r\n" % key)
            await self.expect(reader, b"NOT_FOUND\r\n" if expected is None else b"DELETED\r\n")
            self.model[key] = None
        elif op < 0.97:  # md
            writer.write(b"md %s\r\n" % key)
            await self.expect(reader, b"NF\r\n" if expected is None else b"HD\r\n")
            self.model[key] = None
        else:  # pipelined get + mn
            writer.write(b"mg %s k\r\nmn\r\n" % key)
            await self.expect(reader, b"%s k%s\r\n" % (b"EN" if expected is None else b"HD", key))
            await self.expect(reader, b"MN\r\n")

    async def expect(self, reader, want: bytes) -> None:
        got = await reader.readexactly(len(want))
        if got != want:
            raise Mismatch(f"expected {want[:80]!r}, got {got[:80]!r}")

    async def expect_values(self, reader, keys: list[bytes]) -> None:
        for key in keys:
            value = self.model[key]
            if value is not None:
                await self.expect(reader, b"VALUE %s 0 %d\r\n" % (key, len(value)))
                await self.expect(reader, value + b"\r\n")
                self.bytes += len(value)
        await self.expect(reader, b"END\r\n")


async def load(port: int, args, pid: int) -> dict:
    deadline = time.monotonic() + args.seconds
    lat = array("d")
    conns = [Conn(i, args.keys, random.Random(args.seed * 100003 + i))
             for i in range(args.connections)]
    peak = [rss_kb(pid)]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_kb(pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(c.run("127.0.0.1", port, deadline, lat) for c in conns),
                       return_exceptions=True),
        args.seconds + 120)
    elapsed = time.monotonic() - started
    sampler.cancel()
    errors = [r for r in results if isinstance(r, BaseException)]
    ops = sum(c.ops for c in conns)
    ordered = sorted(lat)
    pct = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3) \
        if ordered else (lambda q: float("nan"))
    return {"ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed,
            "mb_per_s": sum(c.bytes for c in conns) / elapsed / 2 ** 20,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "peak_rss_kb": peak[0], "errors": errors}


def settle(pid: int, target: int, timeout: float = 10.0) -> int:
    """Open fds once they are back at ``target`` (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    fds = open_fds(pid)
    while fds > target and time.monotonic() < deadline:
        time.sleep(0.1)
        fds = open_fds(pid)
    return fds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--keys", type=int, default=20, help="keys per connection")
    parser.add_argument("--memory", type=int, default=1024,
                        help="MB per memcached (enough that nothing is evicted)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lua", action="store_true",
                        help="route every request through Lua (not the direct path)")
    args = parser.parse_args(argv)

    servers = [Memcached(memory_mb=args.memory) for _ in range(3)]
    proxy = Proxy(None, config_text=CONFIG % (*(s.port for s in servers), ROUTES[args.lua]))
    try:
        for s in servers:
            s.start()
        proxy.start()
        pid = proxy.proc.pid
        # Connect the proxy to every backend before the "start" figures.
        with proxy.connect() as s:
            for i in range(30):
                s.sendall(b"mg warm:%d v\r\n" % i)
                assert s.recv(64) == b"EN\r\n"
        fds_start = settle(pid, 0, timeout=0.5)
        rss_start = rss_kb(pid)
        print(f"soak: {args.connections} connections for {args.seconds:.0f}s, "
              f"proxy pid {pid}, {fds_start} fds, {rss_start / 1024:.1f} MB RSS", flush=True)
        r = asyncio.run(load(proxy.port, args, pid))
        fds_end = settle(pid, fds_start)
        rss_end = rss_kb(pid)
        evictions = sum(int(line.split()[2]) for s in servers
                        for line in s.call(b"stats\r\n", b"END\r\n").split(b"\r\n")
                        if line.startswith(b"STAT evictions "))
        print(f"requests      {r['ops']} in {r['seconds']:.1f}s: {r['ops_per_s']:.0f}/s, "
              f"values {r['mb_per_s']:.1f} MB/s")
        print(f"latency       p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
              f"max {r['max_ms']:.1f} ms")
        print(f"proxy RSS     start {rss_start / 1024:.1f} MB, peak "
              f"{r['peak_rss_kb'] / 1024:.1f} MB, end {rss_end / 1024:.1f} MB")
        print(f"proxy fds     start {fds_start}, end {fds_end}")
        print(f"evictions     {evictions} (the model assumes none)")
        for e in r["errors"][:10]:
            print(f"ERROR         {type(e).__name__}: {e}")
        print(f"wrong replies / failed connections: {len(r['errors'])}")
        ok = not r["errors"] and fds_end == fds_start and proxy.proc.poll() is None
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        proxy.stop()
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
