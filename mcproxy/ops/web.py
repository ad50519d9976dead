"""The operator's HTTP endpoint (``--metrics``): Prometheus metrics and a status page.

``/metrics`` is the Prometheus text exposition of everything ``stats`` and
``stats proxy`` report, plus per-backend state, failures, queue depth and
reply latency, and per-pool latency. ``/`` is a plain HTML page with the
same figures for a human, and the config's recent reloads.

Both are rendered in the reactor thread, from the live objects, when they
are requested: prometheus_client's own Twisted resource runs collectors in
a thread pool, where reading the backend registry or a Lua state would race
the reactor.

Under ``--workers`` each worker renders its figures here when the
supervisor asks, and the supervisor serves them (mcproxy.ops.webworkers).
"""

from __future__ import annotations

import html
import os
import time
import weakref
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
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcproxy.app.service import VERSION, ProxyService
from mcproxy.backends import backend as backend_module
from mcproxy.backends import latency

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

# -- pools -------------------------------------------------------------------

#: Lua, run in a routes state: breadth-first over what the route functions
#: (and the globals) reach, the pool proxies mcp_config_pools handed to
#: mcp_config_routes, each with the name it is reached by (``p.cache.main``
#: in a route is "cache.main"; a local ``main = p.main`` is "main").
_FIND_POOLS = """
function(roots, limit)
    local getupvalue, getmetatable, rawget, next, type, tostring =
        debug.getupvalue, getmetatable, rawget, next, type, tostring
    local seen, queue, found = {}, {}, {}
    local head, tail = 1, 0
    local function push(value, name, upvalue)
        local t = type(value)
        if (t == "table" or t == "function") and not seen[value] and tail < limit then
            seen[value] = true
            tail = tail + 1
            queue[tail] = { value, name, upvalue }
        end
    end
    for _, root in next, roots do push(root) end
    while head <= tail do
        local value, name, upvalue = queue[head][1], queue[head][2], queue[head][3]
        head = head + 1
        if type(value) == "function" then
            local i = 1
            while true do
                local uname, uvalue = getupvalue(value, i)
                if uname == nil then break end
                push(uvalue, uname, true)
                i = i + 1
            end
        else
            local mt = getmetatable(value)
            if type(mt) == "table" and rawget(mt, "__name") == "mcp.pool_proxy" then
                found[#found + 1] = { name or "", rawget(value, "_p") }
            else
                -- a table held by an upvalue or a global: its keys name what it holds
                local prefix = (not upvalue) and name or nil
                for key, item in next, value do
                    local kt = type(key)
                    if kt == "string" or kt == "number" then
                        key = tostring(key)
                        push(item, prefix and (prefix .. "." .. key) or key)
                    end
                end
            end
        end
    end
    return found
end
"""

#: At most this many Lua tables and functions are visited per config.
_FIND_POOLS_LIMIT = 50_000

_pools_of: weakref.WeakKeyDictionary[Any, list[tuple[str, Any]]] = weakref.WeakKeyDictionary()


def pools(routes: Any) -> list[tuple[str, Any]]:
    """``(name, Pool)`` of every pool the loaded config's routes can reach.

    Pools have no names of their own (as in memcached); a pool is named by
    the key the routes reach it by. Found once per loaded config.
    """
    if routes is None:
        return []
    found = _pools_of.get(routes)
    if found is None:
        found = []
        try:
            runtime = routes.state.runtime
            roots = runtime.table_from([*routes.hooks.values(), routes.state.globals])
            result = runtime.eval(_FIND_POOLS)(roots, _FIND_POOLS_LIMIT)
            seen: set[int] = set()
            names: set[str] = set()
            for i in range(1, len(result) + 1):
                name, pool = result[i][1], result[i][2]
                if pool is None or id(pool) in seen or not hasattr(pool, "backends"):
                    continue
                seen.add(id(pool))
                name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                if not name or name in names:
                    name = f"{name or 'pool'}#{len(found) + 1}"
                names.add(name)
                found.append((name, pool))
        except Exception:
            Logger().failure("could not list the pools of {path}", path=routes.path)
        _pools_of[routes] = found
    return found


# -- figures shared by both pages ----------------------------------------------

def _seconds(micros: float) -> float:
    return micros / 1e6


def stats_lines(service: ProxyService, *args: bytes) -> list[tuple[str, str]]:
    """``(name, value)`` of what ``stats [args]`` answers a client.

    Taken from the reply itself, so that both pages show exactly the
    counters the stats command does.
    """
    pairs = []
    for line in service.stats_reply(list(args)).decode().splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            pairs.append((parts[1], parts[2]))
    return pairs


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _address(backend: Any) -> str:
    return f"{backend.host}:{backend.port}"


# -- Prometheus --------------------------------------------------------------

class ProxyCollector:
    """A prometheus_client collector over a running ProxyService."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service

    def collect(self):
        service = self.service
        yield InfoMetricFamily(PREFIX + "build", "mcproxy version",
                               value={"version": VERSION})
        for name, value in stats_lines(service):
            number = _number(value)
            if name in SKIPPED_STATS or number is None:
                continue
            doc = f"memcached stat {name}"
            if name in GAUGE_STATS:
                yield GaugeMetricFamily(PREFIX + name, doc, value=number)
            else:
                yield CounterMetricFamily(PREFIX + name, doc, value=number)

        commands = CounterMetricFamily(PREFIX + "cmd", "stats proxy cmd_*: requests "
                                       "routed through Lua, per command", labels=["cmd"])
        user = GaugeMetricFamily(PREFIX + "user_stat", "stats proxy user_*: the "
                                 "config's mcp.add_stat counters", labels=["name"])
        for name, value in stats_lines(service, b"proxy"):
            number = _number(value)
            if number is None:
                continue
            if name.startswith("cmd_"):
                commands.add_metric([name.removeprefix("cmd_")], number)
            elif name.startswith("user_"):
                user.add_metric([name.removeprefix("user_")], number)
        yield from (commands, user)

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
        for backend in service.registry.live:
            values = [backend.label, _address(backend)]
            if tuple(values) in seen:  # the same backend marked down and up
                continue
            seen.add(tuple(values))
            current = backend.state
            for name in BACKEND_STATES:
                state.add_metric([*values, name], 1 if name == current else 0)
            failures.add_metric(values, backend.failures)
            depth.add_metric(values, backend.depth)
            window = backend.latency
            _add_summary(replies, values, window.count, window.total, window.percentiles())
        yield from (state, failures, depth, replies)

        pool_replies = SummaryMetricFamily(PREFIX + "pool_latency_seconds", "reply "
                                           "latency of the pool's backends; quantiles over "
                                           f"their last {latency.WINDOW} replies each",
                                           labels=["pool"])
        for name, pool in pools(service.engine.routes):
            count, total, figures = latency.merged(b.latency for b in pool.backends)
            _add_summary(pool_replies, [name], count, total, figures)
        yield pool_replies


def _add_summary(family: SummaryMetricFamily, values: list[str], count: int,
                 total: int, figures: dict[float, int] | None) -> None:
    labels = dict(zip(family._labelnames, values, strict=True))
    for q in latency.QUANTILES:
        value = _seconds(figures[q]) if figures else float("nan")
        family.add_sample(family.name, {**labels, "quantile": str(q)}, value)
    family.add_metric(values, count, _seconds(total))


def metrics_registry(service: ProxyService) -> CollectorRegistry:
    """A registry with the proxy's metrics and the process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(service))
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


def _latency_cells(count: int, figures: dict[float, int] | None) -> str:
    cells = [f'<td class="num">{count}</td>']
    for q in latency.QUANTILES:
        cells.append(f'<td class="num">{_micros(figures[q] if figures else None)}</td>')
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


def status_page(service: ProxyService) -> str:
    """The status page's HTML."""
    now = time.time()
    return page(page_sub(os.getpid(), service.stats.started, now),
                status_sections(service, now))


def status_sections(service: ProxyService, now: float, prefix: str = "") -> str:
    """The status page's body for one proxy: its verdict, config, backends,
    pools, reloads and traffic. ``prefix`` starts every element id, so that
    one page can hold several proxies (the workers of ``--workers``)."""
    stats = service.stats
    routes = service.engine.routes
    live = service.registry.live
    in_config = set(routes.backends) if routes is not None else set()
    problems = [b for b in live if b.state != backend_module.CONNECTED]
    bad = [b for b in live if b.state in (backend_module.BAD, backend_module.CLOSED)]

    if not live:
        summary = ("ok", "no backends" if routes is not None
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
    out.append(f'<dt>file</dt><dd id="{prefix}config-path">{_e(service.config or "none")}</dd>')
    out.append(f"<dt>loaded</dt><dd>{_when(service.config_loaded, now)}</dd>")
    out.append(f"<dt>reloads</dt><dd>{stats.config_reloads} "
               f"({stats.config_reload_fails} failed)</dd></dl>")

    out.append(f'<h2>Backends</h2><table id="{prefix}backends"><thead><tr><th>backend</th>'
               "<th>address</th><th>state</th><th class=\"num\">failures</th>"
               f"<th class=\"num\">queue</th>{_latency_heads()}</tr></thead><tbody>")
    for b in live:
        state = b.state
        note = "" if b in in_config else ' <span class="muted">(not in config)</span>'
        row_class = ' class="problem"' if state != backend_module.CONNECTED else ""
        out.append(
            f'<tr{row_class} data-backend="{_e(b.label)}" data-state="{_e(state)}">'
            f"<td>{_e(b.label)}{note}</td><td>{_e(_address(b))}</td>"
            f'<td><span class="state state-{_e(state)}">{_e(state)}</span></td>'
            f'<td class="num">{b.failures}</td><td class="num">{b.depth}</td>'
            f"{_latency_cells(b.latency.count, b.latency.percentiles())}</tr>")
    if not live:
        out.append('<tr><td colspan="9" class="muted">none</td></tr>')
    out.append("</tbody></table>")

    found = pools(routes)
    out.append(f'<h2>Pools</h2><table id="{prefix}pools"><thead><tr><th>pool</th><th>backends</th>'
               f"<th class=\"num\">queue</th>{_latency_heads()}</tr></thead><tbody>")
    for name, pool in found:
        count, _total, figures = latency.merged(b.latency for b in pool.backends)
        members = ", ".join(
            f'{_e(b.label)} <span class="state state-{_e(b.state)}">{_e(b.state)}</span>'
            if b.state != backend_module.CONNECTED else _e(b.label)
            for b in pool.backends)
        queued = sum(b.depth for b in pool.backends)
        out.append(f'<tr data-pool="{_e(name)}"><td>{_e(name)}</td><td>{members}</td>'
                   f'<td class="num">{queued}</td>{_latency_cells(count, figures)}</tr>')
    if not found:
        out.append('<tr><td colspan="7" class="muted">none</td></tr>')
    out.append("</tbody></table>")

    out.append(f'<h2>Recent reloads</h2><table id="{prefix}reloads"><thead><tr><th>when</th>'
               "<th>outcome</th><th>error</th></tr></thead><tbody>")
    for record in reversed(service.reloads):
        outcome = '<span class="ok">ok</span>' if record.ok \
            else '<span class="failed">failed, old routes kept</span>'
        out.append(f"<tr><td>{_when(record.at, now)}</td><td>{outcome}</td>"
                   f'<td class="error">{_e(record.error)}</td></tr>')
    if not service.reloads:
        out.append('<tr><td colspan="3" class="muted">none since start</td></tr>')
    out.append("</tbody></table>")

    general = dict(stats_lines(service))
    out.append("<h2>Traffic</h2><dl>")
    for name in _TRAFFIC:
        if name in general:
            out.append(f"<dt>{_e(name)}</dt><dd>{_e(general[name])}</dd>")
    out.append("</dl>")
    return "\n".join(out)


class StatusPage(Resource):
    """``/``: the status page; its children (``/metrics``) are put on it."""

    def __init__(self, service: ProxyService) -> None:
        super().__init__()
        self.service = service

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return status_page(self.service).encode()


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


def metrics_site(service: ProxyService) -> Site:
    root = StatusPage(service)
    root.putChild(b"metrics", MetricsPage(metrics_registry(service)))
    return quiet_site(root)


def metrics_service(service: ProxyService, endpoint: str) -> Service:
    """A service serving the metrics and the status page on ``endpoint``."""
    return strports.service(endpoint, metrics_site(service))
