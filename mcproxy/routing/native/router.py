"""The native runner of a router (V2's ``mcp.router_new``, routelib's
``routes{ map = ... }``, routes.prefix_router) whose routes are not all
pools (see mcproxy.routing.native; a router of pools only is direct.py's
KeyRouter)."""

from __future__ import annotations

from functools import partial

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing import direct
from mcproxy.routing.native.common import Done, KeysReply, RouteError, Runner
from mcproxy.routing.routerkey import name_finder
from mcproxy.routing.shapes import Shape
from mcproxy.units import KeyBatch, ReplySink
from mcproxy.wire.request import Request

_EMPTY = b""


class Router(Runner):
    """A router whose routes are each a pool (sent to as the direct path
    does), a native runner, or None: Lua runs the request, the router's
    own body included, as it does for a key with no route and no default."""

    __slots__ = ("name_of", "routes", "default")

    def __init__(self, router: Shape, routes: dict, default) -> None:
        super().__init__([target for target in (*routes.values(), default)
                          if isinstance(target, Pool)])
        #: key -> its route name, or None (routerkey.name_finder)
        self.name_of = name_finder(router)
        #: route name -> its target
        self.routes = routes
        self.default = default

    def target(self, key: bytes):
        """What serves ``key``: the target of its route name, else the
        default."""
        name = self.name_of(key)
        if name is None:
            return self.default
        return self.routes.get(name, self.default)

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the router's Lua body
        would; False, with nothing done, when Lua runs it (a route of Lua,
        no route, a request kept for Lua)."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        target = self.target(req.key)
        if target is None:
            return False
        if target.__class__ is Pool:
            direct.send(target, req, done, stats, route_error)
            return True
        return target.send(req, done, stats, route_error)

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """Route the keys of the client multiget ``req`` together (see
        RouteEngine.route_keys) when they all go to pools (one backend
        multiget per backend) or all to one native runner (which sends them
        together); False, with nothing done, when they go key by key (any
        other mix, a backend of a pool with a depth limit, a key a pool
        cannot place, maybe a key kept for Lua)."""
        guard = self.guard
        if guard is not None and guard in req.line:
            return False
        targets = [self.target(key) for key in keys]
        first = targets[0]
        if first is None:
            return False
        if first.__class__ is not Pool:
            if targets.count(first) != len(targets):
                return False
            return first.send_keys(req, keys, done, stats, route_error, sink)
        if self.depth_limited:
            return False
        groups: dict = {}
        try:
            for position, (key, target) in enumerate(zip(keys, targets, strict=True)):
                if target.__class__ is not Pool:
                    return False
                backend = target.select(key)
                mine = groups.get(backend)
                if mine is None:
                    groups[backend] = [position]
                else:
                    mine.append(position)
        except ValueError:
            return False  # routed key by key, each key gets its error
        count = len(keys)
        stats.count_keys(req.command, count)
        reply = KeysReply(count, len(groups), stats, done)
        name = req.tokens[0]
        for backend, positions in groups.items():
            backend.send_unit(KeyBatch(name, [keys[p] for p in positions],
                                       partial(reply.answer, positions), sink))
        return True
