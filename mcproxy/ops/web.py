"""The operator's HTTP endpoint (``--metrics``): Prometheus metrics and a status page.

``/metrics`` is the Prometheus text exposition of everything ``stats`` and
``stats proxy`` report, plus per-backend state, failures, queue depth and
reply latency, and per-pool latency. ``/`` is a plain HTML page with the
same figures for a human, and the config's recent reloads.

Both are rendered from a snapshot of the proxy (mcproxy.ops.stats.Snapshot),
taken in the reactor thread when they are requested: prometheus_client's
own Twisted resource runs collectors in a thread pool, where reading the
backend registry would race the reactor.

Under ``--workers`` the supervisor renders the same from its workers'
snapshots (mcproxy.ops.webworkers).
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application import strports
from twisted.application.service import Service
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcproxy.backends import backend as backend_module
from mcproxy.backends import latency
from mcproxy.ops.stats import VERSION, Snapshot, stat_value

#: Prefix of every metric name; the rest is the memcached stat's name.
PREFIX = "mcproxy_"

#: ``stats`` lines that are levels, not counters (every other numeric line
#: is a counter); and lines not exported (the version is the info metric).
GAUGE_STATS = frozenset({"uptime", "curr_connections", "proxy_req_active",
                         "proxy_backend_total", "limit_maxbytes", "bytes",
                         "curr_items"})
SKIPPED_STATS = frozenset({"pid", "time", "version", "pointer_size", "worker_id"})

#: Every state a backend can be in, for the state gauge (one series each).
BACKEND_STATES = (backend_module.IDLE, backend_module.CONNECTING,
                  backend_module.VALIDATING, backend_module.CONNECTED,
                  backend_module.FAILED, backend_module.BAD, backend_module.CLOSED)

#: Seconds between automatic refreshes of the status page.
REFRESH = 10

#: What the pages are made from: a callable that takes a Snapshot now.
TakeSnapshot = Callable[[], Snapshot]

# -- figures shared by both pages ----------------------------------------------

def _seconds(micros: float) -> float:
    return micros / 1e6


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- Prometheus --------------------------------------------------------------

def proxy_families(snap: Snapshot) -> list[Any]:
    """The metric families of one proxy's snapshot."""
    families: list[Any] = [InfoMetricFamily(PREFIX + "build", "mcproxy version",
                                            value={"version": VERSION})]
    for name, value in snap.general:
        number = _number(value)
        if name in SKIPPED_STATS or number is None:
            continue
        doc = f"memcached stat {name}"
        if name in GAUGE_STATS:
            families.append(GaugeMetricFamily(PREFIX + name, doc, value=number))
        else:
            families.append(CounterMetricFamily(PREFIX + name, doc, value=number))

    commands = CounterMetricFamily(PREFIX + "cmd", "stats proxy cmd_*: requests "
                                   "routed through Lua, per command", labels=["cmd"])
    user = GaugeMetricFamily(PREFIX + "user_stat", "stats proxy user_*: the "
                             "config's mcp.add_stat counters", labels=["name"])
    for name, value in snap.proxy:
        number = _number(value)
        if number is None:
            continue
        if name.startswith("cmd_"):
            commands.add_metric([name.removeprefix("cmd_")], number)
        elif name.startswith("user_"):
            user.add_metric([name.removeprefix("user_")], number)
    families += (commands, user)

    labels = ["backend", "address"]
    state = GaugeMetricFamily(PREFIX + "backend_state", "1 for the backend's "
                              "current state, 0 for the others",
                              labels=[*labels, "state"])
    failures = GaugeMetricFamily(PREFIX + "backend_failures", "counted failures "
                                 "since the last successful validation", labels=labels)
    depth = GaugeMetricFamily(PREFIX + "backend_depth", "requests queued or in "
                              "flight", labels=labels)
    replies = SummaryMetricFamily(PREFIX + "backend_latency_seconds", "reply "
                                  f"latency; quantiles over the last {latency.WINDOW} "
                                  "replies", labels=labels)
    seen = set()
    for backend in snap.backends:
        values = [backend.label, backend.address]
        if tuple(values) in seen:  # the same backend marked down and up
            continue
        seen.add(tuple(values))
        current = backend.state
        for name in BACKEND_STATES:
            state.add_metric([*values, name], 1 if name == current else 0)
        failures.add_metric(values, backend.failures)
        depth.add_metric(values, backend.depth)
        _add_summary(replies, values, backend)
    families += (state, failures, depth, replies)

    pool_replies = SummaryMetricFamily(PREFIX + "pool_latency_seconds", "reply "
                                       "latency of the pool's backends; quantiles over "
                                       f"their last {latency.WINDOW} replies each",
                                       labels=["pool"])
    for pool in snap.pools:
        _add_summary(pool_replies, [pool.name], pool)
    families.append(pool_replies)
    return families


class ProxyCollector:
    """A prometheus_client collector of a proxy's snapshots."""

    def __init__(self, take: TakeSnapshot) -> None:
        self.take = take

    def collect(self):
        return iter(proxy_families(self.take()))


def _add_summary(family: SummaryMetricFamily, values: list[str], figures: Any) -> None:
    """A backend's or pool's latency (BackendFigures, PoolFigures) as samples."""
    labels = dict(zip(family._labelnames, values, strict=True))
    quantiles = figures.quantiles
    for i, q in enumerate(latency.QUANTILES):
        value = _seconds(quantiles[i]) if quantiles else float("nan")
        family.add_sample(family.name, {**labels, "quantile": str(q)}, value)
    family.add_metric(values, figures.count, _seconds(figures.total))


def metrics_registry(take: TakeSnapshot) -> CollectorRegistry:
    """A registry with the proxy's metrics and the process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(take))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """``/metrics``: the text exposition, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


# -- the status page -------------------------------------------------------------

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b;
       background: #f4f6f8; margin: 0; padding: 20px 28px; }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 15px; margin: 22px 0 6px; text-transform: uppercase; letter-spacing: .04em;
     color: #4a5563; }
.sub { color: #5b6673; margin-bottom: 12px; }
.summary { display: inline-block; padding: 6px 12px; border-radius: 6px; font-weight: 600; }
.summary.ok { background: #dcf3e3; color: #14532d; }
.summary.warn { background: #fdecc8; color: #713f12; }
.summary.bad { background: #fcdcdc; color: #7f1d1d; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08);
        min-width: 640px; }
th, td { padding: 6px 12px; border-bottom: 1px solid #e4e8ec; text-align: left;
         white-space: nowrap; }
th { background: #e9edf1; font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.problem td { background: #fff4f4; }
.state { display: inline-block; min-width: 84px; text-align: center; padding: 1px 8px;
         border-radius: 10px; font-size: 12px; font-weight: 600; }
.state-connected { background: #dcf3e3; color: #14532d; }
.state-idle, .state-connecting, .state-validating { background: #e0e9f7; color: #1e3a8a; }
.state-failed { background: #fdecc8; color: #713f12; }
.state-bad, .state-closed { background: #fcdcdc; color: #7f1d1d; }
.ok { color: #15803d; font-weight: 600; }
.failed { color: #b91c1c; font-weight: 600; }
.muted { color: #7b8794; }
.error { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
dt { color: #5b6673; } dd { margin: 0; font-variant-numeric: tabular-nums; }
a { color: #1d4ed8; }
section.worker { margin-top: 28px; border-top: 2px solid #cfd6dd; }
h2.worker { font-size: 17px; text-transform: none; letter-spacing: 0; color: #1d232b; }
"""

#: ``stats`` lines shown in the status page's traffic box.
_TRAFFIC = ("curr_connections", "total_connections", "proxy_conn_requests",
            "proxy_req_active", "proxy_conn_errors", "proxy_backend_marked_bad",
            "proxy_backend_failed", "curr_items", "bytes")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{stamp} ({_ago(now - at)} ago)"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d"


def _micros(value: int | None) -> str:
    if value is None:
        return '<span class="muted">&ndash;</span>'
    if value < 1000:
        return f"{value} µs"
    if value < 1_000_000:
        return f"{value / 1000:.1f} ms"
    return f"{value / 1e6:.2f} s"


def _latency_cells(figures: Any) -> str:
    """A backend's or pool's reply count and quantiles as table cells."""
    quantiles = figures.quantiles or [None] * len(latency.QUANTILES)
    cells = [f'<td class="num">{figures.count}</td>']
    cells += [f'<td class="num">{_micros(value)}</td>' for value in quantiles]
    return "".join(cells)


def _latency_heads() -> str:
    heads = ['<th class="num">replies</th>']
    heads += [f'<th class="num">p{q * 100:g}</th>' for q in latency.QUANTILES]
    return "".join(heads)


def page(sub: str, body: str) -> str:
    """A whole status page: the head, the title line, ``sub`` under it
    (HTML), then ``body`` (HTML)."""
    host = _e(os.uname().nodename)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        f"<title>mcproxy {_e(VERSION)} on {host}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>mcproxy on {host}</h1>",
        f'<div class="sub">{sub}</div>',
        body,
        "</body></html>",
    ])


def page_sub(pid: int, started: float, now: float) -> str:
    """The line under the title: version, pid, uptime, links."""
    return (f"{_e(VERSION)} &middot; pid {pid} &middot; up {_ago(now - started)} "
            f'&middot; <a href="/metrics">/metrics</a> &middot; refreshes every {REFRESH}s')


def status_page(snap: Snapshot) -> str:
    """The status page's HTML."""
    now = time.time()
    return page(page_sub(snap.pid, snap.started, now), status_sections(snap, now))


def status_sections(snap: Snapshot, now: float, prefix: str = "") -> str:
    """The status page's body for one proxy: its verdict, config, backends,
    pools, reloads and traffic. ``prefix`` starts every element id, so that
    one page can hold several proxies (the workers of ``--workers``)."""
    live = snap.backends
    general = dict(snap.general)
    problems = [b for b in live if b.state != backend_module.CONNECTED]
    bad = [b for b in live if b.state in (backend_module.BAD, backend_module.CLOSED)]

    if not live:
        summary = ("ok", "no backends" if snap.routed
                   else "no route config: every command is served by the embedded cache")
    elif bad:
        summary = ("bad", f"{len(bad)} of {len(live)} backends bad: "
                   + ", ".join(b.label for b in bad))
    elif problems:
        summary = ("warn", f"{len(problems)} of {len(live)} backends not connected: "
                   + ", ".join(f"{b.label} ({b.state})" for b in problems))
    else:
        summary = ("ok", f"all {len(live)} backends connected")

    out = [f'<div class="summary {summary[0]}" id="{prefix}summary">{_e(summary[1])}</div>']

    out.append("<h2>Config</h2><dl>")
    out.append(f'<dt>file</dt><dd id="{prefix}config-path">{_e(snap.config or "none")}</dd>')
    out.append(f"<dt>loaded</dt><dd>{_when(snap.config_loaded, now)}</dd>")
    out.append(f"<dt>reloads</dt><dd>{general['proxy_config_reloads']} "
               f"({general['proxy_config_reload_fails']} failed)</dd></dl>")

    out.append(f'<h2>Backends</h2><table id="{prefix}backends"><thead><tr><th>backend</th>'
               "<th>address</th><th>state</th><th class=\"num\">failures</th>"
               f"<th class=\"num\">queue</th>{_latency_heads()}</tr></thead><tbody>")
    for b in live:
        state = b.state
        note = "" if b.in_config else ' <span class="muted">(not in config)</span>'
        row_class = ' class="problem"' if state != backend_module.CONNECTED else ""
        out.append(
            f'<tr{row_class} data-backend="{_e(b.label)}" data-state="{_e(state)}">'
            f"<td>{_e(b.label)}{note}</td><td>{_e(b.address)}</td>"
            f'<td><span class="state state-{_e(state)}">{_e(state)}</span></td>'
            f'<td class="num">{b.failures}</td><td class="num">{b.depth}</td>'
            f"{_latency_cells(b)}</tr>")
    if not live:
        out.append('<tr><td colspan="9" class="muted">none</td></tr>')
    out.append("</tbody></table>")

    out.append(f'<h2>Pools</h2><table id="{prefix}pools"><thead><tr><th>pool</th><th>backends</th>'
               f"<th class=\"num\">queue</th>{_latency_heads()}</tr></thead><tbody>")
    for pool in snap.pools:
        members = ", ".join(
            f'{_e(label)} <span class="state state-{_e(state)}">{_e(state)}</span>'
            if state != backend_module.CONNECTED else _e(label)
            for label, state in pool.members)
        name = pool.name
        out.append(f'<tr data-pool="{_e(name)}"><td>{_e(name)}</td><td>{members}</td>'
                   f'<td class="num">{pool.depth}</td>{_latency_cells(pool)}</tr>')
    if not snap.pools:
        out.append('<tr><td colspan="7" class="muted">none</td></tr>')
    out.append("</tbody></table>")

    out.append(f'<h2>Recent reloads</h2><table id="{prefix}reloads"><thead><tr><th>when</th>'
               "<th>outcome</th><th>error</th></tr></thead><tbody>")
    for at, ok, error in reversed(snap.reloads):
        outcome = '<span class="ok">ok</span>' if ok \
            else '<span class="failed">failed, old routes kept</span>'
        out.append(f"<tr><td>{_when(at, now)}</td><td>{outcome}</td>"
                   f'<td class="error">{_e(error)}</td></tr>')
    if not snap.reloads:
        out.append('<tr><td colspan="3" class="muted">none since start</td></tr>')
    out.append("</tbody></table>")

    out.append("<h2>Traffic</h2><dl>")
    for name in _TRAFFIC:
        if name in general:
            out.append(f"<dt>{_e(name)}</dt><dd>{_e(stat_value(general[name]))}</dd>")
    out.append("</dl>")
    return "\n".join(out)


class StatusPage(Resource):
    """``/``: the status page; its children (``/metrics``) are put on it."""

    def __init__(self, take: TakeSnapshot) -> None:
        super().__init__()
        self.take = take

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return status_page(self.take()).encode()


class _QuietSite(Site):
    """A Site that writes no access log line per scrape."""

    noisy = False

    def log(self, request) -> None:
        pass


def quiet_site(root: Resource) -> Site:
    """The Site for ``root``: no access log lines, no tracebacks shown."""
    site = _QuietSite(root)
    site.displayTracebacks = False
    return site


def metrics_site(take: TakeSnapshot) -> Site:
    """The status page and ``/metrics`` of the proxy ``take`` snapshots."""
    root = StatusPage(take)
    root.putChild(b"metrics", MetricsPage(metrics_registry(take)))
    return quiet_site(root)


def metrics_service(take: TakeSnapshot, endpoint: str) -> Service:
    """A service serving the metrics and the status page on ``endpoint``."""
    return strports.service(endpoint, metrics_site(take))
