"""bench/systems.py starts every system of the benchmark, forwarding.

Each of the systems added for issue #19 (memcached's own proxy, mcproxy on
a Lua route and on a route-library route) starts from its route config in
bench/ and forwards gets, multigets and sets to the benchmark's memcached;
a system that stops answering fails its sample in bounded time.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time

import pytest

from tests.benchkit import run, systems


@pytest.fixture
def cluster(tmp_path):
    """The benchmark's memcached, with mcproxy on this interpreter."""
    with systems.Cluster(tmp_path, tmp_path, python=sys.executable) as cluster:
        cluster.start_memcached()
        yield cluster


def assert_forwards(system: systems.System, backend: systems.System) -> None:
    """A get, a set and a multiget with a miss reach memcached and come back."""
    assert system.available, system.error
    systems.check_forwarding(system.port, backend.port)
    systems.mc_set(backend.port, "bench:multi:1", b"one")
    systems.mc_set(backend.port, "bench:multi:2", b"two")
    reply = systems.mc_exchange(system.port, b"get bench:multi:1 bench:none bench:multi:2\r\n",
                                b"END\r\n")
    assert reply == (b"VALUE bench:multi:1 0 3\r\none\r\n"
                     b"VALUE bench:multi:2 0 3\r\ntwo\r\nEND\r\n")


@pytest.mark.parametrize("name", ["mcproxy-lua", "mcproxy-lib", "mcproxy-routelib"])
def test_mcproxy_on_a_lua_route_and_a_library_route_forwards(cluster, name):
    system = cluster.start_mcproxy(name)
    assert_forwards(system, cluster.memcached)


@pytest.mark.skipif(not systems.MEMCACHED_PROXY.exists(),
                    reason=f"no {systems.MEMCACHED_PROXY}")
def test_memcached_proxy_on_its_routelib_config_forwards(cluster):
    system = cluster.start_memcached_proxy(max_conns=2048)
    assert_forwards(system, cluster.memcached)
    argv = system.process.args
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-c") + 1] == "2048"


def test_memcached_proxy_without_its_binary_is_skipped(cluster, tmp_path):
    started = len(cluster.processes)
    system = cluster.start_memcached_proxy(tmp_path / "absent")
    assert system.error == f"skipped: no executable {tmp_path / 'absent'}"
    assert len(cluster.processes) == started


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build bench/loadgen.c")
def test_a_stuck_system_fails_its_sample_in_bounded_time(cluster):
    """A port that accepts connections and never answers: the sample fails
    once the load generator's drain time is over, and the recheck marks the
    system out within its own time limit."""
    with socket.create_server((systems.HOST, 0), backlog=64) as stuck:
        system = systems.System("stuck", stuck.getsockname()[1])
        args = argparse.Namespace(keys=100, duration=0.3, warmup=0.0)
        started = time.monotonic()
        with pytest.raises(systems.SampleFailed, match="no request was answered"):
            run.measure(system, run.WORKLOADS["d"], cluster.memcached, run.build_loadgen(),
                        args, 1)
        assert time.monotonic() - started < args.duration + run.DRAIN_TIMEOUT + 3
        started = time.monotonic()
        cluster.recheck(system, 1.0)
        assert time.monotonic() - started < 4
    assert system.error.startswith("after a failed sample: not ready after 1 s")
