"""Pools of backends, and the registry that makes equal backends one object.

A :class:`Pool` maps a key to one of its backends with the distribution and
key hasher ``mcp.pool`` was given (mcproxy.hashing does the arithmetic). The
:class:`BackendRegistry` keeps one Backend per label: asking again for the
same label, host and port returns the same object (and so the same
connection), also across reloads.
"""

from __future__ import annotations

from typing import Any

from mcproxy import hashing
from mcproxy.protocols.backend import Backend, BackendOptions
from mcproxy.stats import ProxyStats


class PoolOptionError(ValueError):
    """An ``mcp.pool`` option is wrong; the text is the Lua error."""


def _marker(value: Any, field: str) -> str | None:
    """The Python-side name behind an mcp.dist_* / mcp.hash_* table."""
    try:
        name = value[field.encode()]
    except (TypeError, KeyError, AttributeError):
        return None
    return name.decode() if isinstance(name, bytes) else None


def _text(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise PoolOptionError(f"mcp.pool: '{what}' must be a string")
    return value


class Pool:
    """An ordered list of backends and the rule that picks one per key."""

    __slots__ = ("backends", "_select")

    def __init__(self, backends: list[Backend], options: dict[str, Any]) -> None:
        self.backends = backends
        dist = "jump"
        hasher = "xxh3"
        if "dist" in options:
            dist = _marker(options["dist"], "_dist")
            if dist is None:
                raise PoolOptionError("key distribution object missing 'new' function")
        if "hash" in options:
            hasher = _marker(options["hash"], "_hasher")
            if hasher is None:
                raise PoolOptionError("mcp.pool: 'hash' must be an mcp hasher")
        seed = 0
        if "seed" in options:
            seed = hashing.pool_seed(_text(options["seed"], "seed"))
        key_filter = None
        if "filter" in options:
            key_filter = hashing.make_filter(_text(options["filter"], "filter"),
                                             options.get("filter_conf"))
        servers = [(b.host, b.port) for b in backends]
        omode = options.get("omode", b"default")
        obuckets = options.get("obuckets", hashing.DEFAULT_OBUCKETS)
        self._select = hashing.make_selector(
            dist, hasher, seed, key_filter, servers,
            omode=omode.decode() if isinstance(omode, bytes) else omode,
            obuckets=obuckets)

    def select(self, key: bytes) -> Backend:
        """The backend that serves ``key``; ValueError if there is none."""
        return self.backends[self._select(key)]


class BackendRegistry:
    """Every live backend, by label."""

    def __init__(self, stats: ProxyStats, reactor=None) -> None:
        self.stats = stats
        self.reactor = reactor
        self.by_label: dict[str, Backend] = {}
        #: every backend not yet closed, including replaced ones
        self.live: list[Backend] = []
        self.connecting = False

    def get(self, label: str, host: str, port: str,
            options: BackendOptions) -> Backend:
        """The backend for label/host/port; a new one starts connecting once
        the registry is started."""
        backend = self.by_label.get(label)
        if backend is not None and backend.host == host and backend.port == port:
            return backend
        backend = Backend(label, host, port, options, self.stats, reactor=self.reactor)
        self.by_label[label] = backend
        self.live.append(backend)
        self.stats.backend_total += 1
        if self.connecting:
            backend.connect()
        return backend

    def start(self) -> None:
        """Connect every backend created so far, and new ones from now on."""
        self.connecting = True
        for backend in self.live:
            backend.connect()

    def retain(self, keep: list[Backend]) -> None:
        """Close every backend that ``keep`` does not hold."""
        wanted = {id(b) for b in keep}
        for backend in [b for b in self.live if id(b) not in wanted]:
            self._close(backend)

    def _close(self, backend: Backend):
        self.live.remove(backend)
        if self.by_label.get(backend.label) is backend:
            del self.by_label[backend.label]
        self.stats.backend_total -= 1
        return backend.close()

    def close(self) -> list:
        """Close every backend (service shutdown); Deferreds of the closes."""
        self.connecting = False
        return [self._close(b) for b in list(self.live)]
