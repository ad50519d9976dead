"""bench/report.py: ratios to both peers, failed samples, targets and tables."""

from __future__ import annotations

import pytest

from tests.benchkit import report, run, systems


def sample(round_no: int, cpu: float | None, p50: float = 100.0, **extra) -> dict:
    """A load-generator sample as run.measure records it."""
    return {"round": round_no, "throughput": 1000.0 / (cpu or 1.0),
            "latency_us": {"p50": p50, "p99": 2 * p50, "p999": 3 * p50},
            "proxy_cpu_us": cpu, "proxy_user_us": cpu and cpu / 2,
            "memcached_cpu_us": 5.0, "loadgen_cpu_us": 4.0, "background_cpu_pct": 1.0,
            "total_requests": 1000, "total_errors": 0, "total_misses": 0,
            "closed_conns": 0, **extra}


def run_of(workload: str = "a", **cpus: list) -> dict:
    """Samples per system from CPU figures per round (None: a failed sample)."""
    return {name.replace("_", "-"): [
        sample(i, cpu) if cpu is not False else {"round": i, "failed": "stalled"}
        for i, cpu in enumerate(values, 1)] for name, values in cpus.items()}


def test_every_mcproxy_system_has_ratios_to_both_peers():
    samples = run_of(direct=[None, None], nutcracker=[10, 20], memcached_proxy=[5, 10],
                     mcproxy=[12, 30], mcproxy_lua=[20, 40], mcproxy_lib=[30, 60],
                     mcproxy_2w=[13, 26])
    result = report.analyse("a", samples)
    cpu = {system: {peer: r["proxy_cpu_us"] for peer, r in peers.items()}
           for system, peers in result["ratios"].items()}
    # Medians of the rounds' ratios: (1.2, 1.5) -> 1.35; (2.4, 3.0) -> 2.7.
    assert cpu["mcproxy"] == {"nutcracker": pytest.approx(1.35),
                              "memcached-proxy": pytest.approx(2.7)}
    assert cpu["mcproxy-lua"] == {"nutcracker": 2.0, "memcached-proxy": 4.0}
    assert cpu["mcproxy-lib"] == {"nutcracker": 3.0, "memcached-proxy": 6.0}
    assert cpu["mcproxy-2w"]["nutcracker"] == pytest.approx(1.3)
    assert result["workers"]["proxy_cpu_us"] == pytest.approx((13 / 12 + 26 / 30) / 2)


def test_targets_judge_direct_against_nutcracker_and_lua_routes_against_memcached_proxy():
    samples = run_of(nutcracker=[10], memcached_proxy=[10], mcproxy=[12],
                     mcproxy_lua=[14], mcproxy_lib=[16])
    verdicts = {(t["system"], t["peer"]): (t["limit"], t["verdict"])
                for t in report.analyse("a", samples)["targets"]}
    assert verdicts == {("mcproxy", "nutcracker"): (1.3, "PASS"),
                        ("mcproxy-lua", "memcached-proxy"): (1.5, "PASS"),
                        ("mcproxy-lib", "memcached-proxy"): (1.5, "FAIL")}
    # A run without memcached's proxy has no target on it.
    del samples["memcached-proxy"]
    assert [(t["system"], t["peer"]) for t in report.analyse("c", samples)["targets"]] == [
        ("mcproxy", "nutcracker")]


def test_a_failed_sample_is_left_out_of_the_figures_and_invalidates_the_verdict():
    samples = run_of(nutcracker=[10, 10, 10], memcached_proxy=[10, False, 10],
                     mcproxy_lua=[12, 30, 14])
    result = report.analyse("b", samples)
    median = result["median"]["memcached-proxy"]
    assert (median["rounds"], median["failed"], median["proxy_cpu_us"]) == (2, 1, 10)
    # The ratio pairs only rounds both systems measured.
    lua = result["ratios"]["mcproxy-lua"]
    assert lua["memcached-proxy"]["proxy_cpu_us"] == pytest.approx(1.3)
    assert lua["nutcracker"]["proxy_cpu_us"] == pytest.approx(1.4)
    (target,) = result["targets"]
    assert (target["value"], target["verdict"]) == (pytest.approx(1.3), "INVALID")


def test_added_latency_covers_every_proxy_in_the_run():
    samples = {"direct": [sample(1, None, p50=20)],
               "nutcracker": [sample(1, 20, p50=40)],
               "memcached-proxy": [sample(1, 20, p50=45)],
               "mcproxy": [sample(1, 40, p50=44)]}
    result = report.analyse("d", samples)
    assert result["added_p50_us"] == {"nutcracker": 20, "memcached-proxy": 25, "mcproxy": 24}
    (target,) = result["targets"]
    assert (target["figure"], target["value"], target["verdict"]) == (
        "added p50 ratio", 1.2, "PASS")


def full_report(samples: dict, errors: dict | None = None) -> dict:
    return {
        "machine": {"cpus": 2, "python": "python3", "memcached_proxy": "memcached 1.6.45"},
        "settings": {"rounds": 1, "duration_s": 1.0, "idle_conns": 0, "inflight_requests": 0},
        "systems": {name: {"error": (errors or {}).get(name)} for name in samples},
        "workloads": {"a": {"title": "load", **report.analyse("a", samples),
                            "samples": samples}},
        "memory": {},
    }


def test_the_table_shows_both_peers_ratios_and_why_a_system_is_missing():
    samples = run_of(direct=[None], nutcracker=[10], memcached_proxy=[False],
                     mcproxy=[12], mcproxy_lib=[25])
    text = report.format_table(full_report(samples))
    lines = text.splitlines()
    assert "memcached-proxy  missing: 1 failed sample(s): stalled" in text
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ratios"))
    assert lines[header].split() == ["ratios", "/", "nutcracker", "/", "memcached-proxy"]
    assert lines[header + 2].split() == ["mcproxy", "0.83", "1.00", "1.00", "1.20",
                                         "-", "-", "-", "-"]
    assert lines[header + 3].split()[0] == "mcproxy-lib"
    assert "(a) mcproxy-lib / memcached-proxy" in text
    assert "n/a" in text


def test_the_rst_table_has_a_ratio_column_per_peer():
    samples = run_of(direct=[None], nutcracker=[10], memcached_proxy=[8],
                     mcproxy=[12], mcproxy_lua=[20])
    rows = report.format_rst(full_report(samples)).splitlines()
    assert rows[0] == rows[2] == rows[-1] and set(rows[0]) == {"=", " "}
    assert rows[1].split("  ")[-3:] == ["/ nutcracker", "/ memcached-proxy", "of it user"]
    cells = {row.split()[1]: row.split()[5:] for row in rows[3:-1]}
    assert cells["direct"] == ["\\-", "\\-", "\\-", "\\-"]
    assert cells["memcached-proxy"] == ["8.0", "\\-", "\\-", "4.0"]
    assert cells["mcproxy-lua"] == ["20.0", "2.00", "2.50", "10.0"]


def test_every_system_started_by_the_harness_is_reported():
    assert set(systems.MCPROXY_SYSTEMS) == set(report.MCPROXIES)
    assert set(report.SYSTEMS) == {"direct", *report.PEERS, *report.MCPROXIES}
    assert set(report.COLORS) == set(report.SYSTEMS)
    for route, _workers in systems.MCPROXY_SYSTEMS.values():
        assert (systems.BENCH_DIR / route).is_file()
    args = run.parse_args([])
    assert args.systems == list(report.SYSTEMS)
