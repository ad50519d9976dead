"""Native runners: route-library shapes over several pools, run without Lua.

The direct path (``direct.py``) runs the shapes that send a command to one
pool unchanged. The shapes here call several pools, and answer with a fixed
function of the pools' answers; a runner per shape does what the shape's
Lua body does (``routes.lua``, ``routelib.lua``), sending to the backends
itself and calling ``done(client_bytes)`` once, with the bytes the body
would have answered.

* :class:`Failover` runs ``routes.failover`` over pools (given as pools or
  as routes the direct path would run): the children in order (or a
  random order per client request, ``shuffle``), at most ``count`` of
  them, until one answers with a hit, or with any ok answer unless
  ``miss``; else the last ok answer seen (a miss), else the last failure.
  Also memcached's routelib ``route_failover`` (``lib``), which differs
  in three ways: without ``miss`` an error line moves on as a failure
  does, the answer is the last child's, and a request no backend takes
  is a failure of that child rather than a Lua error.
  The keys of a ``get``/``gets`` multiget go to each child together, one
  backend multiget per backend: a key answered well by the first child is
  done, only the others go on to the next child.
* :class:`AllSync` runs ``routes.all_sync`` over pools: the request to
  every child at once; the answer, once all answered, is the first
  failure in arrival order with ``strict``, else the first hit, else the
  first ok answer, else the first. A request that reads or compares a cas
  unique (its body's cas_at_primary) and a broadcast command go to Lua.
  Also routelib's ``route_allsync`` (``lib``): the first error (a failure
  or an error line) in the children's order, else the last child's answer.
  A multiget's keys go to every child together.
* :class:`ZoneFailover` runs ``routes.zfailover``: the local zone's pool;
  unless it answers with a hit (or, without ``miss``, any ok answer) every
  other zone at once, the answer being the first hit, else the local
  answer if it was ok, else the others' best, as its body's mcp.await
  would have collected them (over at the first hit or once all answered
  ok with ``miss``, else at the first ok answer). A broadcast command goes
  to Lua.
* :class:`Split` runs ``routes.split`` and routelib's ``route_split``: the
  shadows get the request in the background, the primary's answer is the
  route's.
* :class:`AllAsync` runs ``routes.all_async`` as a Split without a
  fraction (a request that uses a cas unique goes to Lua).
* :class:`Fastest` runs ``routes.all_fastest`` and :class:`AllFastest`
  routelib's ``route_allfastest``; :class:`LibZoneFailover` routelib's
  ``route_zfailover`` (fastest.py, zones.py say how each answers).
* :class:`Router` runs a router (V2's ``mcp.router_new``, routelib's
  ``routes{ map = ... }`` and ``cmap``, ``routes.prefix_router``) whose
  routes are pools, runners of this package, or left to Lua: the key's
  route name picks one (routerkey.py); a request for a Lua route runs the
  whole router in Lua. A router of pools only is the direct path's.

A shuffle draws Python's random numbers where the Lua body draws Lua's:
the client cannot tell which child a draw picked, and each order of the
children is as likely as in the Lua body (tests/routing/test_native.py
tests the distribution). A multiget draws one order for all its keys, so
that they still travel together; each key alone is as likely to go to each
child as when routed by itself. (routelib shuffles once, when the route is
built: its order is fixed.)
"""

from __future__ import annotations

from mcproxy.backends.pool import Pool
from mcproxy.routing.direct import pool_of
from mcproxy.routing.native.allsync import AllSync
from mcproxy.routing.native.failover import Failover
from mcproxy.routing.native.fastest import AllFastest, Fastest
from mcproxy.routing.native.router import Router
from mcproxy.routing.native.split import AllAsync, Split, key_fraction
from mcproxy.routing.native.zones import LibZoneFailover, ZoneFailover
from mcproxy.routing.routerkey import routes_of
from mcproxy.routing.shapes import Shape

__all__ = ["AllAsync", "AllFastest", "AllSync", "Failover", "Fastest", "LibZoneFailover",
           "Router", "Split", "ZoneFailover", "declared", "key_fraction", "native_of"]


def native_of(route: Shape | Pool | None, command: int):
    """The native runner that runs ``command`` requests for ``route`` and
    the key prefix of the requests it keeps for Lua (introspection's), or
    None if its route is not one of the shapes run here."""
    if not isinstance(route, Shape):
        return None
    kind = route.kind
    if kind == "direct":
        return native_of(route.children.get(1), command)
    if kind == "by_command":
        key = route.fields["choice"].get(command)
        return None if key is None else native_of(route.children.get(key), command)
    if kind == "introspect":
        found = native_of(route.children.get(1), command)
        if found is None or command != route.fields["command"]:
            return found
        if found[1] is not None:
            return None  # two prefixes kept for Lua: leave it all to Lua
        return found[0], route.fields["prefix"]
    if kind == "all_sync" or kind == "route_allsync":
        pools = _pools(route.children, command, kind == "route_allsync")
        if pools is None:
            return None
        return AllSync(pools, bool(route.fields.get("strict")), kind == "route_allsync"), None
    if kind == "zfailover":
        return _zone_failover(route, command)
    if kind == "route_zfailover":
        pools = _pools(route.children, command, True)
        if pools is None:
            return None
        return LibZoneFailover(pools[0], pools[1:], bool(route.fields.get("miss"))), None
    if kind == "all_fastest":
        pools = _pools(route.children, command, True)
        return None if pools is None else (Fastest(pools, bool(route.fields.get("miss"))), None)
    if kind == "route_allfastest":
        pools = _pools(route.children, command, True)
        return None if pools is None else (AllFastest(pools), None)
    if kind == "all_async":
        main = _pools(route.children, command, True)
        rest = _pools(route.fields.get("background", {}), command, True)
        if main is None or rest is None:
            return None
        return AllAsync(main[0], rest), None
    if kind == "split" or kind == "route_split":
        return _split(route, command, kind == "route_split")
    if kind == "router" or kind == "prefix_router":
        return _router(route, command)
    if kind == "failover" or kind == "route_failover":
        children = route.children
        pools = []
        for index in range(1, len(children) + 1):
            found = pool_of(children.get(index), command)
            if found is None or found[1] is not None:
                return None
            pools.append(found[0])
        if not pools or len(pools) != len(children):
            return None
        fields = route.fields
        return Failover(pools, bool(fields.get("miss")), fields.get("count"),
                        bool(fields.get("shuffle")), kind == "route_failover"), None
    return None


def declared(shapes: dict[int, Shape]) -> dict:
    """command -> the runner of its route, from the shapes of the attached
    routes (but those the direct path runs)."""
    runners = {}
    for command, shape in shapes.items():
        found = None if pool_of(shape, command) else native_of(shape, command)
        if found is not None:
            runner, prefix = found
            if prefix is not None:
                runner.keep_for_lua(prefix)
            runners[command] = runner
    return runners


def _router(route: Shape, command: int):
    """The Router of a router shape, or None if Lua runs all its routes:
    each route, its default too, a pool the direct path sends to, or a
    native runner, or else left to Lua."""
    found = routes_of(route, command)
    if found is None:
        return None
    routes, default = found
    targets = {}
    for name, child in (*routes.items(), (None, default)):
        target = pool_of(child, command)
        if target is not None:
            target = None if target[1] is not None else target[0]
        else:
            target = native_of(child, command)
            target = None if target is None or target[1] is not None else target[0]
        targets[name] = target
    default_target = targets.pop(None)
    if default_target is None and not any(targets.values()):
        return None
    return Router(route, targets, default_target), None


def _zone_failover(route: Shape, command: int):
    """The ZoneFailover of a zfailover shape, or None: its zones, by name,
    must be pools; the far ones are tried in the order of their names (as
    its body sorts them)."""
    children = route.children
    local = route.fields.get("local_zone")
    if local not in children or not all(isinstance(zone, bytes) for zone in children):
        return None
    names = [local, *sorted(zone for zone in children if zone != local)]
    pools = _pools({index: children[name] for index, name in enumerate(names, 1)},
                   command, True)
    if pools is None:
        return None
    return ZoneFailover(pools[0], pools[1:], bool(route.fields.get("miss"))), None


def _split(route: Shape, command: int, lib: bool):
    """The Split of a split shape (the primary is child 1; routes.split's
    shadows are a table of their own, routelib's child_b is child 2), or
    None if a child is not a pool."""
    if lib:
        pools = _pools(route.children, command, True)
    else:
        main = _pools({1: route.children.get(1)}, command, True)
        shadows = _pools(route.fields.get("shadows", {}), command, False)
        pools = None if main is None or shadows is None else main + shadows
    if pools is None or len(pools) < 2:
        return None
    fraction = route.fields.get("fraction")
    return Split(pools[0], pools[1:], None if fraction is None else float(fraction), lib), None


def _pools(children: dict, command: int, ordered: bool) -> list[Pool] | None:
    """The pools of a shape's ``children`` (each a pool, or a route the
    direct path runs), in the table's order (``ordered``: an array's), or
    None if one is anything else."""
    keys = list(range(1, len(children) + 1)) if ordered else list(children)
    pools = []
    for key in keys:
        found = pool_of(children.get(key), command)
        if found is None or found[1] is not None:
            return None
        pools.append(found[0])
    return pools or None
