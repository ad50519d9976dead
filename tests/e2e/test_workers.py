"""``--workers=N``: a supervisor process and N worker processes on one port.

Options, the ``stats workers`` reply and the supervisor's asks over the
control pipe are tested in process; the rest runs ``twistd -n mcproxy
--workers=2`` with real memcached servers behind it: connections spread
over both workers, SIGHUP reloads both, a worker killed with SIGKILL is
restarted, SIGHUP never kills a worker that is still starting (and one that
came while it started reloads it once it is ready), SIGTERM stops
everything, a broken config stops startup, and ``--metrics`` serves every
worker's metrics and status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from mcproxy.app.service import ProxyService
from mcproxy.app.tap import Options, makeService
from mcproxy.app.workers import (
    ASK_TIMEOUT,
    STABLE_AFTER,
    WorkerProcess,
    WorkerSupervisor,
    worker_arguments,
)
from tests.servers import Proxy, free_port, read_until


def parse_stats(reply: bytes) -> list[list[str]]:
    """``[name, value]`` of each ``STAT name value`` line of a stats reply."""
    pairs = []
    for line in reply.decode().splitlines():
        fields = line.split(" ", 2)
        if len(fields) == 3 and fields[0] == "STAT":
            pairs.append(fields[1:])
    return pairs

ROUTE = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b", "127.0.0.1", "%d") })
end

function mcp_config_routes(main)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return main(r) end)
end
"""

# As ROUTE, but mcp_config_routes appends a line to a marker file and then
# takes a second (the file has been read by then): a HUP can be sent while
# a worker is known to be loading the old config and not ready yet.
SLOW_ROUTE = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b", "127.0.0.1", "%d") })
end

function mcp_config_routes(main)
    local marker = assert(io.open("%s", "a"))
    marker:write("loading\\n")
    marker:close()
    os.execute("sleep 1")
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


def test_the_supervisor_serves_the_metrics():
    options = parse("--workers=2", "--metrics=tcp:0:interface=127.0.0.1")
    supervisor = makeService(options).proxy
    assert isinstance(supervisor, WorkerSupervisor)
    assert [type(child).__name__ for child in supervisor] == ["StreamServerEndpointService"]
    assert worker_arguments(options) == []


def test_stats_workers_adds_up_the_workers():
    service = ProxyService(None, [], reactor=MemoryReactorClock())
    service.worker_id = 1
    service.stats.total_connections = 5
    service.worker_table = {0: [["pid", 100], ["total_connections", 7],
                                ["rusage_user", 0.5], ["version", "x"]],
                            1: [["pid", 99], ["total_connections", 1]]}
    service.worker_restarts = 3
    lines = parse_stats(service.stats_reply([b"workers"]))
    values = dict(lines)
    assert lines[:3] == [["workers", "2"], ["worker_restarts", "3"], ["worker:0:pid", "100"]]
    assert values["worker:1:pid"] == str(os.getpid())  # its own figures are live
    assert values["worker:0:total_connections"] == "7"
    assert values["worker:1:total_connections"] == "5"
    assert values["total_connections"] == "12"
    assert values["worker:0:rusage_user"] == "0.500000"
    assert float(values["rusage_user"]) >= 0.5
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


def test_a_worker_that_ran_long_enough_restarts_without_backoff():
    """The restart delay doubles for quick exits and starts again after a
    worker that ran STABLE_AFTER seconds, on the supervisor's clock."""
    reactor = UnspawnableReactor()
    supervisor = WorkerSupervisor(1, [], [], reactor=reactor)
    events: list[dict] = []
    supervisor.log = Logger(observer=events.append)
    supervisor.running = True
    ended = Failure(error.ProcessTerminated(exitCode=1)).value

    def run_for(seconds: float) -> str:
        worker = WorkerProcess(supervisor, 0)
        supervisor.workers[0] = worker
        reactor.advance(seconds)
        supervisor.worker_ended(worker, ended)
        supervisor._pending.pop(0).cancel()
        return formatEvent(events[-1]).rsplit(" ", 1)[-1]

    assert [run_for(1), run_for(1), run_for(STABLE_AFTER), run_for(1)] == \
        ["1.0s", "2.0s", "1.0s", "2.0s"]


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


def test_asking_the_workers_waits_for_the_answers_only_so_long():
    reactor = MemoryReactorClock()
    supervisor = WorkerSupervisor(3, [], [], reactor=reactor)
    supervisor.log = Logger(observer=lambda event: None)
    transports = []
    for slot in range(3):
        transport = StringTransport()
        transport.pid = 100 + slot
        worker = WorkerProcess(supervisor, slot)
        worker.makeConnection(transport)
        supervisor.workers[slot] = worker
        transports.append(transport)
    answered, dying, silent = supervisor.workers.values()
    gathered = supervisor.ask_workers("metrics")
    for transport in transports:
        assert json.loads(transport.value()) == {"ask": "metrics", "id": 0}
    answered.outReceived(b'{"answer": 0, "bo')  # an answer split in two
    answered.outReceived(b'dy": "# samples"}\n')
    dying.processEnded(Failure(error.ProcessTerminated(signal=9)))
    assert not gathered.called
    reactor.advance(ASK_TIMEOUT)
    assert gathered.result == {0: (answered, "# samples"), 1: (dying, None),
                               2: (silent, None)}
    silent.outReceived(b'{"answer": 0, "body": "too late"}\n')  # ignored
    assert not silent._asked


class SignalledTransport(StringTransport):
    """A worker's transport that records the signals sent to it."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


def test_a_sighup_waits_for_a_worker_to_be_ready():
    supervisor = WorkerSupervisor(2, [], [], reactor=MemoryReactorClock())
    supervisor.log = Logger(observer=lambda event: None)
    ready, starting = WorkerProcess(supervisor, 0), WorkerProcess(supervisor, 1)
    for worker in (ready, starting):
        worker.log = supervisor.log
        worker.makeConnection(SignalledTransport(100 + worker.slot))
        supervisor.workers[worker.slot] = worker
    ready.outReceived(b'{"ready": true}\n')
    supervisor._forward_hup()
    supervisor._forward_hup()
    assert ready.transport.signals == ["HUP", "HUP"]
    assert starting.transport.signals == []  # it could die of it
    starting.outReceived(b'{"ready": true}\n')
    assert starting.transport.signals == ["HUP"]  # both HUPs, as one reload
    starting.outReceived(b'{"ready": true}\n')
    assert starting.transport.signals == ["HUP"]


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


def listening(proxy: Proxy) -> int:
    """How many workers have started serving (and so handle SIGHUP)."""
    return proxy.log().count("ProxyServerFactory starting")


def hup_storm(pids, until, timeout: float = 10.0) -> int:
    """Send SIGHUP to every pid of ``pids()`` every few milliseconds until
    ``until()`` is true; how many were sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail("timed out sending SIGHUPs")
        for pid in pids():
            try:
                os.kill(pid, signal.SIGHUP)
                sent += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return sent


def test_sighups_at_the_supervisor_never_kill_a_worker(memcached):
    proxy = Proxy(None, "--workers=2", config_text=ROUTE % memcached.port).start()
    try:
        wait_for(lambda: "worker 1 started" in proxy.log(), what="both workers spawned")
        parent = lambda: [proxy.proc.pid]  # noqa: E731
        assert hup_storm(parent, lambda: listening(proxy) >= 2) > 0
        socks = [proxy.connect() for _ in range(CLIENTS)]
        try:
            owners = {}
            for s in socks:
                s.sendall(b"stats\r\n")
                owners[s] = dict(parse_stats(read_until(s, b"END\r\n")))["pid"]
            victim = int(next(iter(owners.values())))
            served = [s for s in socks if owners[s] != str(victim)]
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                # the survivor's clients are served all along
                for s in served:
                    s.sendall(b"get storm\r\n")
                    assert read_until(s, b"END\r\n") == b"END\r\n"
                return listening(proxy) >= 3
            assert hup_storm(parent, restarted) > 0
        finally:
            for s in socks:
                s.close()
        assert serve_many(proxy, "storm") == {"0", "1"}
        log = proxy.log()
        assert "killed by signal 1" not in log
        assert log.count(" ended: ") == 1  # the SIGKILL
        assert f"(pid {victim}) ended: killed by signal 9" in log
    finally:
        proxy.stop()


def test_a_sighup_while_a_worker_starts_reloads_it_once_ready(memcached_factory, tmp_path):
    first, second = memcached_factory(), memcached_factory()
    marker = tmp_path / "loads"
    proxy = Proxy(None, "--workers=2",
                  config_text=SLOW_ROUTE % (first.port, marker)).start()
    try:
        # the supervisor's check, then both workers, each a second long
        wait_for(lambda: marker.exists() and marker.read_text().count("loading") == 3,
                 timeout=10, what="both workers loading the config")
        Path(proxy.config).write_text(ROUTE % second.port)
        os.kill(proxy.proc.pid, signal.SIGHUP)
        assert listening(proxy) == 0  # neither worker was ready for it
        wait_for(lambda: proxy.log().count("reloaded route config") == 2, timeout=5,
                 what="both workers to reload once ready")
        assert serve_many(proxy, "late") == {"0", "1"}
        assert all(second.get(b"late/%d" % i) is not None for i in range(CLIENTS))
        assert first.get(b"late/0") is None
        assert "killed by signal" not in proxy.log()
    finally:
        proxy.stop()


def test_a_sighup_straight_at_a_starting_worker_does_not_kill_it(memcached):
    proxy = Proxy(None, "--workers=2", config_text=ROUTE % memcached.port).start()
    seen: set[int] = set()

    def workers() -> set[int]:
        pids = children(proxy.proc.pid)
        seen.update(pids)
        return pids
    try:
        assert hup_storm(workers, lambda: listening(proxy) >= 2) > 0
        assert len(seen) == 2 and children(proxy.proc.pid) == seen
        assert serve_many(proxy, "direct") == {"0", "1"}
        assert " ended: " not in proxy.log()
    finally:
        proxy.stop()


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


# -- twistd -n mcproxy --workers=2 --metrics=... -------------------------------------------


@pytest.fixture
def metered(memcached):
    """A started ``twistd -n mcproxy --workers=2 --metrics=...``; its
    ``metrics_url`` is the HTTP endpoint's."""
    metrics_port = free_port()
    proxy = Proxy(None, "--workers=2", f"--metrics=tcp:{metrics_port}:interface=127.0.0.1",
                  config_text=ROUTE % memcached.port).start()
    proxy.metrics_url = f"http://127.0.0.1:{metrics_port}"
    wait_for(lambda: proxy.log().count("ProxyServerFactory starting") >= 2,
             what="both workers listening")
    yield proxy
    proxy.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def scrape(proxy: Proxy) -> tuple[str, dict]:
    """/metrics: its text, and its families by name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch(proxy.metrics_url + "/metrics")
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def total(families: dict, family: str, **labels: str) -> float:
    """The sum over the workers of a family's samples that have ``labels``."""
    return sum(s.value for s in families[family].samples
               if all(s.labels.get(k) == v for k, v in labels.items()))


def labelled(families: dict, family: str) -> dict[str, float]:
    """``{worker: value}`` of a family with one sample per worker."""
    return {s.labels["worker"]: s.value for s in families[family].samples}


def single(families: dict, family: str) -> float:
    (sample,) = families[family].samples
    assert "worker" not in sample.labels
    return sample.value


def test_metrics_come_from_every_worker(metered):
    _text, before = scrape(metered)
    sockets = [metered.connect() for _ in range(CLIENTS)]
    try:
        for i, s in enumerate(sockets):
            s.sendall(b"set metered/%d 0 0 1\r\nv\r\n" % i)
            assert read_until(s, b"\r\n") == b"STORED\r\n"
            s.sendall(b"get metered/%d\r\n" % i)
            assert read_until(s, b"END\r\n").endswith(b"v\r\nEND\r\n")
    finally:
        for s in sockets:
            s.close()
    text, after = scrape(metered)

    requests = labelled(after, "mcproxy_proxy_conn_requests")
    assert set(requests) == {"0", "1"}
    assert all(count > 0 for count in requests.values())  # both workers served some
    assert (total(after, "mcproxy_proxy_conn_requests")
            - total(before, "mcproxy_proxy_conn_requests")) == 2 * CLIENTS
    assert total(after, "mcproxy_cmd", cmd="set") - total(before, "mcproxy_cmd", cmd="set") \
        == CLIENTS
    assert set(labelled(after, "process_cpu_seconds")) == {"0", "1"}
    assert {s.labels["worker"] for s in after["mcproxy_backend_state"].samples} == {"0", "1"}
    # every family's help and type once, however many workers have it
    assert text.count("# TYPE mcproxy_proxy_conn_requests_total counter") == 1
    assert text.count("# HELP process_cpu_seconds_total ") == 1
    assert "mcproxy_worker_id" not in text  # the worker label says it
    assert single(after, "mcproxy_workers") == 2
    assert single(after, "mcproxy_workers_running") == 2
    assert single(after, "mcproxy_workers_answering") == 2
    assert single(after, "mcproxy_worker_restarts") == 0


class Sections(HTMLParser):
    """The worker sections of the status page, and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-worker" in attrs:
            self.workers.append(attrs["data-worker"])
        if "id" in attrs:
            self.ids.add(attrs["id"])


def test_status_page_shows_every_worker(metered):
    page = fetch(metered.metrics_url + "/")
    sections = Sections()
    sections.feed(page)
    assert sections.workers == ["0", "1"]
    for slot in (0, 1):
        assert {f"worker-{slot}-summary", f"worker-{slot}-backends", f"worker-{slot}-pools",
                f"worker-{slot}-reloads"} <= sections.ids
    for pid in children(metered.proc.pid):
        assert f"&middot; pid {pid}</h2>" in page
    assert f"pid {metered.proc.pid}" in page
    assert "supervisor: 2 of 2 workers running, 2 answering; 0 restarts" in page
    assert page.count('data-backend="b" data-state="connected"') == 2
    assert page.count("<td>main</td>") == 2


def timed_scrape(proxy: Proxy) -> tuple[float, dict]:
    start = time.monotonic()
    _text, families = scrape(proxy)
    return time.monotonic() - start, families


def test_a_worker_that_does_not_answer_is_left_out(metered):
    stopped, running = sorted(children(metered.proc.pid))
    os.kill(stopped, signal.SIGSTOP)
    try:
        took, families = timed_scrape(metered)
        page = fetch(metered.metrics_url + "/")
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert ASK_TIMEOUT <= took < ASK_TIMEOUT + 2
    assert single(families, "mcproxy_workers_running") == 2
    assert single(families, "mcproxy_workers_answering") == 1
    assert len(labelled(families, "mcproxy_proxy_conn_requests")) == 1
    assert f"pid {stopped}</h2><p class=\"failed\">did not answer within" in page
    assert "2 of 2 workers running, 1 answering" in page


def test_a_killed_worker_is_left_out_until_its_replacement_answers(metered):
    victim = min(children(metered.proc.pid))
    slot = re.search(rf"worker (\d) started \(pid {victim}\)", metered.log()).group(1)
    os.kill(victim, signal.SIGKILL)
    took, families = timed_scrape(metered)
    assert took < ASK_TIMEOUT  # a dead worker is not waited for
    assert single(families, "mcproxy_workers_answering") == 1
    survivor = {"0": "1", "1": "0"}[slot]
    assert set(labelled(families, "mcproxy_proxy_conn_requests")) == {survivor}

    def replaced():
        _text, families = scrape(metered)
        if single(families, "mcproxy_workers_answering") == 2:
            return families
    families = wait_for(replaced, what="the new worker to answer")
    assert set(labelled(families, "mcproxy_proxy_conn_requests")) == {"0", "1"}
    assert single(families, "mcproxy_worker_restarts") == 1
    assert victim not in children(metered.proc.pid)
