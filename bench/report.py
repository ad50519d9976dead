"""Medians, ratios, targets, and the table, JSON and chart made from them."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SYSTEMS = ("direct", "nutcracker", "mcproxy", "mcproxy-2w")
PROXIES = ("nutcracker", "mcproxy", "mcproxy-2w")
#: mcproxy --workers=2, compared with one mcproxy process (the workers claim:
#: throughput scales with cores, CPU per request stays flat).
WORKERS_SYSTEM = "mcproxy-2w"
#: Most mcproxy-2w / mcproxy CPU per request still called flat.
WORKERS_CPU_FLAT = 1.15
#: Figures compared as ratios with nutcracker's.
RATIO_FIGURES = ("throughput", "p50_us", "p99_us", "proxy_cpu_us")

#: Target for mcproxy / nutcracker proxy CPU per request, by workload.
CPU_TARGETS = {"a": 1.3, "b": 1.0, "c": 1.0}
#: Target for workload (d): mcproxy's added p50 over direct memcached, as a
#: multiple of nutcracker's.
LATENCY_WORKLOAD = "d"
LATENCY_TARGET = 1.2

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
COLORS = {"direct": "tab:blue", "nutcracker": "tab:orange", "mcproxy": "tab:green",
          "mcproxy-2w": "tab:olive"}
#: Median share of the machine's CPU used by other processes above which the
#: figures are flagged as noisy.
BACKGROUND_WARNING_PCT = 10


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(samples: list[dict]) -> dict | None:
    """Medians over rounds, and error/miss totals (which should be zero)."""
    if not samples:
        return None
    summary = {name: _median([get(s) for s in samples]) for name, get in FIGURES.items()}
    summary["rounds"] = len(samples)
    summary["requests"] = sum(s["total_requests"] for s in samples)
    summary["errors"] = sum(s["total_errors"] for s in samples)
    summary["misses"] = sum(s["total_misses"] for s in samples)
    summary["closed_conns"] = sum(s["closed_conns"] for s in samples)
    return summary


def _valid(summary: dict | None) -> bool:
    return bool(summary) and not (summary["errors"] or summary["misses"]
                                  or summary["closed_conns"])


def added_p50(samples: dict[str, list[dict]], system: str) -> float | None:
    """Median over rounds of the system's p50 minus direct memcached's, same round."""
    direct = {s["round"]: s["latency_us"]["p50"] for s in samples.get("direct", [])}
    return _median([s["latency_us"]["p50"] - direct[s["round"]]
                    for s in samples.get(system, []) if s["round"] in direct])


def _ratios(samples: dict[str, list[dict]], a: str, b: str) -> dict:
    """Per figure, the median over rounds of system ``a``'s over ``b``'s in
    the same round: the systems of a round run one after the other, so a
    slow spell of a shared machine weighs on both sides of each ratio."""
    other = {s["round"]: s for s in samples.get(b, [])}
    pairs = [(s, other[s["round"]]) for s in samples.get(a, []) if s["round"] in other]
    return {name: _median([_ratio(FIGURES[name](x), FIGURES[name](y)) for x, y in pairs])
            for name in RATIO_FIGURES}


def analyse(workload: str, samples: dict[str, list[dict]]) -> dict:
    """Medians per system, ratios (medians of the rounds' ratios) and the
    target verdict.

    ``ratios`` is mcproxy/nutcracker (the targets are on it), ``ratios_2w``
    mcproxy-2w/nutcracker and ``workers`` mcproxy-2w/mcproxy.
    """
    medians = {name: summarize(samples.get(name, [])) for name in SYSTEMS}
    mc, nc = medians["mcproxy"], medians["nutcracker"]
    result = {"median": medians, "ratios": _ratios(samples, "mcproxy", "nutcracker"),
              "ratios_2w": _ratios(samples, WORKERS_SYSTEM, "nutcracker"),
              "workers": _ratios(samples, WORKERS_SYSTEM, "mcproxy")}
    ratios = result["ratios"]
    if workload in CPU_TARGETS:
        target = {"figure": "proxy_cpu_us ratio", "limit": CPU_TARGETS[workload],
                  "value": ratios["proxy_cpu_us"]}
    elif workload == LATENCY_WORKLOAD:
        added = {name: added_p50(samples, name) for name in PROXIES}
        result["added_p50_us"] = added
        # A peer that adds nothing measurable (noise can make it negative)
        # leaves no ratio to judge by.
        peer = added["nutcracker"]
        target = {"figure": "added p50 ratio", "limit": LATENCY_TARGET,
                  "value": _ratio(added["mcproxy"], peer) if peer and peer > 0 else None}
    else:
        return result
    if target["value"] is None:
        target["verdict"] = "n/a"
    elif not (_valid(mc) and _valid(nc)):
        target["verdict"] = "INVALID"
    else:
        target["verdict"] = "PASS" if target["value"] <= target["limit"] else "FAIL"
    result["target"] = target
    return result


# -- text ---------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    lines = []
    settings = report["settings"]
    width = max(11, *(len(s) + 2 for s in SYSTEMS))
    lines.append(
        f"{settings['rounds']} round(s) x {settings['duration_s']} s per workload and "
        f"system, medians (ratios: the median of each round's); proxy/memcached "
        f"CPU = user+sys us per request, 'of it user' the proxy's user-mode part "
        f"({report['machine']['cpus']} CPUs; mcproxy on {report['machine']['python']})")
    header = (f"  {'system':<{width}}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}{'p99.9 us':>10}"
              f"{'proxy cpu':>11}{'of it user':>11}{'mc cpu':>9}  errors")
    for name, wl in report["workloads"].items():
        lines += ["", f"({name}) {wl['title']}", header]
        for system in SYSTEMS:
            if system not in report["systems"]:
                continue
            m = wl["median"][system]
            if m is None:
                error = report["systems"][system].get("error") or "no samples"
                lines.append(f"  {system:<{width}}missing: {error[:150]}")
                continue
            bad = "" if _valid(m) else "  <- INVALID"
            lines.append(
                f"  {system:<{width}}{_fmt(m['throughput'], ',.0f'):>10}{_fmt(m['p50_us']):>10}"
                f"{_fmt(m['p99_us']):>10}{_fmt(m['p999_us']):>10}"
                f"{_fmt(m['proxy_cpu_us'], '.2f'):>11}{_fmt(m['proxy_user_us'], '.2f'):>11}"
                f"{_fmt(m['memcached_cpu_us'], '.2f'):>9}"
                f"  {m['errors']}e/{m['misses']}m{bad}")
        for label, key, system in (("mcproxy/nutcracker", "ratios", "mcproxy"),
                                   (f"{WORKERS_SYSTEM}/nutcracker", "ratios_2w",
                                    WORKERS_SYSTEM)):
            if system not in report["systems"] or key not in wl:
                continue
            r = wl[key]
            lines.append(
                f"  {label}: req/s {_fmt(r['throughput'], '.2f')}, "
                f"p50 {_fmt(r['p50_us'], '.2f')}, p99 {_fmt(r['p99_us'], '.2f')}, "
                f"proxy cpu {_fmt(r['proxy_cpu_us'], '.2f')}")
        if "added_p50_us" in wl:
            added = wl["added_p50_us"]
            lines.append("  added p50 over direct: " + ", ".join(
                f"{name} {_fmt(added.get(name))} us" for name in PROXIES
                if name in report["systems"]))
    background = [s["background_cpu_pct"] for wl in report["workloads"].values()
                  for runs in wl["samples"].values() for s in runs]
    if background:
        lines += ["", f"Other processes used {statistics.median(background):.0f}% (median), "
                      f"{max(background):.0f}% (max) of the machine's CPU during runs."]
        if statistics.median(background) > BACKGROUND_WARNING_PCT:
            lines.append("  WARNING: the machine was not quiet; figures are noisy.")
    lines += ["", "Targets (mcproxy / nutcracker, same run)"]
    for name, wl in report["workloads"].items():
        t = wl.get("target")
        if t:
            lines.append(f"  ({name}) {t['figure']:<20} {_fmt(t['value'], '.2f'):>6} "
                         f"<= {t['limit']:.2f}  {t['verdict']}")
    workers = report.get("workers")
    if workers and {"mcproxy", WORKERS_SYSTEM} <= set(report["systems"]):
        lines += ["", f"Workers ({WORKERS_SYSTEM} / mcproxy, same run; the targets above "
                      "are for mcproxy alone)",
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


# -- chart --------------------------------------------------------------------


def write_chart(report: dict, path: Path) -> bool:
    """Bar charts of the medians; False if matplotlib is not available."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(report["workloads"])
    panels = [("throughput", "requests/s", SYSTEMS), ("p50_us", "p50 latency (us)", SYSTEMS),
              ("p99_us", "p99 latency (us)", SYSTEMS),
              ("proxy_cpu_us", "proxy CPU per request (us)", PROXIES)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    bar = 0.8 / len(SYSTEMS)
    for ax, (figure, label, systems) in zip(axes.flat, panels, strict=True):
        plotted = False
        for i, system in enumerate(systems):
            medians = [report["workloads"][name]["median"][system] or {}
                       for name in workloads]
            values = [m.get(figure) or math.nan for m in medians]
            plotted = plotted or any(v > 0 for v in values)  # NaN > 0 is False
            xs = [x + i * bar for x in range(len(workloads))]
            ax.bar(xs, values, bar, label=system, color=COLORS[system])
            if figure == "proxy_cpu_us":
                # The user-mode part of each bar, hatched over it.
                ax.bar(xs, [m.get("proxy_user_us") or math.nan for m in medians], bar,
                       fill=False, hatch="///", linewidth=0,
                       label="of it user mode" if i == 0 else None)
        ax.set_xticks([x + bar * (len(systems) - 1) / 2 for x in range(len(workloads))])
        ax.set_xticklabels([f"({w})" for w in workloads])
        ax.set_ylabel(label)
        if figure != "throughput" and plotted:  # log scale needs a positive value
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle("memcached direct vs nutcracker vs mcproxy, 1 process and --workers=2 "
                 "(medians over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
