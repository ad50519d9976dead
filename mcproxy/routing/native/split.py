"""The native runner of ``routes.split`` and routelib's ``route_split``
(see mcproxy.routing.native)."""

from __future__ import annotations

from functools import partial

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.direct import select_backend
from mcproxy.routing.native.allsync import uses_cas
from mcproxy.routing.native.common import (
    Done,
    KeysReply,
    RouteError,
    Runner,
    key_groups,
    lib_backend,
    route_failed,
)
from mcproxy.units import KeyBatch, ReplySink
from mcproxy.wire.request import BROADCAST_COMMANDS, Request
from mcproxy.wire.response import Response, client_bytes


def key_fraction(key: bytes) -> float:
    """A key's place in [0, 1), as routes.split's body computes it
    (FNV-1a, then murmur3's finalizer)."""
    h = 2166136261
    for byte in key:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h / 4294967296.0


def _ignore(res: Response) -> None:
    """The answer of a shadow, which nobody waits for."""


def _ignore_keys(parts: list[bytes]) -> None:
    """The answer of a shadow's keys, which nobody waits for."""


class Split(Runner):
    """``routes.split``: the request to the shadows in the background (only
    for keys under ``fraction``), then to the primary, whose answer is the
    route's; or routelib's ``route_split`` (``lib``: one shadow, child_b,
    every request). A broadcast command goes to Lua."""

    __slots__ = ("main", "shadows", "fraction", "lib")

    def __init__(self, main: Pool, shadows: list[Pool], fraction: float | None,
                 lib: bool) -> None:
        super().__init__([main, *shadows])
        self.main = main
        self.shadows = shadows
        self.fraction = fraction
        self.lib = lib

    def _shadowed(self, key: bytes) -> bool:
        fraction = self.fraction
        return fraction is None or key_fraction(key) < fraction

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would; False,
        with nothing done, for a request the body treats apart."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        if self.lib:
            for pool in self.shadows:
                target = lib_backend(pool, req)
                if target.__class__ is not Response:
                    target.send(req, _ignore)
            target = lib_backend(self.main, req)
            if target.__class__ is Response:
                stats.req_active -= 1
                done(client_bytes(target, req))
                return True
        else:
            if req.command in BROADCAST_COMMANDS:
                return False
            try:
                if self._shadowed(req.key):
                    for backend in [select_backend(pool, req) for pool in self.shadows]:
                        backend.send(req, _ignore)
                target = select_backend(self.main, req)
            except ValueError as e:
                route_failed(req, done, stats, route_error, e)
                return True

        def reply(res: Response) -> None:
            stats.req_active -= 1
            done(client_bytes(res, req))

        target.send(req, reply)
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """Route the keys of the client multiget ``req`` (see
        RouteEngine.route_keys): those shadowed to each shadow together in
        the background, all to the primary together; False, with nothing
        done, when they go key by key instead (a backend with a depth
        limit, a key a child cannot place, maybe a key kept for Lua)."""
        if self.depth_limited:
            return False
        guard = self.guard
        if guard is not None and guard in req.line:
            return False
        shadowed = [p for p, key in enumerate(keys) if self.lib or self._shadowed(key)]
        rounds = []
        for pool in self.shadows:
            groups, unplaced = key_groups(pool, keys, shadowed)
            if unplaced:
                return False
            rounds.append(groups)
        main, unplaced = key_groups(self.main, keys, range(len(keys)))
        if unplaced:
            return False
        count = len(keys)
        stats.count_keys(req.command, count)
        name = req.tokens[0]
        for groups in rounds:
            for backend, positions in groups.items():
                backend.send_unit(KeyBatch(name, [keys[p] for p in positions], _ignore_keys))
        reply = KeysReply(count, len(main), stats, done)
        for backend, positions in main.items():
            backend.send_unit(KeyBatch(name, keys if len(positions) == count else
                                       [keys[p] for p in positions],
                                       partial(reply.answer, positions), sink))
        return True


class AllAsync(Split):
    """``routes.all_async`` of a first pool and background pools: its body
    is routes.split's without a fraction, but for a request that uses a
    cas unique (its cas_use), which goes to Lua."""

    __slots__ = ()

    def __init__(self, main: Pool, shadows: list[Pool]) -> None:
        super().__init__(main, shadows, None, False)

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        if uses_cas(req) is not False:
            return False
        return super().send(req, done, stats, route_error)

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        if uses_cas(req) is not False:
            return False
        return super().send_keys(req, keys, done, stats, route_error, sink)
