"""The listen backlog of the client endpoints.

Twisted listens with a backlog of 50: a burst of new connections beyond it
waits for the client's SYN retransmit, a second or more. mcproxy listens
with memcached's default (``-b``, 1024) unless an endpoint string names its
own ``backlog=``. The kernel caps any backlog at ``net.core.somaxconn``.
"""

from __future__ import annotations

from pathlib import Path

#: memcached's default listen backlog (its ``-b``).
DEFAULT_BACKLOG = 1024
#: Endpoint types whose strings take ``backlog=`` (Twisted's own parsers).
BACKLOG_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})
#: Where Linux keeps the ceiling on every listen backlog.
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def _fields(description: str) -> list[str]:
    """The colon-separated fields of an endpoint string, as Twisted splits
    them (a backslash escapes the next character)."""
    fields: list[str] = []
    field: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            field.append(char)
            escaped = False
        elif char == "\\":
            field.append(char)
            escaped = True
        elif char == ":":
            fields.append("".join(field))
            field = []
        else:
            field.append(char)
    fields.append("".join(field))
    return fields


def with_backlog(description: str, backlog: int) -> str:
    """``description`` listening with ``backlog``, unless it is not an
    endpoint type that takes one or already says ``backlog=``."""
    kind, *args = _fields(description)
    if kind not in BACKLOG_ENDPOINTS or any(arg.partition("=")[0] == "backlog" for arg in args):
        return description
    return f"{description}:backlog={backlog}"


def somaxconn() -> int | None:
    """The kernel's cap on listen backlogs, where it can be read (Linux)."""
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None
