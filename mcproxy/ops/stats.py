"""The proxy's figures as snapshots of plain data, and the ``stats`` replies made from them.

Counters are plain attributes bumped on the hot path (mcproxy.counters);
here they are read into snapshots when someone asks: lists of ``(name,
value)`` pairs with typed values for ``stats`` and ``stats proxy``, records
for backends and pools, and a :class:`Snapshot` holding it all. Every edge
formats from these: the ``stats`` text replies (here), Prometheus and the
status page (mcproxy.ops.web), and under ``--workers`` the supervisor, which
gets workers' snapshots as JSON data (:meth:`Snapshot.as_data`) and adds up
``stats workers`` with :func:`workers_stats`. Nothing is formatted as text
and parsed back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import time
from dataclasses import dataclass
from typing import Any

from mcproxy._version import __version__
from mcproxy.backends import latency
from mcproxy.counters import ProxyStats
from mcproxy.wire import errors
from mcproxy.wire.numbers import strtoul32
from mcproxy.wire.request import (
    CMD_ADD,
    CMD_APPEND,
    CMD_CAS,
    CMD_DECR,
    CMD_DELETE,
    CMD_GAT,
    CMD_GATS,
    CMD_GET,
    CMD_GETS,
    CMD_INCR,
    CMD_MA,
    CMD_MD,
    CMD_ME,
    CMD_MG,
    CMD_MN,
    CMD_MS,
    CMD_PREPEND,
    CMD_REPLACE,
    CMD_SET,
    CMD_TOUCH,
    COMMAND_NAMES,
)

#: What ``version`` and ``stats`` answer: the memcached release whose proxy
#: we follow, so that clients that check for meta-protocol support are satisfied.
VERSION = f"1.6.15-mcproxy-{__version__}"

#: A stats section: ``(name, value)`` in reply order; values are ints,
#: floats (seconds, written with six decimals as memcached does) or text.
Pairs = list[tuple[str, Any]]

#: The commands counted as ``cmd_*`` in ``stats proxy`` (the ids below
#: CMD_END_STORAGE), in memcached's proxy's order: the ids' order but for
#: ``prepend`` (id 20), which it lists after ``append``.
PROXY_CMD_ORDER = [CMD_MG, CMD_MS, CMD_MD, CMD_MN, CMD_MA, CMD_ME, CMD_GET, CMD_GAT, CMD_SET,
                   CMD_ADD, CMD_CAS, CMD_GETS, CMD_GATS, CMD_INCR, CMD_DECR, CMD_TOUCH,
                   CMD_APPEND, CMD_PREPEND, CMD_DELETE, CMD_REPLACE]


def stat_value(value: Any) -> str:
    """A value as a STAT line writes it: floats with six decimals."""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def format_stats(pairs: Pairs) -> bytes:
    """``STAT name value`` lines plus ``END``, as memcached writes them."""
    lines = [f"STAT {name} {stat_value(value)}\r\n" for name, value in pairs]
    lines.append("END\r\n")
    return "".join(lines).encode()


def general_stats(stats: ProxyStats, store_stats: dict, rejected: int,
                  worker_id: int | None = None) -> Pairs:
    """The figures of ``stats``: memcached's general stats and the proxy's;
    ``rejected`` connections (--max-connections), and under ``--workers``
    the answering worker's slot."""
    now = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [
        ("pid", os.getpid()),
        *([("worker_id", worker_id)] if worker_id is not None else []),
        ("uptime", int(now - stats.started)),
        ("time", int(now)),
        ("version", VERSION),
        ("pointer_size", 64),
        # getrusage counts microseconds: what memcached prints, exactly
        ("rusage_user", round(usage.ru_utime, 6)),
        ("rusage_system", round(usage.ru_stime, 6)),
        ("curr_connections", stats.curr_connections),
        ("total_connections", stats.total_connections),
        ("rejected_connections", rejected),
        ("proxy_conn_requests", stats.conn_requests),
        ("proxy_conn_errors", stats.conn_errors),
        ("proxy_conn_oom", stats.conn_oom),
        ("proxy_conn_output_closed", stats.conn_output_closed),
        ("proxy_req_active", stats.req_active),
        *store_stats.items(),
        ("proxy_config_reloads", stats.config_reloads),
        ("proxy_config_reload_fails", stats.config_reload_fails),
        ("proxy_backend_total", stats.backend_total),
        ("proxy_backend_marked_bad", stats.backend_marked_bad),
        ("proxy_backend_failed", stats.backend_failed),
        ("proxy_backend_mismatches", stats.backend_mismatches),
    ]


def proxy_stats(stats: ProxyStats, user_lines) -> Pairs:
    """The figures of ``stats proxy``: user stats, then per-command counts."""
    return [*user_lines,
            *((f"cmd_{COMMAND_NAMES[cmd]}", stats.commands[cmd]) for cmd in PROXY_CMD_ORDER)]


#: memcached's MAX_NUMBER_OF_SLAB_CLASSES: ``stats cachedump`` takes ids below it.
SLAB_CLASSES = 64


def dump_reply(args: list[bytes]) -> bytes | None:
    """memcached's answer to ``stats cachedump <class> <limit>`` and ``stats
    detail on|off|dump`` (``args`` after ``stats``), with nothing to dump:
    the embedded cache has no slab classes and keeps no per-prefix stats
    (``detail on`` and ``off`` change nothing). None for other arguments.
    """
    if args[0] == b"cachedump":
        if len(args) < 3:
            return errors.STATS_BAD_COMMAND_LINE
        slab_class = strtoul32(args[1])
        if slab_class is None or strtoul32(args[2]) is None:
            return errors.BAD_COMMAND_LINE
        return errors.END if slab_class < SLAB_CLASSES else errors.ILLEGAL_SLAB_ID
    if args[0] == b"detail":
        mode = args[1] if len(args) > 1 else b""
        if mode == b"dump":
            return errors.END
        return errors.OK if mode in (b"on", b"off") else errors.DETAIL_USAGE
    return None


#: Bytes a stat name or value must not contain: a STAT line is exactly three
#: space-separated fields (parsers such as memcached_exporter's split on " ").
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def _token(text: str) -> str:
    """``text`` made safe as one field of a STAT line."""
    return _UNSAFE.sub("_", text) or "_"


def backend_stats(backends) -> Pairs:
    """The lines of ``stats proxybe``: one per live backend.

    ``backends`` are objects with ``label``, ``host``, ``port``, ``state``,
    ``failures`` and ``depth`` (BackendFigures, or mcproxy's Backend). A line reads
    ``STAT <label>:<host>:<port> state=<state>,failures=<n>,depth=<n>``: the
    name is the backend's identity (label, host and port, as in memcached's
    backend cache), the value has no spaces, so every line keeps the
    three-field ``STAT name value`` shape. Sorted by name.
    """
    lines = []
    for backend in backends:
        name = _token(f"{backend.label}:{backend.host}:{backend.port}")
        value = (f"state={backend.state},failures={backend.failures},"
                 f"depth={backend.depth}")
        lines.append((name, value))
    lines.sort()
    return lines


#: ``stats`` lines that are not added up across workers in ``stats workers``.
NOT_SUMMED = frozenset({"pid", "worker_id", "uptime", "time", "version", "pointer_size"})
#: ``stats`` lines not shown per worker in ``stats workers``.
NOT_PER_WORKER = frozenset({"worker_id", "time", "version", "pointer_size"})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def workers_stats(own_id: int, own: Pairs, table: dict[int, Pairs],
                  restarts: int) -> Pairs:
    """The lines of ``stats workers``.

    ``workers`` (how many), ``worker_restarts``, then every worker's general
    stats as ``worker:<id>:<name>``, then each numeric figure added up over
    the workers under its own name. ``own`` are the answering worker's
    figures, current; ``table`` holds the others' by slot, as of their last
    report. A proxy without workers answers as worker 0 of 1.
    """
    table = {**table, own_id: own}
    lines: Pairs = [("workers", len(table)), ("worker_restarts", restarts)]
    totals: dict[str, int | float] = {}
    for slot in sorted(table):
        for name, value in table[slot]:
            if name not in NOT_PER_WORKER:
                lines.append((f"worker:{slot}:{name}", value))
            if name not in NOT_SUMMED and _is_number(value):
                totals[name] = totals.get(name, 0) + value
    lines += totals.items()
    return lines


# -- snapshots of one proxy, for the metrics, the status page and the supervisor ---------


def _latency(count: int, total: int, figures: dict[float, int] | None) -> dict:
    quantiles = None if figures is None else [figures[q] for q in latency.QUANTILES]
    return {"count": count, "total": total, "quantiles": quantiles}


@dataclass(frozen=True)
class BackendFigures:
    """One live backend. ``quantiles`` are reply times (µs) at
    latency.QUANTILES over its window, None while it is empty; ``count``
    and ``total`` (µs) are for ever."""

    label: str
    host: str
    port: str
    state: str
    failures: int
    depth: int
    in_config: bool
    count: int
    total: int
    quantiles: list[int] | None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def of(cls, backend: Any, in_config: bool) -> BackendFigures:
        window = backend.latency
        return cls(backend.label, backend.host, backend.port, backend.state,
                   backend.failures, backend.depth, in_config,
                   **_latency(window.count, window.total, window.percentiles()))


@dataclass(frozen=True)
class PoolFigures:
    """One pool of the active routes: its ``members`` as ``(label, state)``,
    the requests queued on them, and their latency windows taken as one."""

    name: str
    members: list[tuple[str, str]]
    depth: int
    count: int
    total: int
    quantiles: list[int] | None

    @classmethod
    def of(cls, name: str, pool: Any) -> PoolFigures:
        backends = pool.backends
        return cls(name, [(b.label, b.state) for b in backends],
                   sum(b.depth for b in backends),
                   **_latency(*latency.merged(b.latency for b in backends)))


@dataclass(frozen=True)
class Snapshot:
    """Everything one proxy process reports, as plain data (JSON-able:
    :meth:`as_data`, :meth:`from_data`).

    ``general`` and ``proxy`` are the figures of ``stats`` and ``stats
    proxy``; ``backends`` every live backend, ``pools`` those of the active
    routes (none without routes: ``routed`` is False); ``reloads`` the last
    loads of the config as ``(unix time, ok, error)``, oldest first.
    """

    pid: int
    started: float
    general: Pairs
    proxy: Pairs
    backends: list[BackendFigures]
    pools: list[PoolFigures]
    routed: bool
    config: str | None
    config_loaded: float | None
    reloads: list[tuple[float, bool, str]]

    def as_data(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_data(cls, data: dict) -> Snapshot:
        """The Snapshot of ``as_data``'s result, also once through JSON
        (which makes lists of its tuples)."""
        pools = [PoolFigures(**{**p, "members": [tuple(m) for m in p["members"]]})
                 for p in data["pools"]]
        return cls(**{**data,
                      "general": [tuple(pair) for pair in data["general"]],
                      "proxy": [tuple(pair) for pair in data["proxy"]],
                      "backends": [BackendFigures(**b) for b in data["backends"]],
                      "pools": pools,
                      "reloads": [tuple(r) for r in data["reloads"]]})


def snapshot(stats: ProxyStats, general: Pairs, user_lines: Pairs, live: list,
             routes: Any, config: str | None, config_loaded: float | None,
             reloads) -> Snapshot:
    """A Snapshot of a proxy: its counters, ``general`` (general_stats),
    its ``live`` backends and its active ``routes`` (routing's Routes, or
    None), whose ``pools`` name the pools they reach."""
    in_config = set(routes.backends) if routes is not None else set()
    return Snapshot(
        pid=os.getpid(), started=stats.started, general=general,
        proxy=proxy_stats(stats, user_lines),
        backends=[BackendFigures.of(b, b in in_config) for b in live],
        pools=[PoolFigures.of(name, pool)
               for name, pool in (routes.pools if routes is not None else ())],
        routed=routes is not None, config=config, config_loaded=config_loaded,
        reloads=[(r.at, r.ok, r.error) for r in reloads])
