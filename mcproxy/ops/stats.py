"""Proxy-wide counters and the ``stats``, ``stats proxy`` and ``stats proxybe`` replies.

Pure: counters are plain attributes bumped on the hot path; formatting
happens only when a client asks.
"""

from __future__ import annotations

import os
import re
import resource
import time

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

#: The commands counted as ``cmd_*`` in ``stats proxy`` (the ids below
#: CMD_END_STORAGE), in memcached's proxy's order: the ids' order but for
#: ``prepend`` (id 20), which it lists after ``append``.
PROXY_CMD_ORDER = [CMD_MG, CMD_MS, CMD_MD, CMD_MN, CMD_MA, CMD_ME, CMD_GET, CMD_GAT, CMD_SET,
                   CMD_ADD, CMD_CAS, CMD_GETS, CMD_GATS, CMD_INCR, CMD_DECR, CMD_TOUCH,
                   CMD_APPEND, CMD_PREPEND, CMD_DELETE, CMD_REPLACE]


def format_stats(pairs) -> bytes:
    """``STAT name value`` lines plus ``END``, as memcached writes them."""
    lines = [f"STAT {name} {value}\r\n" for name, value in pairs]
    lines.append("END\r\n")
    return "".join(lines).encode()


def general_stats(stats: ProxyStats, version: str, store_stats: dict) -> list:
    """The reply to ``stats``: memcached's general stats and the proxy's."""
    now = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [
        ("pid", os.getpid()),
        ("uptime", int(now - stats.started)),
        ("time", int(now)),
        ("version", version),
        ("pointer_size", 64),
        ("rusage_user", f"{usage.ru_utime:.6f}"),
        ("rusage_system", f"{usage.ru_stime:.6f}"),
        ("curr_connections", stats.curr_connections),
        ("total_connections", stats.total_connections),
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


def proxy_stats(stats: ProxyStats, user_lines) -> list:
    """The reply to ``stats proxy``: user stats, then per-command counts."""
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


def backend_stats(backends) -> list:
    """The reply to ``stats proxybe``: one line per live backend.

    ``backends`` are objects with ``label``, ``host``, ``port``, ``state``,
    ``failures`` and ``depth`` (mcproxy's Backend). A line reads
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
