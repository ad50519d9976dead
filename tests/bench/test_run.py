"""bench/run.py's rounds: a failed sample is kept, bounded, and never waited on."""

from __future__ import annotations

import argparse

from tests.benchkit import run, systems

from .test_report import sample


class FakeCluster:
    """What run_rounds needs of a Cluster: memcached, and recheck (a system
    named in ``dead`` does not forward any more)."""

    def __init__(self, dead: set[str] = frozenset()) -> None:
        self.memcached = systems.System("memcached", 1)
        self.dead = dead
        self.rechecked: list[tuple[str, float]] = []

    def recheck(self, system: systems.System, timeout: float) -> None:
        self.rechecked.append((system.name, timeout))
        if system.name in self.dead:
            system.error = "after a failed sample: not ready"


def rounds(monkeypatch, outcomes: dict[str, list], cluster: FakeCluster,
           count: int = 3) -> tuple[dict, list[systems.System]]:
    """run_rounds over one workload, ``outcomes[system]`` being what each of
    its measurements does in turn: a CPU figure, or an exception to raise."""
    left = {name: list(values) for name, values in outcomes.items()}

    def measure(system, workload, memcached, loadgen, args, round_no):
        outcome = left[system.name].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return sample(round_no, outcome)

    monkeypatch.setattr(run, "measure", measure)
    args = argparse.Namespace(rounds=count, workloads=[run.WORKLOADS["a"]])
    systems_ = [systems.System(name, 1) for name in outcomes]
    return run.run_rounds(systems_, cluster, None, args)["a"], systems_


def test_a_failed_sample_is_kept_and_the_system_stays_if_it_still_forwards(monkeypatch):
    cluster = FakeCluster()
    samples, (peer, other) = rounds(monkeypatch, {
        "memcached-proxy": [5.0, run.SampleFailed("the load generator did not finish"), 6.0],
        "nutcracker": [9.0, 9.0, 9.0]}, cluster)
    assert samples["memcached-proxy"][1] == {"round": 2,
                                             "failed": "the load generator did not finish"}
    assert [s["proxy_cpu_us"] for s in samples["memcached-proxy"] if "failed" not in s] == [
        5.0, 6.0]
    assert cluster.rechecked == [("memcached-proxy", run.RECHECK_TIMEOUT)]
    assert peer.available and other.available
    assert len(samples["nutcracker"]) == 3


def test_a_system_that_no_longer_forwards_after_a_failed_sample_is_out(monkeypatch):
    samples, (system,) = rounds(monkeypatch, {
        "memcached-proxy": [run.SampleFailed("no request was answered")]},
        FakeCluster(dead={"memcached-proxy"}))
    assert samples["memcached-proxy"] == [{"round": 1, "failed": "no request was answered"}]
    assert system.error == "after a failed sample: not ready"


def test_failed_samples_are_bounded_in_number(monkeypatch):
    failed = run.SampleFailed("no request was answered")
    cluster = FakeCluster()
    samples, (system,) = rounds(monkeypatch, {"mcproxy-lua": [failed] * 3}, cluster)
    assert len(samples["mcproxy-lua"]) == run.MAX_FAILED_SAMPLES == 2
    assert len(cluster.rechecked) == run.MAX_FAILED_SAMPLES - 1
    assert system.error == "(a) round 2: 2 failed samples: no request was answered"


def test_a_system_that_exits_is_out_at_once(monkeypatch):
    cluster = FakeCluster()
    samples, (system,) = rounds(monkeypatch, {
        "mcproxy": [run.SystemUnavailable("exited with status 1 during a run")]}, cluster)
    assert samples["mcproxy"] == [] and cluster.rechecked == []
    assert system.error == "(a) round 1: exited with status 1 during a run"
