"""Pools of backends, and the registry that makes equal backends one object.

A :class:`Pool` maps a key to one of its backends with the distribution and
key hasher ``mcp.pool`` was given (mcproxy.backends.hashing does the arithmetic). The
:class:`BackendRegistry` keeps one Backend per label, host and port: asking
again for the same three returns the same object (and so the same
connection and queue), also across reloads; it closes a backend once no
loaded config that is still in use holds it and nothing is in flight on it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from mcproxy.backends import hashing
from mcproxy.backends.backend import Backend
from mcproxy.backends.options import BackendOptions
from mcproxy.counters import ProxyStats
from mcproxy.wire import errors
from mcproxy.wire.request import CMD_FLUSH_ALL, CMD_VERBOSITY, Request, parse_request
from mcproxy.wire.response import (
    MCMC_CODE_OK,
    MCMC_RESP_ERRMSG,
    MCMC_RESP_GENERIC,
    Response,
    parse_response,
)


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

    def broadcast(self) -> Broadcast:
        """Every backend of the pool, for a command sent to each of them."""
        return Broadcast(self.backends)


#: What a backend failed to do, in BROADCAST_FAILED, by command.
_BROADCAST_VERBS = {CMD_FLUSH_ALL: b"flush", CMD_VERBOSITY: b"set verbosity"}


class Broadcast:
    """Backends as one destination for the commands that address whole
    servers (``request.BROADCAST_COMMANDS``): what ``pool(r)`` sends such a
    request to, and the proxy's default for ``flush_all``.

    A request sent to it goes to each backend once (``backends`` holds
    each once, in order), through that backend's queue, so it keeps its
    place among the other requests on the connection. The callback gets one
    response: the first ``OK`` when every backend said ``OK``; the error
    line they all gave, when they all gave the same one (memcached refuses
    the request itself, e.g. ``flush_all x``); else a failure whose line
    (``errors.BROADCAST_FAILED``) says how many did not. ``store`` (the
    embedded cache) gets the request first, at once; it answers only when
    there are no backends.
    """

    __slots__ = ("backends", "store")

    def __init__(self, backends: Iterable[Backend], store: Any = None) -> None:
        self.backends = list(dict.fromkeys(backends))
        self.store = store

    @classmethod
    def of(cls, pools: Iterable[Pool | Broadcast], store: Any = None) -> Broadcast:
        """Every backend of ``pools``, each once also if in several."""
        return cls([backend for pool in pools for backend in pool.backends], store)

    def broadcast(self) -> Broadcast:
        return self

    def send(self, request: Request, callback: Callable[[Response], None]) -> None:
        answer = None
        if self.store is not None:
            clean = parse_request(request.wire_line())  # noreply removed
            parsed = parse_response(self.store.execute(clean))
            answer = parsed[0] if parsed else None
        backends = self.backends
        if not backends:
            callback(answer or Response(True, MCMC_CODE_OK, MCMC_RESP_GENERIC, errors.OK))
            return
        collect = _Answers(len(backends), request.command, callback)
        for backend in backends:
            backend.send(request, collect.arrived)


class _Answers:
    """Collects the answers of one Broadcast (see there) into one."""

    __slots__ = ("total", "command", "callback", "responses")

    def __init__(self, total: int, command: int, callback: Callable[[Response], None]) -> None:
        self.total = total
        self.command = command
        self.callback = callback
        self.responses: list[Response] = []

    def arrived(self, res: Response) -> None:
        responses = self.responses
        responses.append(res)
        if len(responses) < self.total:
            return
        first = responses[0]
        failed = sum(not res.ok or res.line != errors.OK for res in responses)
        if not failed or (first.ok and first.type == MCMC_RESP_ERRMSG
                          and all(res.ok and res.line == first.line for res in responses)):
            result = first
        else:
            verb = _BROADCAST_VERBS[self.command]
            result = Response.failure(
                "broadcast", errors.BROADCAST_FAILED % (failed, self.total, verb))
        result.elapsed = max(res.elapsed for res in responses)
        self.callback(result)


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
