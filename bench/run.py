"""Benchmark mcproxy against nutcracker, memcached's proxy and memcached itself.

``python bench/run.py`` starts one memcached and in front of it nutcracker,
memcached 1.6.45's own proxy (when its binary is there) and mcproxy: on the
direct route of bench/route.lua once as one process and once with
``--workers=2`` (``mcproxy-2w``), on a Lua route (``mcproxy-lua``), on a
route-library route (``mcproxy-lib``) and on memcached-proxy's routelib file
(``mcproxy-routelib``); all on loopback. It runs the same
load from bench/loadgen.c against each, rotating the systems' order every
round, prints a table, writes bench/results/results.json, table.rst and
chart.png. See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import memory
import report
from systems import (
    BENCH_DIR,
    MEMCACHED_PROXY,
    REPO_DIR,
    Cluster,
    SampleFailed,
    System,
    SystemUnavailable,
    cpu_seconds,
    cpu_times,
    machine_busy_seconds,
)

#: Debian packages providing what the benchmark runs, by the file that shows
#: the package is installed.
PACKAGES = {
    "memcached": "memcached",
    "nutcracker": "nutcracker",
    "gcc": "gcc",
    "/usr/include/stdio.h": "libc6-dev",
}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
#: The distribution's interpreter, which runs the proxies (in a virtualenv
#: of bench/build) unless --python says otherwise: see proxy_python.
SYSTEM_PYTHON = "/usr/bin/python3"
VENV = BENCH_DIR / "build" / "venv"
STARTED = time.monotonic()
DRAIN_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0
#: Seconds a load-generator run may take beyond warm-up, measuring, drain
#: and connecting before it is killed and its sample counted as failed.
SAMPLE_GRACE = 15.0
#: Failed samples after which a system is out of the run, even if it
#: still answers: each one may cost a whole time-out.
MAX_FAILED_SAMPLES = 2
#: Seconds a system has to forward again after a failed sample.
RECHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class Workload:
    """One load shape, as loadgen options."""

    name: str
    title: str
    conns: int
    depth: int
    multiget: int = 1
    get_ratio: float = 0.9
    value_size: int = 100

    def loadgen_args(self) -> list[str]:
        return ["--conns", str(self.conns), "--depth", str(self.depth),
                "--multiget", str(self.multiget), "--get-ratio", str(self.get_ratio),
                "--value-size", str(self.value_size)]


WORKLOADS = {
    "a": Workload("a", "90% get / 10% set, 100 B values, 50 conns x 1 in flight", 50, 1),
    "b": Workload("b", "as (a), 16 in flight per connection (pipelined)", 50, 16),
    "c": Workload("c", "as (a), gets are 10-key multigets", 50, 1, multiget=10),
    "d": Workload("d", "latency: 1 connection, 1 request at a time", 1, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run of under 2 minutes: 1 round of 2 s (overridable)")
    p.add_argument("--rounds", type=int, help="rounds of every workload (5; quick: 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (5; quick: 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before (1; quick: 0.5)")
    p.add_argument("--workloads", default="abcd", help="subset of abcd (default: all)")
    p.add_argument("--systems", default=",".join(report.SYSTEMS),
                   help=f"comma-separated subset of {','.join(report.SYSTEMS)} "
                        "(default: all)")
    p.add_argument("--keys", type=int, default=10000, help="key space (default 10000)")
    p.add_argument("--idle-conns", type=int, default=10000,
                   help="idle connections for the RSS test (default 10000)")
    p.add_argument("--inflight-conns", type=int, default=100,
                   help="connections for the in-flight RSS test (default 100)")
    p.add_argument("--inflight-depth", type=int, default=100,
                   help="gets held per connection in the in-flight RSS test (default 100)")
    p.add_argument("--no-memory", action="store_true", help="skip the RSS tests")
    p.add_argument("--memcached-threads", type=int, default=1,
                   help="memcached worker threads (default 1)")
    p.add_argument("--mcproxy-start-timeout", type=float, default=20)
    p.add_argument("--memcached-proxy", type=Path, default=MEMCACHED_PROXY,
                   help="memcached's proxy binary (built with --enable-proxy; default "
                        f"{MEMCACHED_PROXY}); missing, the run goes on without it")
    p.add_argument("--no-install", action="store_true",
                   help="never apt-get/pip install; fail if something is missing")
    p.add_argument("--output", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--python", help="interpreter that runs mcproxy (default: a virtualenv "
                   f"of {SYSTEM_PYTHON} in {VENV.relative_to(REPO_DIR)}, else this one)")
    args = p.parse_args(argv)
    quick = {"rounds": 1, "duration": 2.0, "warmup": 0.5}
    full = {"rounds": 5, "duration": 5.0, "warmup": 1.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.workloads = [WORKLOADS[w] for w in args.workloads if w in WORKLOADS]
    args.systems = [s for s in report.SYSTEMS if s in args.systems.split(",")]
    if not args.workloads or not args.systems or args.rounds < 1:
        p.error("nothing to run")
    return args


def children_cpu_seconds() -> float:
    """User+system CPU of this process's reaped children (the loadgen runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    print(f"[{minutes:02d}:{seconds:02d}] {message}", file=sys.stderr, flush=True)


# -- setup --------------------------------------------------------------------


def ensure_tools(install: bool) -> None:
    """apt-get install the Debian packages that are missing (as root)."""
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}:{SBIN_PATH}"
    missing = [pkg for tool, pkg in PACKAGES.items()
               if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool))]
    if not missing:
        return
    if not install or os.geteuid() != 0:
        sys.exit(f"missing: {' '.join(missing)} (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, timeout=900)
    # Debian's service starts memcached on port 11211; we run our own.


def ensure_matplotlib(install: bool) -> None:
    if importlib.util.find_spec("matplotlib") or not install:
        return
    log("installing matplotlib with pip (for the chart)")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                            timeout=600)
    if result.returncode:
        log("pip install matplotlib failed: no chart")


def proxy_python(args: argparse.Namespace) -> str:
    """The interpreter that runs mcproxy: ``--python``; else a virtualenv
    of the distribution's python3 (Debian builds it with profile-guided and
    link-time optimisation, as a deployment would run it), made and given
    this checkout unless ``--no-install``; else this interpreter."""
    if args.python:
        return args.python
    python = VENV / "bin" / "python"
    if not args.no_install and os.path.exists(SYSTEM_PYTHON):
        log(f"installing mcproxy into a virtualenv of {SYSTEM_PYTHON} ({VENV})")
        steps = [[SYSTEM_PYTHON, "-m", "venv", str(VENV)],
                 [str(python), "-m", "pip", "install", "-q", "-e", str(REPO_DIR),
                  "--config-settings", "editable_mode=compat"]]
        for argv in steps[1:] if python.exists() else steps:
            if subprocess.run(argv, timeout=900).returncode:
                log(f"failed: {' '.join(argv)}")
                return sys.executable
    return str(python) if python.exists() else sys.executable


def build_loadgen() -> Path:
    """Compile bench/loadgen.c into bench/build/ (git-ignored) when it changed."""
    source = BENCH_DIR / "loadgen.c"
    binary = BENCH_DIR / "build" / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source),
                        "-lm"], check=True, timeout=120)
    return binary


def describe_machine(python: str, memcached_proxy: Path) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines and out.returncode == 0 else "unknown"

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": first_line([python, "-c", "import sys; print(sys.executable, sys.version)"]),
        "mcproxy_framing": first_line([python, "-c", "from mcproxy.wire import reader; "
                                       "print('compiled' if reader.plain_run else 'pure')"]),
        "memcached": first_line(["memcached", "-V"]),
        "nutcracker": first_line(["nutcracker", "-V"]),
        "memcached_proxy": first_line([str(memcached_proxy), "-V"]),
        "mcproxy_commit": first_line(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- measuring ----------------------------------------------------------------


def run_loadgen(loadgen: Path, port: int, extra: list[str], timeout: float) -> dict:
    argv = [str(loadgen), "--port", str(port), "--drain-timeout", str(DRAIN_TIMEOUT),
            "--connect-timeout", str(CONNECT_TIMEOUT), *extra]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SampleFailed(f"the load generator did not finish in {timeout:.0f} s") from None
    if out.returncode == 2:
        raise SampleFailed(json.loads(out.stdout)["error"])
    if out.returncode:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def populate(loadgen: Path, memcached: System, keys: int) -> None:
    """Store every key once, directly in memcached, and check it worked."""
    result = run_loadgen(loadgen, memcached.port,
                         ["--populate", "--conns", "1", "--depth", "64",
                          "--keys", str(keys), "--duration", "60"], timeout=90)
    if result["total_requests"] != keys or result["total_errors"]:
        raise SystemUnavailable(f"populating memcached failed: {result}")


def measure(system: System, workload: Workload, memcached: System, loadgen: Path,
            args: argparse.Namespace, round_no: int) -> dict:
    """One run, with CPU sampled around the whole loadgen process.

    Besides the proxy's CPU per request (and the user-mode part of it) and
    memcached's, it records the load generator's and how busy the rest of
    the machine was (other processes make the figures noisy on two cores).
    """
    proxy = system.process
    proxy_start = cpu_times(proxy.pid) if proxy else (0.0, 0.0)
    start = {"proxy": sum(proxy_start),
             "memcached": cpu_seconds(memcached.pid), "loadgen": children_cpu_seconds(),
             "machine": machine_busy_seconds(), "wall": time.monotonic()}
    extra = [*workload.loadgen_args(), "--keys", str(args.keys),
             "--duration", str(args.duration), "--warmup", str(args.warmup),
             "--seed", str(round_no)]
    timeout = args.warmup + args.duration + DRAIN_TIMEOUT + CONNECT_TIMEOUT + SAMPLE_GRACE
    workers = system.worker_pids() if system.workers > 1 else set()
    sample = run_loadgen(loadgen, system.port, extra, timeout)
    time.sleep(0.1)  # the proxy's work on the closing connections belongs to this run
    if proxy and proxy.poll() is not None:
        raise SystemUnavailable(f"exited with status {proxy.returncode} during a run")
    if system.workers > 1 and system.worker_pids() != workers:
        # The supervisor restarts a worker that died; its clients saw errors.
        raise SystemUnavailable(f"worker processes changed during a run: {sorted(workers)} "
                                f"became {sorted(system.worker_pids())}")
    proxy_used = [now - then for now, then in zip(cpu_times(proxy.pid), proxy_start,
                                                  strict=True)] if proxy else [0.0, 0.0]
    used = {"proxy": sum(proxy_used),
            "memcached": cpu_seconds(memcached.pid) - start["memcached"],
            "loadgen": children_cpu_seconds() - start["loadgen"]}
    other = machine_busy_seconds() - start["machine"] - sum(used.values())
    wall = time.monotonic() - start["wall"]
    requests = sample["total_requests"]
    if not requests:
        raise SampleFailed("no request was answered")
    sample["round"] = round_no
    sample["proxy_cpu_us"] = used["proxy"] * 1e6 / requests if proxy else None
    # How much of it ran the proxy's own code (user) rather than the kernel's.
    sample["proxy_user_us"] = proxy_used[0] * 1e6 / requests if proxy else None
    sample["memcached_cpu_us"] = used["memcached"] * 1e6 / requests
    sample["loadgen_cpu_us"] = used["loadgen"] * 1e6 / requests
    sample["background_cpu_pct"] = max(0.0, other) * 100 / (wall * (os.cpu_count() or 1))
    return sample


def run_rounds(systems: list[System], cluster: Cluster, loadgen: Path,
               args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Every workload on every system, rotating the system order each round.

    A sample that fails (see SampleFailed) is kept as ``{"round", "failed"}``
    and its system checked again: it stays in the run if it still forwards,
    up to MAX_FAILED_SAMPLES failures. A system that exits or stops
    forwarding is out of the rest of the run.
    """
    memcached = cluster.memcached
    samples = {w.name: {s.name: [] for s in systems} for w in args.workloads}
    failures = dict.fromkeys((s.name for s in systems), 0)
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(systems)
        order = systems[shift:] + systems[:shift]
        for workload in args.workloads:
            for system in order:
                if not system.available:
                    continue
                where = f"({workload.name}) round {round_no}"
                try:
                    sample = measure(system, workload, memcached, loadgen, args, round_no)
                except SampleFailed as e:
                    samples[workload.name][system.name].append(
                        {"round": round_no, "failed": str(e)})
                    failures[system.name] += 1
                    log(f"  round {round_no}/{args.rounds} ({workload.name}) {system.name}: "
                        f"sample FAILED: {e}")
                    if failures[system.name] >= MAX_FAILED_SAMPLES:
                        system.error = f"{where}: {failures[system.name]} failed samples: {e}"
                    else:
                        cluster.recheck(system, RECHECK_TIMEOUT)
                    if system.error:
                        log(f"  {system.name} is out of the run: {system.error}")
                    continue
                except SystemUnavailable as e:
                    system.error = f"{where}: {e}"
                    log(f"  {system.name} is out of the run: {system.error}")
                    continue
                samples[workload.name][system.name].append(sample)
                cpu = sample["proxy_cpu_us"]
                log(f"  round {round_no}/{args.rounds} ({workload.name}) {system.name:<16}"
                    f"{sample['throughput']:>10,.0f} req/s  "
                    f"p50 {sample['latency_us']['p50']:>8.1f} us  "
                    f"p99 {sample['latency_us']['p99']:>8.1f} us  "
                    f"proxy {'-' if cpu is None else f'{cpu:.2f}'} us/req  "
                    f"errors {sample['total_errors']}  misses {sample['total_misses']}")
    return samples


def measure_memory(proxies: list[System], memcached: System,
                   args: argparse.Namespace) -> dict:
    results = {}
    for system in proxies:
        if not system.available:
            results[system.name] = {"error": system.error}
            continue
        try:
            log(f"  memory: {system.name}: {args.idle_conns} idle connections")
            idle = memory.idle_connections(system, args.idle_conns)
            log(f"  memory: {system.name}: "
                f"{args.inflight_conns * args.inflight_depth} gets in flight")
            inflight = memory.inflight_requests(system, memcached, args.inflight_conns,
                                                args.inflight_depth)
        except OSError as e:
            results[system.name] = {"error": f"memory test failed: {e}"}
            continue
        results[system.name] = {"idle": idle, "inflight": inflight}
    return results


#: Seconds the RSS tests take per proxy, about (nutcracker ~7, mcproxy ~12,
#: mcproxy-2w ~15 on a 2-vCPU VM).
MEMORY_SECONDS = 15


def estimated_seconds(args: argparse.Namespace) -> float:
    """About how long a run takes: each loadgen run costs ~0.3 s over
    warm-up + duration (start, connect, drain)."""
    runs = args.rounds * len(args.workloads) * len(args.systems)
    memory_s = 0 if args.no_memory else MEMORY_SECONDS * sum(
        s != "direct" for s in args.systems)
    return runs * (args.warmup + args.duration + 0.3) + memory_s + 15


# -- main ---------------------------------------------------------------------


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark went over its time limit")


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(install=not args.no_install)
    ensure_matplotlib(install=not args.no_install)
    loadgen = build_loadgen()
    python = proxy_python(args)
    memory.raise_nofile(args.idle_conns + 1024)
    args.output.mkdir(parents=True, exist_ok=True)
    logdir = args.output / "logs"
    logdir.mkdir(exist_ok=True)

    expected = estimated_seconds(args)
    limit = int(expected * 1.5) + 120
    log(f"expect about {expected / 60:.1f} min (stopped after {limit / 60:.0f} min "
        f"at most); logs in {logdir}")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(limit)
    try:
        with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as tmp, \
                Cluster(Path(tmp), logdir, args.memcached_threads, python) as cluster:
            memcached = cluster.start_memcached()
            populate(loadgen, memcached, args.keys)
            starters = {"direct": cluster.direct, "nutcracker": cluster.start_nutcracker,
                        "memcached-proxy": lambda: cluster.start_memcached_proxy(
                            args.memcached_proxy, max_conns=args.idle_conns + 1024)}
            systems = [starters[name]() if name in starters
                       else cluster.start_mcproxy(name, args.mcproxy_start_timeout)
                       for name in args.systems]
            for system in systems:
                workers = (f", supervisor pid {system.pid}, worker pids "
                           f"{sorted(system.worker_pids())}"
                           if system.workers > 1 and system.available else "")
                log(f"{system.name}: " + (f"port {system.port}{workers}" if system.available
                                          else f"MISSING: {system.error}"))
            samples = run_rounds(systems, cluster, loadgen, args)
            proxies = [s for s in systems if s.name != "direct"]
            mem = {} if args.no_memory else measure_memory(proxies, memcached, args)
    finally:
        signal.alarm(0)

    result = {
        "machine": describe_machine(python, args.memcached_proxy),
        "settings": {
            "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
            "keys": args.keys, "memcached_threads": args.memcached_threads,
            "idle_conns": args.idle_conns,
            "inflight_requests": args.inflight_conns * args.inflight_depth,
        },
        "systems": {s.name: {"error": s.error} for s in systems},
        "workloads": {
            w.name: {"title": w.title, "params": dataclasses.asdict(w),
                     **report.analyse(w.name, samples[w.name]),
                     "samples": samples[w.name]}
            for w in args.workloads
        },
        "memory": mem,
    }
    result["workers"] = report.workers_summary(result["workloads"])
    print(report.format_table(result))
    report.write_json(result, args.output / "results.json")
    (args.output / "table.rst").write_text(report.format_rst(result))
    chart = args.output / "chart.png"
    wrote = f"{args.output / 'results.json'}, {args.output / 'table.rst'}"
    if report.write_chart(result, chart):
        log(f"wrote {wrote} and {chart}")
    else:
        log(f"wrote {wrote} (no matplotlib: no chart)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process started was stopped")
        sys.exit(130)
    except TimeoutError as e:
        log(f"{e}; every process started was stopped")
        sys.exit(1)
