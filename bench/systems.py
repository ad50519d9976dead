"""The systems under test and what /proc says about them.

One memcached; in front of it nutcracker, memcached's own proxy (when its
binary is there) and mcproxy: on the direct route of bench/route.lua, once
as one process and once with ``--workers=2`` (a supervisor and two worker
processes it spawns; they stay in its session and process tree, so the CPU,
RSS and descriptor sums over the tree cover them), and as one process on a
Lua route, on a route-library route and on memcached-proxy's routelib file
(``--config=routelib``). Every process is started in its own
session and stopped by :class:`Cluster` on exit, also on Ctrl-C and
exceptions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
#: memcached's own proxy, 1.6.45 (built with --enable-proxy; Debian has no
#: package of it): the peer a user of Lua routing would pick instead.
MEMCACHED_PROXY = REPO_DIR.parent / "shared" / "anchors" / "memcached-proxy-1.6.45"
#: mcproxy's systems: name -> (route config in bench/, --workers).
MCPROXY_SYSTEMS = {
    "mcproxy": ("route.lua", 1),
    "mcproxy-lua": ("route_lua.lua", 1),
    "mcproxy-lib": ("route_library.lua", 1),
    "mcproxy-routelib": ("mcp_routelib.lua", 1),
    "mcproxy-2w": ("route.lua", 2),
}
#: mcproxy's systems whose route config is a route library file (memcached's
#: routelib), run as ``--config=routelib --config-arg=FILE``: the file
#: memcached-proxy runs.
ROUTELIB_SYSTEMS = frozenset({"mcproxy-routelib"})


class SystemUnavailable(Exception):
    """A system did not start or stopped answering correctly."""


class SampleFailed(SystemUnavailable):
    """One load-generator run against a system failed or went over its time.

    The system may still answer: the harness checks it again before giving
    it the next sample.
    """


@dataclass
class System:
    """Something the load generator talks to: memcached itself or a proxy."""

    name: str
    port: int = 0
    process: subprocess.Popen | None = None
    error: str | None = None
    #: mcproxy's --workers: above 1, ``process`` is the supervisor and the
    #: workers are its children
    workers: int = 1

    @property
    def available(self) -> bool:
        return self.error is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> set[int]:
        """The supervisor's live descendants (its worker processes)."""
        return set(process_tree(self.pid)) - {self.pid}


# -- ports and a minimal memcached client ------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def mc_exchange(port: int, payload: bytes, terminator: bytes,
                timeout: float = 2.0) -> bytes:
    """Send ``payload`` on a new connection; read until ``terminator``."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(terminator):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def mc_set(port: int, key: str, value: bytes) -> None:
    payload = f"set {key} 0 0 {len(value)}\r\n".encode() + value + b"\r\n"
    reply = mc_exchange(port, payload, b"\r\n")
    if reply != b"STORED\r\n":
        raise SystemUnavailable(f"set {key} on port {port} answered {reply[:80]!r}")


def mc_get(port: int, key: str) -> bytes | None:
    reply = mc_exchange(port, f"get {key}\r\n".encode(), b"END\r\n")
    if reply == b"END\r\n":
        return None
    header, _, rest = reply.partition(b"\r\n")
    parts = header.split()
    if len(parts) < 4 or parts[:2] != [b"VALUE", key.encode()] or not parts[3].isdigit():
        raise SystemUnavailable(f"get {key} on port {port} answered {reply[:80]!r}")
    value = rest[: int(parts[3])]
    if rest[len(value):] != b"\r\nEND\r\n":
        raise SystemUnavailable(f"get {key} on port {port} answered {reply[:80]!r}")
    return value


def mc_stats(port: int, args: str = "") -> dict[str, str]:
    """``stats [args]`` on a new connection, as a dict."""
    reply = mc_exchange(port, f"stats {args}".strip().encode() + b"\r\n", b"END\r\n")
    stats = {}
    for line in reply.decode(errors="replace").splitlines():
        fields = line.split(" ", 2)
        if len(fields) == 3 and fields[0] == "STAT":
            stats[fields[1]] = fields[2]
    return stats


def answering_workers(port: int, workers: int, attempts: int = 64) -> dict[int, int]:
    """Worker id -> pid of the mcproxy workers that answered on ``port``.

    Each connection asks ``stats`` (a worker adds its ``worker_id``); the
    kernel spreads connections over the workers' SO_REUSEPORT sockets by a
    hash of the client port, so a few dozen connections reach every worker
    that accepts. Stops as soon as ``workers`` different ones answered.
    """
    seen: dict[int, int] = {}
    for _ in range(attempts):
        stats = mc_stats(port)
        if "worker_id" not in stats:
            raise SystemUnavailable(f"stats on port {port} has no worker_id")
        seen[int(stats["worker_id"])] = int(stats.get("pid", 0))
        if len(seen) >= workers:
            break
    return seen


def check_forwarding(port: int, backend_port: int) -> None:
    """Prove ``port`` serves memcached's data: write on each side, read on the other.

    A proxy answering from a cache of its own would pass a plain set/get probe.
    """
    token = os.urandom(6).hex()
    mc_set(backend_port, f"bench:probe:a:{token}", b"direct " + token.encode())
    got = mc_get(port, f"bench:probe:a:{token}")
    if got != b"direct " + token.encode():
        raise SystemUnavailable(f"a key set on memcached read back as {got!r}")
    mc_set(port, f"bench:probe:b:{token}", b"proxied " + token.encode())
    got = mc_get(backend_port, f"bench:probe:b:{token}")
    if got != b"proxied " + token.encode():
        raise SystemUnavailable(f"a key set through port {port} reached memcached as {got!r}")


# -- /proc --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat from the state on (field 3 is index 0)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                children[int(_stat_fields(int(entry.name))[1])].append(int(entry.name))
            except (OSError, IndexError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_times(root: int) -> tuple[float, float]:
    """User and system CPU seconds of a process tree, reaped children
    included."""
    user = system = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
        if pid == root:
            user += int(fields[13])
            system += int(fields[14])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_seconds(root: int) -> float:
    """User+system CPU of a process tree, reaped children included."""
    return sum(cpu_times(root))


def machine_busy_seconds() -> float:
    """CPU time all processes used, summed over CPUs, plus steal (/proc/stat).

    Interrupt time is left out: it is mostly the loopback traffic of the run
    itself, which the kernel charges to no process.
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + steal) / CLOCK_TICKS


def rss_bytes(root: int) -> int:
    """Sum of VmRSS over a process tree (shared pages count once per process)."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def open_fds(root: int) -> int:
    """Open file descriptors over a process tree."""
    total = 0
    for pid in process_tree(root):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def settled_rss(root: int, timeout: float = 3.0) -> int:
    """RSS once it stops changing (three equal samples 0.1 s apart)."""
    deadline = time.monotonic() + timeout
    samples = [rss_bytes(root)]
    while time.monotonic() < deadline and (len(samples) < 3 or len(set(samples[-3:])) > 1):
        time.sleep(0.1)
        samples.append(rss_bytes(root))
    return samples[-1]


# -- processes ----------------------------------------------------------------


class Cluster:
    """Starts memcached and the proxies; stops everything it started on exit."""

    def __init__(self, workdir: Path, logdir: Path, memcached_threads: int = 1,
                 python: str = sys.executable) -> None:
        self.workdir = workdir
        #: the interpreter that runs mcproxy
        self.python = python
        self.logdir = logdir
        self.memcached_threads = memcached_threads
        self.processes: list[subprocess.Popen] = []
        self.memcached: System | None = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def _spawn(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       **kwargs)
        finally:
            log.close()
        self.processes.append(process)
        return process

    def _log_tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _wait_ready(self, system: System, timeout: float) -> System:
        """Wait until ``system`` answers and forwards to memcached; else mark it."""
        assert self.memcached is not None
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if system.process is not None and system.process.poll() is not None:
                system.error = (f"exited with status {system.process.returncode}: "
                                f"{self._log_tail(system.name)}")
                return system
            try:
                check_forwarding(system.port, self.memcached.port)
                if system.workers > 1:
                    self._check_workers(system)
                return system
            except (OSError, SystemUnavailable) as e:
                last_error = str(e)
            time.sleep(0.2)
        system.error = f"not ready after {timeout:.0f} s: {last_error}"
        log_tail = self._log_tail(system.name)
        if log_tail:
            system.error += f" (log: {log_tail})"
        return system

    @staticmethod
    def _check_workers(system: System) -> None:
        """Every worker of ``system`` accepts and answers, and is in its process tree.

        The port answers as soon as one worker adopted its socket; the others'
        connections wait in their sockets' backlogs until then. ``stats
        workers`` counts the workers that reported to the supervisor, and
        ``stats`` on enough connections reaches each worker's socket.
        """
        reported = int(mc_stats(system.port, "workers").get("workers", 0))
        if reported < system.workers:
            raise SystemUnavailable(f"{reported} of {system.workers} workers reported")
        answered = answering_workers(system.port, system.workers)
        if len(answered) < system.workers:
            raise SystemUnavailable(f"workers {sorted(answered)} answered, "
                                    f"not all {system.workers}")
        strangers = set(answered.values()) - system.worker_pids()
        if strangers:
            raise SystemUnavailable(f"worker pids {sorted(strangers)} are not children "
                                    f"of the supervisor (pid {system.pid})")

    def start_memcached(self) -> System:
        port = free_port()
        argv = ["memcached", "-l", HOST, "-p", str(port), "-U", "0",
                "-t", str(self.memcached_threads), "-m", "256", "-c", "4096"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]
        system = System("memcached", port, self._spawn("memcached", argv))
        self.memcached = system
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and system.process.poll() is None:
            try:
                mc_set(port, "bench:probe", b"ok")
                return system
            except (OSError, SystemUnavailable):
                time.sleep(0.1)
        raise SystemUnavailable(f"memcached did not start: {self._log_tail('memcached')}")

    def direct(self) -> System:
        """memcached itself, as a system under test (no proxy process)."""
        assert self.memcached is not None
        return System("direct", self.memcached.port)

    def start_nutcracker(self) -> System:
        assert self.memcached is not None
        port, stats_port = free_port(), free_port()
        config = self.workdir / "nutcracker.yml"
        config.write_text(
            "bench:\n"
            f"  listen: {HOST}:{port}\n"
            "  hash: fnv1a_64\n"
            "  distribution: ketama\n"
            "  auto_eject_hosts: false\n"
            "  backlog: 1024\n"
            "  servers:\n"
            f"    - {HOST}:{self.memcached.port}:1\n"
        )
        argv = ["nutcracker", "-c", str(config), "-s", str(stats_port), "-a", HOST,
                "-v", "4", "-o", str(self.logdir / "nutcracker.out")]
        system = System("nutcracker", port, self._spawn("nutcracker", argv))
        return self._wait_ready(system, timeout=10)

    def start_memcached_proxy(self, binary: Path = MEMCACHED_PROXY,
                              max_conns: int = 4096) -> System:
        """memcached's own proxy on bench/mcp_routelib.lua, one worker thread
        (``-t 1``) as mcproxy is one process; ``max_conns`` (``-c``) must
        cover the RSS test's idle connections. Missing if ``binary`` is."""
        assert self.memcached is not None
        name = "memcached-proxy"
        if not os.access(binary, os.X_OK):
            return System(name, error=f"skipped: no executable {binary}")
        port = free_port()
        argv = [str(binary), "-l", HOST, "-p", str(port), "-U", "0", "-t", "1",
                "-m", "64", "-c", str(max_conns),
                "-o", f"proxy_config=routelib,proxy_arg={BENCH_DIR / 'mcp_routelib.lua'}"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]
        env = dict(os.environ, MCPROXY_BENCH_BACKEND_PORT=str(self.memcached.port))
        try:
            process = self._spawn(name, argv, env=env)
        except OSError as e:
            return System(name, port, error=f"could not start: {e}")
        return self._wait_ready(System(name, port, process), timeout=10)

    def start_mcproxy(self, name: str = "mcproxy", timeout: float = 20) -> System:
        """One of MCPROXY_SYSTEMS: mcproxy on its route config, with
        ``--workers`` when it has more than one."""
        assert self.memcached is not None
        route, workers = MCPROXY_SYSTEMS[name]
        port = free_port()
        env = dict(os.environ, MCPROXY_BENCH_BACKEND_PORT=str(self.memcached.port))
        config = ([f"--config={BENCH_DIR / route}"] if name not in ROUTELIB_SYSTEMS
                  else ["--config=routelib", f"--config-arg={BENCH_DIR / route}"])
        argv = [self.python, "-m", "twisted", "--log-level=warn", "--log-format=text",
                "mcproxy", *config, f"--listen=tcp:{port}:interface={HOST}"]
        if workers > 1:
            argv.append(f"--workers={workers}")
        try:
            process = self._spawn(name, argv, cwd=REPO_DIR, env=env)
        except OSError as e:
            return System(name, port, error=f"could not start: {e}", workers=workers)
        return self._wait_ready(System(name, port, process, workers=workers), timeout=timeout)

    def recheck(self, system: System, timeout: float) -> None:
        """After a failed sample: mark ``system`` out unless it still runs
        and forwards within ``timeout``."""
        checked = self._wait_ready(System(system.name, system.port, system.process,
                                          workers=system.workers), timeout)
        if checked.error:
            system.error = f"after a failed sample: {checked.error}"

    def stop_all(self) -> None:
        """SIGCONT (memcached may be stopped), SIGTERM, then SIGKILL stragglers."""
        for process in reversed(self.processes):
            if process.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, sig)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.processes.clear()
