"""Operations: backend latency windows, the Prometheus endpoint, the status page.

Latency windows and the page's building blocks are tested in process; the
endpoint is scraped from ``twistd -n mcproxy --metrics=...`` with real
memcached servers behind it, and the status page is rendered by headless
Chromium (a screenshot is kept under pytest's tmp dir, and the DOM checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheServerError
from twisted.internet.task import Clock
from twisted.python import usage

from mcproxy.app import tap
from mcproxy.app.service import RELOAD_HISTORY, ProxyService
from mcproxy.backends import latency
from mcproxy.backends.latency import LatencyWindow
from mcproxy.ops import web
from mcproxy.ops.stats import Snapshot
from tests.servers import Memcached, Proxy, free_port, read_until, wait_for_port

# -- latency windows ---------------------------------------------------------------


def test_empty_window_has_no_percentiles():
    w = LatencyWindow(8)
    assert w.window() == []
    assert w.percentiles() is None
    assert (w.count, w.total) == (0, 0)


def test_percentiles_are_nearest_rank():
    w = LatencyWindow(128)
    for us in range(100, 0, -1):  # order does not matter
        w.record(us)
    assert w.percentiles() == {0.5: 50, 0.9: 90, 0.99: 99}
    assert (w.count, w.total) == (100, 5050)
    assert latency.percentiles([7], (0.0, 0.5, 1.0)) == {0.0: 7, 0.5: 7, 1.0: 7}
    assert latency.percentiles(range(1, 11), (0.9,)) == {0.9: 9}


def test_window_keeps_the_last_samples_and_counts_all():
    w = LatencyWindow(4)
    for us in range(1, 11):
        w.record(us)
    assert w.window() == [7, 8, 9, 10]
    assert w.percentiles((0.5, 1.0)) == {0.5: 8, 1.0: 10}
    assert (w.count, w.total) == (10, 55)


def test_one_time_recorded_several_times_counts_each():
    once, many = LatencyWindow(4), LatencyWindow(4)
    for w in (once, many):
        w.record(1)
    for _ in range(5):
        once.record(9)
    many.record(9, 5)
    assert many.window() == once.window() == [9, 9, 9, 9]
    assert (many.count, many.total) == (once.count, once.total) == (6, 46)


@pytest.mark.parametrize("size", [1, 4, 16])
def test_recording_several_times_is_recording_each_time(size):
    """record(us, times) fills the slots by slices, wrapping round."""
    once, many = LatencyWindow(size), LatencyWindow(size)
    for us, times in [(1, 3), (2, 1), (3, 17), (4, 2), (5, 5), (6, 16), (7, 40), (8, 1)]:
        for _ in range(times):
            once.record(us)
        many.record(us, times)
        assert many.samples == once.samples and many.count == once.count


def test_window_size_is_a_power_of_two():
    with pytest.raises(ValueError):
        LatencyWindow(1000)
    with pytest.raises(ValueError):
        LatencyWindow(0)


def test_merged_windows_are_one_population():
    fast, slow = LatencyWindow(8), LatencyWindow(8)
    for _ in range(3):
        fast.record(10)
    slow.record(1000)
    count, total, figures = latency.merged([fast, slow], (0.5, 0.99))
    assert (count, total, figures) == (4, 1030, {0.5: 10, 0.99: 1000})
    assert latency.merged([]) == (0, 0, None)


def test_recording_is_cheap():
    record = LatencyWindow().record
    n = 100_000
    best = min(_timed(record, n) for _ in range(3))
    assert best / n < 2e-6  # typically ~0.2 µs; generous for slow CI machines


def _timed(record, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        record(i)
    return time.perf_counter() - start


# -- in process: pools, reload history, options -------------------------------------

POOLS = """
function mcp_config_pools()
    local main = mcp.pool({ mcp.backend("m1", "127.0.0.1", "1"),
                            mcp.backend("m2", "127.0.0.1", "2") })
    local near = mcp.pool({ mcp.backend("n1", "127.0.0.1", "3") })
    return { main = main, zones = { near = near } }
end

function mcp_config_routes(p)
    local near = p.zones.near
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p.main(r) end)
    mcp.attach(mcp.CMD_MG, function(r) return near(r) end)
end
"""


@pytest.fixture
def service(tmp_path):
    path = tmp_path / "route.lua"
    path.write_text(POOLS)
    service = ProxyService(str(path), [], reactor=Clock())
    service.load_config()
    return service


def test_pools_are_named_as_the_routes_reach_them(service):
    found = {name: [b.label for b in pool.backends]
             for name, pool in service.engine.routes.pools}
    assert found == {"main": ["m1", "m2"], "near": ["n1"]}
    snap = service.snapshot()
    assert [(p.name, p.members) for p in snap.pools] == [
        (name, [(b.label, b.state) for b in pool.backends])
        for name, pool in service.engine.routes.pools]
    assert ProxyService(None, [], reactor=Clock()).snapshot().pools == []


def test_a_snapshot_goes_through_json_whole(service):
    """What a worker sends the supervisor is the snapshot itself."""
    backends = {b.label: b for b in service.registry.live}
    backends["m1"].latency.record(120)
    snap = service.snapshot()
    assert Snapshot.from_data(json.loads(json.dumps(snap.as_data()))) == snap


def test_collector_exports_backends_and_pools(service):
    backends = {b.label: b for b in service.registry.live}
    for us in (100, 200, 300, 400):
        backends["m1"].latency.record(us)
    backends["n1"].latency.record(50)
    families = _parse(prometheus_client.generate_latest(
        web.metrics_registry(service.snapshot)))
    assert _value(families, "mcproxy_backend_latency_seconds_count", backend="m1") == 4
    assert _value(families, "mcproxy_backend_latency_seconds", backend="m1",
                  quantile="0.5") == pytest.approx(200e-6)
    assert _value(families, "mcproxy_backend_latency_seconds_sum",
                  backend="m1") == pytest.approx(1000e-6)
    assert _value(families, "mcproxy_pool_latency_seconds_count", pool="main") == 4
    assert _value(families, "mcproxy_pool_latency_seconds_count", pool="near") == 1
    assert _value(families, "mcproxy_backend_state", backend="m2", state="idle") == 1
    assert _value(families, "mcproxy_backend_state", backend="m2", state="bad") == 0
    assert _value(families, "mcproxy_proxy_backend_total") == 3


def test_reload_history_is_bounded_and_records_errors(service):
    path = Path(service.config)
    path.write_text("function mcp_config_pools( broken")
    assert not service.reload()
    path.write_text(POOLS)
    assert service.reload()
    failed, ok = service.reloads
    assert not failed.ok and "route.lua" in failed.error
    assert ok.ok and ok.error == "" and service.config_loaded == ok.at
    for _ in range(RELOAD_HISTORY + 5):
        service.reload()
    assert len(service.reloads) == RELOAD_HISTORY
    page = web.status_page(service.snapshot())
    assert str(path) in page and 'data-backend="m1"' in page


def test_workers_metrics_are_one_exposition_labelled_by_worker(service):
    from mcproxy.app.workers import WorkerProcess, WorkerSupervisor
    from mcproxy.ops import webworkers

    one = prometheus_client.generate_latest(web.metrics_registry(service.snapshot)).decode()
    supervisor = WorkerSupervisor(3, [], [], reactor=Clock())
    workers = [WorkerProcess(supervisor, slot) for slot in range(3)]
    for worker in workers:
        worker.pid = os.getpid()  # its process metrics come from /proc/<pid>
    snap = Snapshot.from_data(json.loads(json.dumps(service.snapshot().as_data())))
    answers = {0: (workers[0], snap), 1: (workers[1], snap), 2: (workers[2], None)}
    text = webworkers.metrics_text(supervisor, answers).decode()
    families = _parse(text)
    assert families.keys() == _parse(one).keys() | {
        "mcproxy_workers", "mcproxy_workers_running", "mcproxy_workers_answering",
        "mcproxy_worker_restarts"}
    assert text.count("# HELP mcproxy_backend_latency_seconds ") == 1
    assert _value(families, "mcproxy_workers_answering") == 2
    for worker in ("0", "1"):
        assert _value(families, "mcproxy_backend_state", backend="m2", state="idle",
                      worker=worker) == 1
    assert len(families["mcproxy_pool_latency_seconds"].samples) == \
        2 * len(_parse(one)["mcproxy_pool_latency_seconds"].samples)


def test_workers_status_page_has_a_section_per_worker(service):
    from mcproxy.app.workers import WorkerProcess, WorkerSupervisor
    from mcproxy.ops import webworkers

    supervisor = WorkerSupervisor(3, [], [], reactor=Clock())
    workers = [WorkerProcess(supervisor, slot) for slot in range(2)]
    workers[0].pid, workers[1].pid = 4242, 4343
    page = webworkers.status_page(supervisor, {0: (workers[0], service.snapshot()),
                                               1: (workers[1], None)})
    assert '<h2 class="worker">worker 0 &middot; pid 4242</h2>' in page
    assert 'id="worker-0-backends"' in page and 'data-backend="m1"' in page
    assert "worker 1 &middot; pid 4343</h2><p class=\"failed\">did not answer" in page
    assert "worker 2: not running" in page
    assert '<div class="summary warn" id="summary">supervisor: 0 of 3 workers running, ' \
        "1 answering; 0 restarts</div>" in page


def test_metrics_option():
    options = tap.Options()
    options.parseOptions(["--metrics=tcp:9150:interface=127.0.0.1"])
    assert options["metrics"] == ["tcp:9150:interface=127.0.0.1"]
    with pytest.raises(usage.UsageError, match="bad --metrics endpoint"):
        tap.Options().parseOptions(["--metrics=nonsense:1"])


# -- end to end ------------------------------------------------------------------------

CONFIG = """
function mcp_config_pools()
    local main = mcp.pool({
        mcp.backend("main1", "127.0.0.1", "%(main1)d"),
        mcp.backend("main2", "127.0.0.1", "%(main2)d"),
    })
    local gone = mcp.pool({ mcp.backend("gone", "127.0.0.1", "%(gone)d") })
    mcp.add_stat(1, "gone_keys")
    return { main = main, gone = gone }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        if string.find(r:key(), "^gone/") then
            mcp.stat(1, 1)
            return p.gone(r)
        end
        return p.main(r)
    end)
end
"""


@pytest.fixture(scope="module")
def cluster():
    servers = {name: Memcached().start() for name in ("main1", "main2")}
    ports = {name: s.port for name, s in servers.items()}
    ports["gone"] = free_port()  # nothing listens there: it goes bad
    metrics_port = free_port()
    proxy = Proxy(None, f"--metrics=tcp:{metrics_port}:interface=127.0.0.1",
                  config_text=CONFIG % ports).start()
    wait_for_port(metrics_port, proc=proxy.proc)
    proxy.metrics_url = f"http://127.0.0.1:{metrics_port}"
    yield proxy
    proxy.stop()
    for s in servers.values():
        s.stop()


def _fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.headers["content-type"], reply.read().decode()


def _parse(text: str | bytes) -> dict:
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, sample: str, **labels) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {sample} {labels}")


def _scrape(proxy) -> dict:
    content_type, text = _fetch(proxy.metrics_url + "/metrics")
    assert content_type.startswith("text/plain")
    return _parse(text)


def test_metrics_move_with_traffic(cluster):
    before = _scrape(cluster)
    client = Client(("127.0.0.1", cluster.port), timeout=10)
    try:
        for i in range(50):
            client.set(f"k{i}", b"v", noreply=False)
            assert client.get(f"k{i}") == b"v"
        with pytest.raises(MemcacheServerError):  # the backend is bad
            client.get("gone/x")
    finally:
        client.close()
    after = _scrape(cluster)

    def moved(sample, **labels):
        return _value(after, sample, **labels) - _value(before, sample, **labels)

    assert moved("mcproxy_cmd_total", cmd="set") == 50
    assert moved("mcproxy_cmd_total", cmd="get") == 51
    assert moved("mcproxy_proxy_conn_requests_total") == 101
    assert moved("mcproxy_total_connections_total") == 1
    assert moved("mcproxy_user_stat", name="gone_keys") == 1
    replies = sum(moved("mcproxy_backend_latency_seconds_count", backend=b)
                  for b in ("main1", "main2"))
    assert replies == 100
    assert moved("mcproxy_pool_latency_seconds_count", pool="main") == 100
    p99 = _value(after, "mcproxy_backend_latency_seconds", backend="main1", quantile="0.99")
    assert 0 < p99 < 1
    assert _value(after, "mcproxy_backend_state", backend="main1", state="connected") == 1
    assert _value(after, "mcproxy_backend_state", backend="gone", state="bad") == 1
    assert _value(after, "mcproxy_backend_failures", backend="gone") >= 1
    assert _value(after, "mcproxy_backend_depth", backend="main2") == 0
    # the embedded cache's stats, and the process collector's
    assert "mcproxy_curr_items" in after and "process_cpu_seconds" in after


def test_stats_port_serves_memcached_exporter(cluster):
    """What memcached_exporter (through gomemcache) sends on one connection:
    every reply must end in END, or the exporter waits and reports down."""
    with cluster.connect() as s:
        s.settimeout(5)
        replies = {}
        for command in (b"stats", b"stats slabs", b"stats items", b"stats settings"):
            s.sendall(command + b"\r\n")
            replies[command] = read_until(s, b"END\r\n")
            assert replies[command].endswith(b"END\r\n"), (command, replies[command])
    assert b"STAT proxy_backend_total 3\r\n" in replies[b"stats"]
    assert b"STAT curr_connections " in replies[b"stats"]


@pytest.mark.e2e
def test_status_page_in_chromium(cluster, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test installs it with apt-get)")
    # one failed reload, then a good one, for the page's history
    config = Path(cluster.config)
    good = config.read_text()
    config.write_text(good.replace("mcp_config_routes", "mcp_config_routes(", 1))
    _reload_and_wait(cluster, fails=1)
    config.write_text(good)
    _reload_and_wait(cluster, fails=1)
    _fill_latency(cluster)

    url = cluster.metrics_url + "/"
    screenshot = tmp_path / "status.png"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], check=True,
                   capture_output=True, timeout=60)
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True,
                         timeout=60).stdout.decode()
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.backends, self.pools, self.ids = {}, [], set()

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "data-backend" in attrs:
                self.backends[attrs["data-backend"]] = attrs["data-state"]
            if "data-pool" in attrs:
                self.pools.append(attrs["data-pool"])
            if "id" in attrs:
                self.ids.add(attrs["id"])

    rows = Rows()
    rows.feed(dom)
    assert rows.backends == {"main1": "connected", "main2": "connected", "gone": "bad"}
    assert sorted(rows.pools) == ["gone", "main"]
    assert {"summary", "backends", "pools", "reloads", "config-path"} <= rows.ids
    assert "1 of 3 backends bad: gone" in dom
    assert str(config) in dom
    assert "failed, old routes kept" in dom and "route.lua:" in dom
    assert " µs" in dom or " ms" in dom


def _reload_and_wait(proxy, fails: int) -> None:
    reloads = _value(_scrape(proxy), "mcproxy_proxy_config_reloads_total")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _scrape(proxy)
        if _value(now, "mcproxy_proxy_config_reloads_total") > reloads:
            assert _value(now, "mcproxy_proxy_config_reload_fails_total") == fails
            return
        time.sleep(0.05)
    raise AssertionError("the reload did not happen")


def _fill_latency(proxy) -> None:
    client = Client(("127.0.0.1", proxy.port), timeout=10)
    try:
        for i in range(20):
            client.set(f"page{i}", b"x" * 100, noreply=False)
    finally:
        client.close()
