"""Medians, ratios, targets, and the table, JSON and chart made from them."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SYSTEMS = ("direct", "nutcracker", "memcached-proxy", "mcproxy", "mcproxy-lua",
           "mcproxy-lib", "mcproxy-routelib", "mcproxy-2w")
#: The proxies mcproxy is compared with: nutcracker (C, no scripting) and
#: memcached's own proxy (C, Lua routes), the one a user of Lua routing
#: would pick instead.
PEERS = ("nutcracker", "memcached-proxy")
#: mcproxy on the direct route, on a Lua route, on a route-library route,
#: on memcached-proxy's routelib file, and on the direct route with
#: --workers=2.
MCPROXIES = ("mcproxy", "mcproxy-lua", "mcproxy-lib", "mcproxy-routelib", "mcproxy-2w")
PROXIES = PEERS + MCPROXIES
#: mcproxy --workers=2, compared with one mcproxy process (the workers claim:
#: throughput scales with cores, CPU per request stays flat).
WORKERS_SYSTEM = "mcproxy-2w"
#: Most mcproxy-2w / mcproxy CPU per request still called flat.
WORKERS_CPU_FLAT = 1.15
#: Figures compared as ratios with the peers'.
RATIO_FIGURES = ("throughput", "p50_us", "p99_us", "proxy_cpu_us")

#: Targets for the proxy CPU per request of an mcproxy system over a peer's,
#: by workload: the direct path against nutcracker, routes run in Lua
#: (hand-written or from the route library) against memcached's proxy.
CPU_TARGETS = {
    ("mcproxy", "nutcracker"): {"a": 1.3, "b": 1.0, "c": 1.0},
    ("mcproxy-lua", "memcached-proxy"): {"a": 1.5, "b": 1.5, "c": 1.0},
    ("mcproxy-lib", "memcached-proxy"): {"a": 1.5, "b": 1.5, "c": 1.0},
    ("mcproxy-routelib", "memcached-proxy"): {"a": 1.5, "b": 1.5, "c": 1.0},
}
#: Target for workload (d): mcproxy's added p50 over direct memcached, as a
#: multiple of nutcracker's.
LATENCY_WORKLOAD = "d"
LATENCY_TARGETS = {("mcproxy", "nutcracker"): 1.2}

FIGURES = {
    "throughput": lambda s: s["throughput"],
    "p50_us": lambda s: s["latency_us"]["p50"],
    "p99_us": lambda s: s["latency_us"]["p99"],
    "p999_us": lambda s: s["latency_us"]["p999"],
    "proxy_cpu_us": lambda s: s["proxy_cpu_us"],
    "proxy_user_us": lambda s: s.get("proxy_user_us"),
    "memcached_cpu_us": lambda s: s["memcached_cpu_us"],
    "loadgen_cpu_us": lambda s: s["loadgen_cpu_us"],
    "background_cpu_pct": lambda s: s["background_cpu_pct"],
}
COLORS = {"direct": "tab:blue", "nutcracker": "tab:orange", "memcached-proxy": "tab:red",
          "mcproxy": "tab:green", "mcproxy-lua": "tab:purple", "mcproxy-lib": "tab:brown",
          "mcproxy-routelib": "tab:pink", "mcproxy-2w": "tab:olive"}
#: Median share of the machine's CPU used by other processes above which the
#: figures are flagged as noisy.
BACKGROUND_WARNING_PCT = 10


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measured(samples: list[dict]) -> list[dict]:
    """The samples that have figures: not the failed ones (``{"round", "failed"}``)."""
    return [s for s in samples if "failed" not in s]


def summarize(samples: list[dict]) -> dict | None:
    """Medians over the measured rounds, error/miss totals and failed samples
    (all of which should be zero); None if no sample was measured."""
    ok = measured(samples)
    if not ok:
        return None
    summary = {name: _median([get(s) for s in ok]) for name, get in FIGURES.items()}
    summary["rounds"] = len(ok)
    summary["failed"] = len(samples) - len(ok)
    summary["requests"] = sum(s["total_requests"] for s in ok)
    summary["errors"] = sum(s["total_errors"] for s in ok)
    summary["misses"] = sum(s["total_misses"] for s in ok)
    summary["closed_conns"] = sum(s["closed_conns"] for s in ok)
    return summary


def _valid(summary: dict | None) -> bool:
    return bool(summary) and not (summary["errors"] or summary["misses"]
                                  or summary["closed_conns"] or summary["failed"])


def added_p50(samples: dict[str, list[dict]], system: str) -> float | None:
    """Median over rounds of the system's p50 minus direct memcached's, same round."""
    direct = {s["round"]: s["latency_us"]["p50"] for s in measured(samples.get("direct", []))}
    return _median([s["latency_us"]["p50"] - direct[s["round"]]
                    for s in measured(samples.get(system, [])) if s["round"] in direct])


def _ratios(samples: dict[str, list[dict]], a: str, b: str) -> dict:
    """Per figure, the median over rounds of system ``a``'s over ``b``'s in
    the same round: the systems of a round run one after the other, so a
    slow spell of a shared machine weighs on both sides of each ratio."""
    other = {s["round"]: s for s in measured(samples.get(b, []))}
    pairs = [(s, other[s["round"]]) for s in measured(samples.get(a, []))
             if s["round"] in other]
    return {name: _median([_ratio(FIGURES[name](x), FIGURES[name](y)) for x, y in pairs])
            for name in RATIO_FIGURES}


def _judge(target: dict, medians: dict) -> dict:
    """``target`` with its verdict: INVALID if either side had errors,
    misses, closed connections or failed samples, whatever the value."""
    if target["value"] is None:
        target["verdict"] = "n/a"
    elif not (_valid(medians[target["system"]]) and _valid(medians[target["peer"]])):
        target["verdict"] = "INVALID"
    else:
        target["verdict"] = "PASS" if target["value"] <= target["limit"] else "FAIL"
    return target


def analyse(workload: str, samples: dict[str, list[dict]]) -> dict:
    """Medians per system, ratios (medians of the rounds' ratios) and the
    target verdicts, for the systems in ``samples`` (those of the run).

    ``ratios[system][peer]`` is an mcproxy system's over a peer's,
    ``workers`` mcproxy-2w/mcproxy, ``targets`` the verdicts of
    CPU_TARGETS and LATENCY_TARGETS that apply to this workload.
    """
    medians = {name: summarize(samples.get(name, [])) for name in SYSTEMS}
    result = {"median": medians,
              "ratios": {system: {peer: _ratios(samples, system, peer)
                                  for peer in PEERS if peer in samples}
                         for system in MCPROXIES if system in samples},
              "targets": []}
    if {WORKERS_SYSTEM, "mcproxy"} <= set(samples):
        result["workers"] = _ratios(samples, WORKERS_SYSTEM, "mcproxy")
    for (system, peer), limits in CPU_TARGETS.items():
        if workload in limits and {system, peer} <= set(samples):
            result["targets"].append(_judge(
                {"system": system, "peer": peer, "figure": "proxy_cpu_us ratio",
                 "limit": limits[workload],
                 "value": result["ratios"][system][peer]["proxy_cpu_us"]}, medians))
    if workload == LATENCY_WORKLOAD:
        added = {name: added_p50(samples, name) for name in PROXIES if name in samples}
        result["added_p50_us"] = added
        for (system, peer), limit in LATENCY_TARGETS.items():
            if {system, peer} <= set(added):
                # A peer that adds nothing measurable (noise can make it
                # negative) leaves no ratio to judge by.
                base = added[peer]
                result["targets"].append(_judge(
                    {"system": system, "peer": peer, "figure": "added p50 ratio",
                     "limit": limit,
                     "value": _ratio(added[system], base) if base and base > 0 else None},
                    medians))
    return result


# -- text ---------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _in_run(report: dict, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in report["systems"]]


def _failure(report: dict, wl: dict, system: str) -> str:
    """Why a system has no figures for a workload."""
    failed = [s for s in wl["samples"].get(system, []) if "failed" in s]
    if failed:
        return f"{len(failed)} failed sample(s): {failed[-1]['failed']}"
    return report["systems"][system].get("error") or "no samples"


def _ratio_lines(report: dict, wl: dict, width: int) -> list[str]:
    """Each mcproxy system's ratios to each peer (median of the rounds')."""
    peers = _in_run(report, PEERS)
    systems = [s for s in _in_run(report, MCPROXIES) if s in wl["ratios"]]
    if not peers or not systems:
        return []
    group = 4 * 7
    lines = ["  " + f"{'ratios':<{width}}" + "".join(f"  {'/ ' + p:<{group}}"
                                                     for p in peers).rstrip(),
             "  " + " " * width + "".join(
                 "  " + "".join(f"{f:>7}" for f in ("req/s", "p50", "p99", "cpu"))
                 for _ in peers)]
    for system in systems:
        lines.append("  " + f"{system:<{width}}" + "".join(
            "  " + "".join(f"{_fmt(wl['ratios'][system][p][f], '.2f'):>7}"
                           for f in RATIO_FIGURES) for p in peers))
    return lines


def format_table(report: dict) -> str:
    lines = []
    settings = report["settings"]
    width = max(11, *(len(s) + 2 for s in _in_run(report, SYSTEMS)))
    lines.append(
        f"{settings['rounds']} round(s) x {settings['duration_s']} s per workload and "
        f"system, medians (ratios: the median of each round's); proxy/memcached "
        f"CPU = user+sys us per request, 'of it user' the proxy's user-mode part "
        f"({report['machine']['cpus']} CPUs; mcproxy on {report['machine']['python']}, "
        f"framing {report['machine'].get('mcproxy_framing', 'unknown')}; "
        f"memcached-proxy: {report['machine'].get('memcached_proxy', 'unknown')})")
    header = (f"  {'system':<{width}}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}{'p99.9 us':>10}"
              f"{'proxy cpu':>11}{'of it user':>11}{'mc cpu':>9}  errors")
    for name, wl in report["workloads"].items():
        lines += ["", f"({name}) {wl['title']}", header]
        for system in _in_run(report, SYSTEMS):
            m = wl["median"][system]
            if m is None:
                lines.append(f"  {system:<{width}}missing: {_failure(report, wl, system)[:150]}")
                continue
            bad = "" if _valid(m) else "  <- INVALID"
            failed = f" {m['failed']}f" if m["failed"] else ""
            lines.append(
                f"  {system:<{width}}{_fmt(m['throughput'], ',.0f'):>10}{_fmt(m['p50_us']):>10}"
                f"{_fmt(m['p99_us']):>10}{_fmt(m['p999_us']):>10}"
                f"{_fmt(m['proxy_cpu_us'], '.2f'):>11}{_fmt(m['proxy_user_us'], '.2f'):>11}"
                f"{_fmt(m['memcached_cpu_us'], '.2f'):>9}"
                f"  {m['errors']}e/{m['misses']}m{failed}{bad}")
        lines += _ratio_lines(report, wl, width)
        if "added_p50_us" in wl:
            added = wl["added_p50_us"]
            lines.append("  added p50 over direct: " + ", ".join(
                f"{name} {_fmt(added.get(name))} us" for name in _in_run(report, PROXIES)))
    background = [s["background_cpu_pct"] for wl in report["workloads"].values()
                  for runs in wl["samples"].values() for s in measured(runs)]
    if background:
        lines += ["", f"Other processes used {statistics.median(background):.0f}% (median), "
                      f"{max(background):.0f}% (max) of the machine's CPU during runs."]
        if statistics.median(background) > BACKGROUND_WARNING_PCT:
            lines.append("  WARNING: the machine was not quiet; figures are noisy.")
    targets = [(name, t) for name, wl in report["workloads"].items() for t in wl["targets"]]
    if targets:
        lines += ["", "Targets (same run)"]
        for name, t in targets:
            pair = f"{t['system']} / {t['peer']}"
            lines.append(f"  ({name}) {pair:<30} {t['figure']:<20} "
                         f"{_fmt(t['value'], '.2f'):>6} <= {t['limit']:.2f}  {t['verdict']}")
    workers = report.get("workers")
    if workers and {"mcproxy", WORKERS_SYSTEM} <= set(report["systems"]):
        lines += ["", f"Workers ({WORKERS_SYSTEM} / mcproxy, same run; no target above "
                      f"is on {WORKERS_SYSTEM})",
                  f"  workers: CPU/request 2 workers / 1 worker = "
                  f"{_fmt(workers['cpu_ratio'], '.2f')} (flat if <= {workers['limit']:.2f})"
                  f"  {workers['verdict']}"]
        per = workers["per_workload"]
        lines.append("    CPU/request by workload: " + "  ".join(
            f"({name}) {_fmt(r['proxy_cpu_us'], '.2f')}" for name, r in per.items())
            + "  (geometric mean above)")
        lines.append("  throughput 2 workers / 1 worker: " + "  ".join(
            f"({name}) {_fmt(r['throughput'], '.2f')}" for name, r in per.items()))
    if report.get("memory"):
        lines += ["", "Memory (VmRSS, summed over the proxy's processes)",
                  f"  {'system':<{width}}{'idle MiB':>10}{'+idle conns MiB':>17}"
                  f"{'per conn KiB':>14}{'per in-flight req B':>21}"]
        for system, mem in report["memory"].items():
            if "error" in mem:
                lines.append(f"  {system:<{width}}error: {mem['error'][:150]}")
                continue
            idle, inflight = mem.get("idle", {}), mem.get("inflight", {})
            per_conn = idle.get("bytes_per_connection")
            lines.append(
                f"  {system:<{width}}{_fmt(idle.get('rss_before_bytes', 0) / 2**20):>10}"
                f"{_fmt(idle.get('rss_bytes', 0) / 2**20):>17}"
                f"{_fmt(per_conn and per_conn / 1024, '.2f'):>14}"
                f"{_fmt(inflight.get('bytes_per_request'), ',.0f'):>21}")
            for part in (idle, inflight):
                if part.get("note") or part.get("error"):
                    lines.append(f"  {'':<{width}}note: {part.get('note') or part.get('error')}")
        lines.append(f"  ({report['settings']['idle_conns']} idle connections; "
                     f"{report['settings']['inflight_requests']} gets held in flight)")
    return "\n".join(lines)


def workers_summary(workloads: dict) -> dict:
    """mcproxy-2w / mcproxy over the workloads: is CPU per request flat?

    ``cpu_ratio`` is the geometric mean of the per-workload ratios of CPU
    per request (see _ratios; each workload weighs the same, whatever its
    scale);
    ``per_workload`` has those and the throughput ratios. The verdict is
    INVALID if either system had errors or misses in a workload counted.
    """
    per = {name: {"proxy_cpu_us": wl["workers"]["proxy_cpu_us"],
                  "throughput": wl["workers"]["throughput"]}
           for name, wl in workloads.items() if "workers" in wl}
    cpu = [r["proxy_cpu_us"] for r in per.values() if r["proxy_cpu_us"]]
    ratio = math.exp(statistics.fmean(math.log(r) for r in cpu)) if cpu else None
    if ratio is None:
        verdict = "n/a"
    elif not all(_valid(workloads[name]["median"][s]) for name, r in per.items()
                 if r["proxy_cpu_us"] for s in ("mcproxy", WORKERS_SYSTEM)):
        verdict = "INVALID"
    else:
        verdict = "FLAT" if ratio <= WORKERS_CPU_FLAT else "NOT FLAT"
    return {"system": WORKERS_SYSTEM, "cpu_ratio": ratio, "limit": WORKERS_CPU_FLAT,
            "verdict": verdict, "workloads_in_ratio": len(cpu), "per_workload": per}


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def _rst_cell(value: float | None, spec: str) -> str:
    return "\\-" if value is None else format(value, spec)


def format_rst(report: dict) -> str:
    """The medians as the reStructuredText table of README "Performance": a
    row per workload and system, proxy CPU per request with each mcproxy
    system's ratio to each peer beside it ("\\-": nothing to show)."""
    peers = _in_run(report, PEERS)
    header = ["workload", "system", "requests/s", "p50 µs", "p99 µs", "proxy CPU µs/request",
              *(f"/ {peer}" for peer in peers), "of it user"]
    rows = []
    for name, wl in report["workloads"].items():
        for system in _in_run(report, SYSTEMS):
            m = wl["median"][system]
            ratios = wl["ratios"].get(system, {})
            if m is None:
                figures = ["\\-"] * (5 + len(peers))
            else:
                figures = [_rst_cell(m["throughput"], ",.0f"), _rst_cell(m["p50_us"], ",.0f"),
                           _rst_cell(m["p99_us"], ",.0f"), _rst_cell(m["proxy_cpu_us"], ".1f"),
                           *(_rst_cell(ratios.get(peer, {}).get("proxy_cpu_us"), ".2f")
                             for peer in peers),
                           _rst_cell(m["proxy_user_us"], ".1f")]
            rows.append([f"({name})", system, *figures])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(row: list[str]) -> str:
        return "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule]) + "\n"


# -- chart --------------------------------------------------------------------


def _bars(ax, report: dict, systems: list[str], value) -> bool:
    """One group of bars per workload, one bar per system; ``value(system,
    workload)`` is a bar's height (None: no bar). True if any bar is drawn."""
    workloads = list(report["workloads"])
    bar = 0.8 / max(1, len(systems))
    drawn = False
    for i, system in enumerate(systems):
        values = [value(system, w) for w in workloads]
        drawn = drawn or any(v is not None and v > 0 for v in values)
        ax.bar([x + i * bar for x in range(len(workloads))],
               [math.nan if v is None else v for v in values], bar,
               label=system, color=COLORS[system])
    ax.set_xticks([x + bar * (len(systems) - 1) / 2 for x in range(len(workloads))])
    ax.set_xticklabels([f"({w})" for w in workloads])
    return drawn


def write_chart(report: dict, path: Path) -> bool:
    """Bar charts of the medians and of the mcproxy systems' CPU ratios to
    each peer; False if matplotlib is not available."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    wls = report["workloads"]
    systems, proxies = _in_run(report, SYSTEMS), _in_run(report, PROXIES)
    mcproxies = _in_run(report, MCPROXIES)

    def median(figure: str):
        return lambda system, w: (wls[w]["median"][system] or {}).get(figure)

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    for ax, (figure, label) in zip(axes[0], (("throughput", "requests/s"),
                                             ("p50_us", "p50 latency (us)"),
                                             ("p99_us", "p99 latency (us)")), strict=True):
        drawn = _bars(ax, report, systems, median(figure))
        ax.set_ylabel(label)
        if figure != "throughput" and drawn:  # log scale needs a positive value
            ax.set_yscale("log")
        ax.legend(fontsize="x-small")
    ax = axes[1][0]
    drawn = _bars(ax, report, proxies, median("proxy_cpu_us"))
    # The user-mode part of each bar, hatched over it.
    bar = 0.8 / max(1, len(proxies))
    for i, system in enumerate(proxies):
        user = [median("proxy_user_us")(system, w) for w in wls]
        ax.bar([x + i * bar for x in range(len(wls))],
               [math.nan if v is None else v for v in user], bar, fill=False, hatch="///",
               linewidth=0, label="of it user mode" if i == 0 else None)
    ax.set_ylabel("proxy CPU per request (us)")
    if drawn:
        ax.set_yscale("log")
    ax.legend(fontsize="x-small")
    for ax, peer in zip(axes[1][1:], PEERS, strict=True):
        ax.set_ylabel(f"proxy CPU per request / {peer}'s")
        if peer not in report["systems"] or not mcproxies:
            ax.text(0.5, 0.5, f"no {peer} in this run", ha="center", transform=ax.transAxes)
            continue
        _bars(ax, report, mcproxies, lambda system, w, peer=peer: (
            wls[w]["ratios"].get(system, {}).get(peer, {}).get("proxy_cpu_us")))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.legend(fontsize="x-small")
    fig.suptitle("memcached direct, nutcracker, memcached's proxy and mcproxy (direct, Lua "
                 "and route-library routes; --workers=2): medians over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
