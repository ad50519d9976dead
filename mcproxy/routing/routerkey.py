"""A V2 router's choice in Python: the route name in a key, and a router
whose every route is a pool, used as one.

``mcp.router_new`` (v2.lua) picks a funcgen by a part of the key: in
prefix mode what comes before its stop string, in anchor mode what comes
between a leading start string and the stop string after it.
:func:`route_name` finds that part exactly as v2.lua's ``route`` does
(tests/routing/test_native_router.py compares the two over generated
keys); :class:`KeyRouter` is what the direct path (direct.py) sends to
when each route of a router, its default too, sends to one pool.
"""

from __future__ import annotations

from mcproxy.backends.pool import Pool
from mcproxy.routing.shapes import Shape
from mcproxy.wire.request import CMD_ANY_STORAGE, KEYLESS_COMMANDS


def route_name(key: bytes, start: bytes | None, stop: bytes) -> bytes | None:
    """The route name of ``key`` for a router of ``start`` (None: prefix
    mode) and ``stop``; None where v2.lua's router takes its default (no
    name, or an empty one). Positions below are Lua's, from 1, so that they
    read as v2.lua's."""
    size = len(key)
    width = len(stop)
    if start is None:
        first = 1
    elif len(start) == 1 and width == 1:
        if key[:1] != start:
            return None
        first = 2
    else:
        # a long anchor: its stop is always matched as a long one
        if len(start) + 2 > size or not key.startswith(start):
            return None
        first = len(start) + 1
        at = key.find(stop, first - 1) + 1
        if at == 0 or at > size - width:
            return None
        return key[first - 1:at - 1] or None
    at = key.find(stop, first - 1) + 1
    if at == 0 or (width > 1 and at > size - width):
        return None
    return key[first - 1:at - 1] or None


def routes_of(router: Shape, command: int) -> tuple[dict, Shape | None] | None:
    """What a router shape does with ``command`` requests: route name ->
    the route of that name (a Shape; not one: Lua runs it), and the default
    (None: none, or not a Shape); None for a command without key (the
    router has no route for it)."""
    if command in KEYLESS_COMMANDS:
        return None
    default = router.fields.get("default")
    routes = {}
    for name, target in router.fields.get("map", {}).items():
        if not isinstance(name, bytes):
            continue  # a name no key has
        if isinstance(target, dict):  # a command map
            if command in target:
                target = target[command]
            else:
                target = target.get(CMD_ANY_STORAGE, default)
        routes[name] = target
    return routes, default if isinstance(default, Shape) else None


class KeyRouter:
    """A router whose routes each send to one pool: the pool of a key's
    route name, else the default's. It stands for a pool where direct.py
    takes one (``select``, ``backends``)."""

    __slots__ = ("start", "stop", "pools", "default", "backends", "identity")

    def __init__(self, start: bytes | None, stop: bytes, pools: dict[bytes, Pool],
                 default: Pool) -> None:
        self.start = start
        self.stop = stop
        #: route name -> its pool
        self.pools = pools
        self.default = default
        #: every backend of its pools, once each
        self.backends = list(dict.fromkeys(
            backend for pool in (*pools.values(), default) for backend in pool.backends))
        #: equal for two routers that send every key alike
        self.identity = (start, stop, id(default),
                         tuple(sorted((name, id(pool)) for name, pool in pools.items())))

    def select(self, key: bytes):
        """The backend that serves ``key``; ValueError if there is none."""
        name = route_name(key, self.start, self.stop)
        if name is None:
            return self.default.select(key)
        return self.pools.get(name, self.default).select(key)
