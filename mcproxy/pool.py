"""Pools of backends, and the registry that makes equal backends one object.

A :class:`Pool` maps a key to one of its backends with the distribution and
key hasher ``mcp.pool`` was given (mcproxy.hashing does the arithmetic). The
:class:`BackendRegistry` keeps one Backend per label, host and port: asking
again for the same three returns the same object (and so the same
connection and queue), also across reloads; it closes a backend once no
loaded config that is still in use holds it and nothing is in flight on it.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.logger import Logger

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


def _identity(label: str, host: str, port: str, options: BackendOptions) -> tuple:
    """What makes two ``mcp.backend`` calls the same backend object."""
    return (label, host, port, options.down, options.tls, options.tls_ca,
            options.tls_verify, options.tls_hostname)


class BackendRegistry:
    """Every live backend, by label, host and port.

    A config load asks for its backends with :meth:`get`; once the load has
    succeeded, :meth:`use` ties them to the loaded config (the engine's
    ``Routes``) for as long as that object lives, which is as long as it is
    active or a request that started on it is unfinished. A backend that no
    such config holds is closed as soon as its queue is empty, so that
    requests in flight on it, or sent to it by the old routes, still get
    their answers. Until then :meth:`get` hands it out again, so a backend
    that a reload removes and the next one brings back stays one object.

    Backends connect only once the registry is started and a config using
    them is in use: checking a config, or a load that fails, opens nothing.
    """

    log = Logger()

    #: Seconds between two looks at unused backends still busy.
    DRAIN_INTERVAL = 0.1

    def __init__(self, stats: ProxyStats, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.stats = stats
        self.reactor = reactor
        self.connecting = False
        self._backends: dict[tuple, Backend] = {}
        #: loaded config -> the backends it may send to
        self._users: weakref.WeakKeyDictionary[Any, list[Backend]] = (
            weakref.WeakKeyDictionary())
        self._sweep_call: Any = None

    @property
    def live(self) -> list[Backend]:
        """Every backend not closed yet, including unused ones still draining."""
        return list(self._backends.values())

    def get(self, label: str, host: str, port: str,
            options: BackendOptions) -> Backend:
        """The backend for label/host/port, created (unconnected) if new.

        An existing backend keeps its connection; the loader hands it the
        new options once the whole load has succeeded. ``down`` and the TLS
        settings are part of the identity: changing them makes a new object
        with a new connection (a kept connection could not take them).
        """
        key = _identity(label, host, port, options)
        backend = self._backends.get(key)
        if backend is None:
            backend = Backend(label, host, port, options, self.stats,
                              reactor=self.reactor)
            self._backends[key] = backend
            self.stats.backend_total += 1
        return backend

    def start(self) -> None:
        """Connect the backends in use, and those put in use from now on."""
        self.connecting = True
        for backends in list(self._users.values()):
            for backend in backends:
                backend.connect()

    def use(self, config: Any, backends: list[Backend]) -> None:
        """Hold ``backends`` open for as long as ``config`` lives.

        ``config`` must be weakly referenceable. Backends nobody holds any
        more are closed (now, or once drained).
        """
        self._users[config] = list(backends)
        if self.connecting:
            for backend in backends:
                backend.connect()
        self.sweep()

    def sweep(self) -> None:
        """Close every backend no config holds and nothing is in flight on.

        Looks again later while an unused backend is still busy or an old
        config is still alive (its last requests may still be running).
        """
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        users = list(self._users.values())
        held = {b for backends in users for b in backends}
        busy = len(users) > 1
        for backend in [b for b in self._backends.values() if b not in held]:
            if backend.depth:
                busy = True
            else:
                self._close(backend)
                self.log.info("backend {label} ({host}:{port}) closed: "
                              "no longer in the config", label=backend.label,
                              host=backend.host, port=backend.port,
                              type="proxy_backend")
        if busy:
            self._sweep_call = self.reactor.callLater(self.DRAIN_INTERVAL, self.sweep)

    def _close(self, backend: Backend):
        del self._backends[_identity(backend.label, backend.host, backend.port,
                                     backend.options)]
        self.stats.backend_total -= 1
        return backend.close()

    def close(self) -> list:
        """Close every backend (service shutdown); Deferreds of the closes."""
        self.connecting = False
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        self._users.clear()
        return [self._close(b) for b in list(self._backends.values())]
