"""The client endpoints: their listener tags and listen backlog.

A ``--listen`` string is a Twisted server endpoint string, optionally after
a listener tag in memcached's ``-l`` form: ``tag_api_:tcp:11212`` or
``tag[api]:tcp:11212``. Connections of a tagged listener are routed by what
the config attaches under that tag (``mcp.attach(cmd, f, "api")``).

Twisted listens with a backlog of 50: a burst of new connections beyond it
waits for the client's SYN retransmit, a second or more. mcproxy listens
with memcached's default (``-b``, 1024) unless an endpoint string names its
own ``backlog=``. The kernel caps any backlog at ``net.core.somaxconn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

#: memcached's default listen backlog (its ``-b``).
DEFAULT_BACKLOG = 1024
#: Endpoint types whose strings take ``backlog=`` (Twisted's own parsers).
BACKLOG_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})
#: Where Linux keeps the ceiling on every listen backlog.
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


#: Longest listener tag (memcached's limit, for ``-l`` and ``mcp.attach``).
MAX_TAG = 8
#: How a listener tag opens, and the character that closes it.
TAG_FORMS = {"tag_": "_", "tag[": "]"}


class Listener(NamedTuple):
    """One ``--listen``: its tag (None: untagged) and endpoint string."""

    tag: str | None
    endpoint: str


def parse_listen(text: str) -> Listener:
    """The tag and endpoint of a ``--listen`` string; ValueError, naming
    what is wrong, for a malformed tag.

    A tag runs from ``tag_`` (or ``tag[``) to the next ``_`` (or ``]``),
    which a ``:`` and the endpoint follow; it is 1 to MAX_TAG printable
    characters other than ``:``. No Twisted endpoint type begins so.
    """
    close = TAG_FORMS.get(text[:4])
    if close is None:
        return Listener(None, text)
    end = text.find(close, 4)
    if end < 0 or text[end + 1:end + 2] != ":":
        raise ValueError(f"bad listener tag in {text!r}: write tag_NAME_:ENDPOINT "
                         "or tag[NAME]:ENDPOINT")
    tag = text[4:end]
    if not 1 <= len(tag) <= MAX_TAG:
        raise ValueError(f"listener tag {tag!r} must be 1 to {MAX_TAG} characters")
    if not all("!" <= char <= "~" and char != ":" for char in tag):
        raise ValueError(f"listener tag {tag!r} may hold only printable characters "
                         "other than space and ':'")
    return Listener(tag, text[end + 2:])


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
