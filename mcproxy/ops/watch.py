"""``watch proxyevents|proxyreqs|proxyuser``: log streams on the client port.

A client that sends ``watch STREAM ...`` gets ``OK\\r\\n`` and from then on
only log lines, one per event, in memcached's format::

    ts=1700000000.000123 gid=42 type=proxy_user msg=hello world\\n

The lines are rendered from ``twisted.logger`` events that carry a ``type``
field; the stream an event belongs to follows from its type
(:data:`STREAM_OF_TYPE`). An observer is on the global log publisher only
while at least one watcher exists, so without watchers logging costs what it
did before.

As in memcached:

* a line ends in a bare ``\\n`` (only the ``OK`` has ``\\r\\n``);
* values are written as they are, without quoting; the one field that may
  hold spaces (``msg=``, ``req=``) comes last (``\\r`` and ``\\n`` inside a
  value are escaped, so that an event is always one line);
* ``gid`` numbers the lines sent to watchers, so that lines merged from
  several watchers can be put back in order;
* a watcher that does not read its lines is not waited for: once Twisted
  holds about 64 KB unsent for it (the transport pauses its producer), its
  lines are skipped and counted, and the next line it gets after catching up
  is preceded by ``skipped=N\\n``;
* the connection no longer serves commands; what the client sends is read
  (so that a hang-up is noticed) and ignored;
* at most :data:`MAX_WATCHERS` watchers at a time.

Unlike memcached, the ``ts`` microseconds are zero-padded to six digits (so
the value reads as a decimal number), and stream names memcached has but the
proxy never produces (``fetchers``, ``mutations`` ...) answer ``ERROR``.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from mcproxy.backends.backend import LOG_MARKED_BAD, LOG_RECOVERED

# Streams, as bit flags (a watcher may ask for several).
PROXYEVENTS = 1
PROXYREQS = 2
PROXYUSER = 4

#: The stream names ``watch`` accepts.
STREAMS = {b"proxyevents": PROXYEVENTS, b"proxyreqs": PROXYREQS, b"proxyuser": PROXYUSER}

#: Which stream an event with this ``type`` field goes to.
STREAM_OF_TYPE = {
    "proxy_conf": PROXYEVENTS,
    "proxy_error": PROXYEVENTS,
    "proxy_backend": PROXYEVENTS,
    "proxy_req": PROXYREQS,
    "proxy_user": PROXYUSER,
}

#: memcached's WATCHER_LIMIT.
MAX_WATCHERS = 20
#: A rendered line is cut to this many bytes (memcached's scratch buffer).
MAX_LINE = 4096

# Replies to ``watch``, as memcached writes them.
OK = b"OK\r\n"
ERROR = b"ERROR\r\n"
TOO_MANY = b"WATCHER_TOO_MANY log watcher limit reached\r\n"

# What a backend event reports as its ``error=`` when it has no reason.
_BACKEND_ERROR_OF_FORMAT = {LOG_MARKED_BAD: "markedbad", LOG_RECOVERED: "recovered"}


def parse_streams(args: list[bytes]) -> int | None:
    """The stream flags ``watch ARGS`` asks for; None if it names none or
    an unknown one (memcached answers ``ERROR``)."""
    flags = 0
    for name in args:
        flag = STREAMS.get(name)
        if flag is None:
            return None
        flags |= flag
    return flags or None


def _value(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    else:
        value = str(value)
    if "\n" in value or "\r" in value:
        value = value.replace("\r", "\\r").replace("\n", "\\n")
    return value


def _fields(event: dict) -> list[tuple[str, Any]]:
    """The ``key=value`` pairs after ``type=`` for one event."""
    kind = event["type"]
    get = event.get
    if kind == "proxy_conf":
        return [("status", get("status", "unknown"))]
    if kind == "proxy_backend":
        error = _BACKEND_ERROR_OF_FORMAT.get(get("log_format")) or get("reason") or "closed"
        return [("error", error), ("name", get("host", "")), ("port", get("port", "")),
                ("label", get("label", "")), ("depth", get("requests", 0)),
                ("rbuf", get("rbuf", b""))]
    if kind == "proxy_req":
        return [("elapsed", get("elapsed", 0)), ("code", get("code", 0)),
                ("status", get("status", "")), ("detail", get("detail", "")),
                ("req", f"{get('command', '?')} {_value(get('key', b''))}")]
    # proxy_error, proxy_user, and anything else: the message.
    msg = get("msg")
    if msg is None:
        msg = get("error", "")
    return [("msg", msg)]


def render(event: dict, gid: int) -> bytes:
    """One event as a watcher line (with its ``\\n``)."""
    when = event.get("log_time") or 0.0
    sec = int(when)
    usec = int((when - sec) * 1_000_000)
    parts = [f"ts={sec}.{usec:06d} gid={gid} type={event['type']}"]
    parts.extend(f"{key}={_value(value)}" for key, value in _fields(event))
    line = " ".join(parts).encode("utf-8", "backslashreplace")
    if len(line) >= MAX_LINE:
        line = line[:MAX_LINE - 1]
    return line + b"\n"


def lines_of(event: dict, next_gid) -> list[bytes]:
    """The lines one event makes. A failed reload also reports its error, as
    a ``proxy_error`` line before the ``proxy_conf status=failed`` one."""
    if event["type"] == "proxy_conf" and event.get("status") == "failed" \
            and event.get("error"):
        error = {"type": "proxy_error", "log_time": event.get("log_time"),
                 "msg": event["error"]}
        return [render(error, next_gid()), render(event, next_gid())]
    return [render(event, next_gid())]


@implementer(IPushProducer)
class Watcher:
    """One watching connection: the transport's producer from ``OK`` on, so
    that Twisted tells it when the client falls behind and when it is gone."""

    def __init__(self, registry: WatchRegistry, transport, flags: int) -> None:
        self.registry = registry
        self.transport = transport
        self.flags = flags
        self.paused = False
        #: lines not sent since the client fell behind
        self.skipped = 0

    def send(self, line: bytes) -> None:
        if self.paused:
            self.skipped += 1
            return
        if self.skipped:
            line = b"skipped=%d\n" % self.skipped + line
            self.skipped = 0
        self.transport.write(line)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.registry.remove(self)


class WatchRegistry:
    """The watchers of one proxy, and the log observer that feeds them."""

    def __init__(self, reactor=None, publisher=globalLogPublisher) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.publisher = publisher
        self.watchers: list[Watcher] = []
        self._flags = 0
        self._gid = 0
        self._thread = threading.get_ident()
        self._observing = False
        self._in_observer = False

    def add(self, transport, args: list[bytes]) -> bytes | None:
        """Make the connection of ``transport`` a watcher of the streams in
        ``args``: None once it is one (its ``OK`` is written), else the error
        line to answer. The caller stops serving the connection on None."""
        flags = parse_streams(args)
        if flags is None:
            return ERROR
        if len(self.watchers) >= MAX_WATCHERS:
            return TOO_MANY
        watcher = Watcher(self, transport, flags)
        transport.unregisterProducer()
        transport.registerProducer(watcher, True)
        transport.write(OK)
        self.watchers.append(watcher)
        self._update()
        return None

    def remove(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
            self._update()

    def close(self) -> None:
        """Hang up on every watcher (the proxy is stopping)."""
        for watcher in list(self.watchers):
            watcher.transport.loseConnection()
        self.watchers.clear()
        self._update()

    def _update(self) -> None:
        flags = 0
        for watcher in self.watchers:
            flags |= watcher.flags
        self._flags = flags
        if flags and not self._observing:
            self._thread = threading.get_ident()
            self.publisher.addObserver(self.observe)
            self._observing = True
        elif not flags and self._observing:
            self.publisher.removeObserver(self.observe)
            self._observing = False

    def _next_gid(self) -> int:
        self._gid += 1
        return self._gid

    def observe(self, event: dict) -> None:
        """The log observer: send a typed event to the watchers of its stream."""
        kind = event.get("type")
        if kind.__class__ is not str:
            return
        stream = STREAM_OF_TYPE.get(kind)
        if stream is None or not stream & self._flags:
            return
        if threading.get_ident() != self._thread:
            self.reactor.callFromThread(self.observe, event)
            return
        if self._in_observer:
            return  # an event logged while writing to a watcher
        self._in_observer = True
        try:
            lines = lines_of(event, self._next_gid)
            for watcher in list(self.watchers):
                if watcher.flags & stream:
                    for line in lines:
                        watcher.send(line)
        finally:
            self._in_observer = False
