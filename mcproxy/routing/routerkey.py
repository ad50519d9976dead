"""A V2 router's choice in Python: the route name in a key, and a router
whose every route is a pool, used as one.

``mcp.router_new`` (v2.lua) picks a funcgen by a part of the key: in
prefix mode what comes before its stop string, in anchor mode what comes
between a leading start string and the stop string after it.
:func:`route_name` finds that part exactly as v2.lua's ``route`` does
(tests/routing/test_native_router.py compares the two over generated
keys), and :func:`prefix_name` what routes.prefix_router (routes.lua)
finds; :class:`KeyRouter` is what the direct path (direct.py) sends to
when each route of such a router, its default too, sends to one pool.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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


def prefix_name(key: bytes, prefixes: frozenset, longest: int,
                stop: bytes | None) -> bytes | None:
    """The map key routes.prefix_router (routes.lua) picks for ``key``
    among ``prefixes`` (the longest ``longest`` bytes long), or None: with
    ``stop`` the key up to its first stop, if a prefix; without, the
    longest prefix the key starts with."""
    if stop is not None:
        at = key.find(stop)
        if at < 0:
            return None
        prefix = key[:at]
        return prefix if prefix in prefixes else None
    for size in range(min(len(key), longest), 0, -1):
        prefix = key[:size]
        if prefix in prefixes:
            return prefix
    return None


def name_finder(router: Shape) -> Callable[[bytes], bytes | None]:
    """How a router shape finds a key's route name: v2.lua's router
    (``router``) or routes.prefix_router (``prefix_router``)."""
    if router.kind == "router":
        return partial(route_name, start=router.fields.get("start"),
                       stop=router.fields["stop"])
    prefixes = frozenset(name for name in router.children if isinstance(name, bytes))
    return partial(prefix_name, prefixes=prefixes,
                   longest=max(map(len, prefixes), default=0),
                   stop=router.fields.get("stop"))


def routes_of(router: Shape, command: int) -> tuple[dict, Shape | None] | None:
    """What a router shape (v2.lua's router, routes.prefix_router) does
    with ``command`` requests: route name -> the route of that name (a
    Shape or a Pool; anything else: Lua runs it), and the default (None:
    none, not a route, or routes.lua's no_route); None for a command
    without key (the router has no route for it: Lua answers)."""
    if command in KEYLESS_COMMANDS:
        return None
    if router.kind == "prefix_router":
        default = router.fields.get("default", {}).get(1)
        if isinstance(default, Shape) and default.kind == "no_route":
            default = None
        routes = {name: route for name, route in router.children.items()
                  if isinstance(name, bytes)}
        return routes, default if isinstance(default, (Shape, Pool)) else None
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

    __slots__ = ("name_of", "pools", "default", "backends", "identity")

    def __init__(self, router: Shape, pools: dict[bytes, Pool], default: Pool) -> None:
        #: key -> its route name, or None (name_finder)
        self.name_of = name_finder(router)
        #: route name -> its pool
        self.pools = pools
        self.default = default
        #: every backend of its pools, once each
        self.backends = list(dict.fromkeys(
            backend for pool in (*pools.values(), default) for backend in pool.backends))
        #: equal for two routers that send every key alike
        self.identity = (router.kind, router.fields.get("start"), router.fields.get("stop"),
                         id(default),
                         tuple(sorted((name, id(pool)) for name, pool in pools.items())))

    def select(self, key: bytes):
        """The backend that serves ``key``; ValueError if there is none."""
        name = self.name_of(key)
        if name is None:
            return self.default.select(key)
        return self.pools.get(name, self.default).select(key)
