"""``--workers=N``: a supervisor process and N worker processes on one port.

Options and the ``stats workers`` reply are tested in process; the rest
runs ``twistd -n mcproxy --workers=2`` with real memcached servers behind it:
connections spread over both workers, SIGHUP reloads both, a worker killed
with SIGKILL is restarted, SIGTERM stops everything, a broken config stops
startup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python import usage

from mcproxy.service import ProxyService
from mcproxy.tap import Options
from mcproxy.workers import WorkerSupervisor, parse_stats, worker_arguments

from .servers import Proxy, read_until

ROUTE = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b", "127.0.0.1", "%d") })
end

function mcp_config_routes(main)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return main(r) end)
end
"""

#: Client connections opened at once in the spreading tests.
CLIENTS = 24


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def children(pid: int) -> set[int]:
    """The live child processes of pid."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(child) for child in text.split()
            if "\nState:\tZ" not in _status(int(child))}


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "\nState:\tZ"


def gone(pid: int) -> bool:
    return "\nState:\tZ" in _status(pid)


def stats(proxy: Proxy, *args: bytes) -> dict[str, str]:
    reply = proxy.call(b" ".join([b"stats", *args]) + b"\r\n", b"END\r\n")
    return dict(parse_stats(reply))


def serve_many(proxy: Proxy, prefix: str) -> set[str]:
    """Open CLIENTS connections at once; on each set and get a key of its
    own and ask ``stats``. Every answer must be right; the worker ids seen."""
    socks = [proxy.connect() for _ in range(CLIENTS)]
    ids = set()
    try:
        for i, s in enumerate(socks):
            key = f"{prefix}/{i}".encode()
            s.sendall(b"set %s 0 0 2\r\nv%d\r\n" % (key, i % 10))
            assert read_until(s, b"\r\n") == b"STORED\r\n"
        for i, s in enumerate(socks):
            key = f"{prefix}/{i}".encode()
            s.sendall(b"get %s\r\n" % key)
            assert read_until(s, b"END\r\n") == b"VALUE %s 0 2\r\nv%d\r\nEND\r\n" % (key, i % 10)
            s.sendall(b"stats\r\n")
            ids.add(dict(parse_stats(read_until(s, b"END\r\n")))["worker_id"])
    finally:
        for s in socks:
            s.close()
    return ids


@pytest.fixture
def workers(memcached):
    """A started ``twistd -n mcproxy --workers=2`` routing to memcached."""
    proxy = Proxy(None, "--workers=2", config_text=ROUTE % memcached.port).start()
    wait_for(lambda: proxy.log().count("ProxyServerFactory starting") >= 2,
             what="both workers listening")
    yield proxy
    proxy.stop()


# -- in process ------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--workers=0"], "--workers must be 1 or more"),
    (["--workers=2", "--listen=unix:/tmp/mcproxy-workers.sock"], "needs TCP --listen"),
])
def test_usage_errors(args, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_defaults_to_one_process():
    assert parse()["workers"] == 1


def test_workers_get_every_option_but_the_supervisors(tmp_path):
    config = tmp_path / "route.lua"
    config.write_text("")
    options = parse("--workers=3", f"--config={config}", "--memory=8",
                    "--listen=tcp:0", "--idle-timeout=2.5")
    assert worker_arguments(options) == [f"--config={config}", "--memory=8",
                                         "--idle-timeout=2.5"]


def test_stats_workers_adds_up_the_workers():
    service = ProxyService(None, [], reactor=MemoryReactorClock())
    service.worker_id = 1
    service.stats.total_connections = 5
    service.worker_table = {"0": [["pid", "100"], ["total_connections", "7"],
                                  ["rusage_user", "0.5"], ["version", "x"]],
                            "1": [["pid", "stale"], ["total_connections", "1"]]}
    service.worker_restarts = 3
    lines = parse_stats(service.stats_reply([b"workers"]))
    values = dict(lines)
    assert lines[:3] == [["workers", "2"], ["worker_restarts", "3"], ["worker:0:pid", "100"]]
    assert values["worker:1:pid"] == str(os.getpid())  # its own figures are live
    assert values["worker:0:total_connections"] == "7"
    assert values["worker:1:total_connections"] == "5"
    assert values["total_connections"] == "12"
    assert "pid" not in values and "version" not in values
    assert dict(parse_stats(service.stats_reply([])))["worker_id"] == "1"


class UnspawnableReactor(MemoryReactorClock):
    """A reactor on which no process can be started."""

    def __init__(self) -> None:
        super().__init__()
        self.spawns = 0

    def spawnProcess(self, *args, **kwargs):
        self.spawns += 1
        raise PermissionError(13, "Permission denied")


def test_a_worker_that_cannot_be_started_is_retried_with_backoff():
    reactor = UnspawnableReactor()
    supervisor = WorkerSupervisor(2, [], [], reactor=reactor)
    events: list[dict] = []
    supervisor.log = Logger(observer=events.append)
    supervisor.running = True
    supervisor._respawn(1)
    for delay in (1.0, 2.0, 4.0):
        assert formatEvent(events[-1]).endswith(
            f"could not be started PermissionError(13, 'Permission denied'); "
            f"restarting it in {delay:.1f}s")
        reactor.advance(delay)
    assert reactor.spawns == 4
    supervisor._stopping = True
    for call in supervisor._pending.values():
        call.cancel()


def test_one_process_answers_stats_workers_as_worker_0():
    service = ProxyService(None, [], reactor=MemoryReactorClock())
    values = dict(parse_stats(service.stats_reply([b"workers"])))
    assert values["workers"] == "1"
    assert values["worker:0:pid"] == str(os.getpid())
    assert "worker_id" not in dict(parse_stats(service.stats_reply([])))


# -- twistd -n mcproxy --workers=2 ------------------------------------------------------


def test_connections_are_spread_over_the_workers(workers, memcached):
    assert serve_many(workers, "spread") == {"0", "1"}
    assert memcached.get(b"spread/3") == b"v3"
    pids = children(workers.proc.pid)
    assert len(pids) == 2

    def summed():
        values = stats(workers, b"workers")
        if int(values["total_connections"]) >= CLIENTS + 1 and values["workers"] == "2":
            return values
    values = wait_for(summed, what="stats workers to count every connection")
    assert {int(values["worker:0:pid"]), int(values["worker:1:pid"])} == pids
    assert values["worker_restarts"] == "0"


def test_sighup_reloads_every_worker(memcached_factory):
    first, second = memcached_factory(), memcached_factory()
    proxy = Proxy(None, "--workers=2", config_text=ROUTE % first.port).start()
    try:
        wait_for(lambda: proxy.log().count("ProxyServerFactory starting") >= 2,
                 what="both workers listening")
        Path(proxy.config).write_text(ROUTE % second.port)
        os.kill(proxy.proc.pid, signal.SIGHUP)
        wait_for(lambda: proxy.log().count("reloaded route config") == 2,
                 what="both workers to reload")
        assert "[worker-0] reloaded route config" in proxy.log()
        assert "[worker-1] reloaded route config" in proxy.log()
        assert serve_many(proxy, "moved") == {"0", "1"}
        assert all(second.get(b"moved/%d" % i) is not None for i in range(CLIENTS))
        assert first.get(b"moved/0") is None
        wait_for(lambda: stats(proxy, b"workers").get("proxy_config_reloads") == "2",
                 what="stats workers to count both reloads")
    finally:
        proxy.stop()


def test_a_killed_worker_is_restarted(workers):
    before = children(workers.proc.pid)
    victim, survivor = sorted(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"(pid {victim}) ended: killed by signal 9; restarting it in 1.0s"
             in workers.log(), what="the death to be logged")
    # The survivor answers at once; new connections hashed to the dead
    # worker's socket wait in its backlog for the new worker.
    assert serve_many(workers, "restart")
    after = wait_for(lambda: len(children(workers.proc.pid)) == 2
                     and children(workers.proc.pid), what="the new worker")
    assert survivor in after and victim not in after
    (new,) = after - {survivor}
    assert f"started (pid {new})" in workers.log()
    wait_for(lambda: workers.log().count("ProxyServerFactory starting") >= 3,
             what="the new worker listening")
    assert serve_many(workers, "restarted") == {"0", "1"}
    wait_for(lambda: stats(workers, b"workers").get("worker_restarts") == "1",
             what="stats workers to count the restart")


def test_sigterm_stops_every_worker(workers):
    pids = children(workers.proc.pid)
    assert len(pids) == 2
    workers.proc.terminate()
    # twistd ends by re-raising the signal it stopped on, as without --workers
    assert workers.proc.wait(15) == -signal.SIGTERM
    assert all(gone(pid) for pid in pids)
    log = workers.log()
    assert "stopping 2 workers" in log
    assert log.count("exited with status 0") == 2
    assert "restarting" not in log
    assert "Server Shut Down." in log


def test_a_broken_config_stops_startup(memcached):
    broken = "function mcp_config_pools()\n  error('boom')\nend\n"
    proxy = Proxy(None, "--workers=2", config_text=broken).start(wait=False)
    try:
        assert proxy.proc.wait(30) != 0
        output = proxy.proc.stdout.read().decode() + proxy.log()
        assert "route.lua:2: boom" in output
        assert "worker 0 started" not in output
    finally:
        proxy.stop()
