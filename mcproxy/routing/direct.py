"""The direct path: routes the engine runs without entering Lua.

A route whose declared shape (``shapes.py``) sends every request of a
command to one pool, unchanged, is run here: ``routes.direct(p)``,
``routes.as_route(p)``, a pool named as ``routes.config``'s route or in a
command map (``routes.by_command``, the ``routes`` table of
``routes.config``), through ``routes.introspect`` (whose own requests, a
``get`` of ``__mcproxy__.route(...)``, still run in Lua), ``routes.failover``
of one child that is one of these (its body answers with the child's
answer, whatever it is), a router (V2's, routes.prefix_router) whose every
route and default is one of these (routerkey.KeyRouter picks the pool by
the key's route name), and a hand-written
``function(r) return pool(r) end`` (mcp.lua recognises it). The pool picks
the backend and the response goes to the client exactly as the Lua route
would have sent it, minus two crossings into Lua and a coroutine per
request. Keys of a multiget, or a run of plain requests, for such a pool
travel together (``RouteEngine.route_keys``, ``route_run``); this module
decides where they go. Shapes over several pools (failover, all_sync, ...)
run natively too, by the runners of ``native/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.routerkey import KeyRouter, routes_of
from mcproxy.routing.shapes import Shape
from mcproxy.wire import errors
from mcproxy.wire.request import (
    BROADCAST_COMMANDS,
    CMD_GET,
    CMD_SET,
    KEYLESS_COMMANDS,
    Request,
)
from mcproxy.wire.response import Response, client_bytes


def pool_of(route: Shape | Pool | None,
            command: int) -> tuple[Pool | KeyRouter, bytes | None] | None:
    """The pool ``route`` sends every ``command`` request to, unchanged,
    and the key prefix of the requests it keeps for Lua (introspection's),
    or None if its route does anything else."""
    if isinstance(route, Pool):
        return route, None
    if not isinstance(route, Shape):
        return None
    kind = route.kind
    if kind == "direct":
        return pool_of(route.children.get(1), command)
    if kind == "by_command":
        key = route.fields["choice"].get(command)
        return None if key is None else pool_of(route.children.get(key), command)
    if kind == "failover":
        # Unshuffled only: shuffling even one child draws a Lua random number.
        children = route.children
        if len(children) != 1 or route.fields.get("shuffle"):
            return None
        return pool_of(children.get(1), command)
    if kind == "router" or kind == "prefix_router":
        return _key_router(route, command)
    if kind == "introspect":
        found = pool_of(route.children.get(1), command)
        if found is None or command != route.fields["command"]:
            return found
        if found[1] is not None:
            return None  # two prefixes kept for Lua: leave it all to Lua
        return found[0], route.fields["prefix"]
    return None


def _key_router(router: Shape, command: int) -> tuple[KeyRouter, None] | None:
    """The KeyRouter of a router (V2's, routes.prefix_router) whose every
    route for ``command``, and its default, sends to one pool unchanged;
    else None."""
    found = routes_of(router, command)
    if found is None or found[1] is None:
        return None
    routes, default = found
    pools = {}
    for name, route in (*routes.items(), (None, default)):
        target = pool_of(route, command)
        if target is None or target[1] is not None:
            return None
        pools[name] = target[0]
    default_pool = pools.pop(None)
    return KeyRouter(router, pools, default_pool), None


class DirectRoutes:
    """The commands of one load whose routes run without Lua, and where
    their requests go."""

    def __init__(self, pools: dict[int, Pool], lua_keys: dict[int, bytes]) -> None:
        #: command -> the pool its route sends to
        self.pools = pools
        #: command -> key prefix of its requests whose route runs in Lua
        self.lua_keys = lua_keys
        get = pools.get(CMD_GET)
        #: None, or whether runs of plain requests (scan_plain) may hold
        #: sets as well as gets: both commands' routes go to one pool
        self.plain_runs = None if get is None else (pools.get(CMD_SET) is get
                                                    and CMD_SET not in lua_keys)
        #: whether those runs may hold gets of several keys (their pool
        #: has one backend, which then answers every key)
        self.plain_multigets = get is not None and len(get.backends) == 1
        self._plain_pool = get
        self._sole_backend = get.backends[0] if self.plain_multigets else None
        #: command -> what its request line holds where a key kept for Lua
        #: starts (a space comes before every key)
        self._guards = {command: b" " + prefix for command, prefix in lua_keys.items()}
        self._run_guard = self._guards.get(CMD_GET)

    @classmethod
    def declared(cls, shapes: dict[int, Shape], defaults: dict[int, Pool]) -> DirectRoutes:
        """From the shapes of the attached routes; ``defaults`` are the
        commands the proxy routes to a pool when no route is attached."""
        pools = dict(defaults)
        lua_keys = {}
        routers: dict = {}
        for command, shape in shapes.items():
            found = pool_of(shape, command)
            if found is not None:
                pool = found[0]
                if isinstance(pool, KeyRouter):  # one for the commands it routes alike
                    pool = routers.setdefault(pool.identity, pool)
                pools[command] = pool
                if found[1] is not None:
                    lua_keys[command] = found[1]
        return cls(pools, lua_keys)

    def pool(self, req: Request) -> Pool | None:
        """The pool ``req`` goes to without Lua, or None."""
        pool = self.pools.get(req.command)
        if pool is not None and self.lua_keys:
            prefix = self.lua_keys.get(req.command)
            if prefix is not None and req.key.startswith(prefix):
                return None
        return pool

    def key_groups(self, req: Request, keys: list[bytes]) -> dict | None:
        """Where the keys of the multiget ``req`` go together: backend ->
        the positions of its keys (None: all of them); None when they are
        routed key by key instead (no direct route, a key kept for Lua, a
        key the pool cannot place, a backend with a depth limit)."""
        command = req.command
        pool = self.pools.get(command)
        if pool is None:
            return None
        guard = self._guards.get(command)
        if guard is not None and guard in req.line:
            return None  # maybe a key kept for Lua: key by key finds out
        try:
            if len(pool.backends) == 1:
                pool.select(keys[0])  # serves every key if it serves one
                chosen = None
            else:
                select = pool.select
                chosen = [select(key) for key in keys]
        except Exception:
            return None  # routed key by key, each key gets its error
        if chosen is None or chosen.count(chosen[0]) == len(chosen):
            groups = {pool.backends[0] if chosen is None else chosen[0]: None}
        else:
            groups = {}
            for position, backend in enumerate(chosen):
                positions = groups.get(backend)
                if positions is None:
                    groups[backend] = [position]
                else:
                    positions.append(position)
        for backend in groups:
            if backend.options.depth_limit:
                return None
        return groups

    def run_target(self, data: bytes, keys: Sequence[bytes], widths: dict[int, int] | None):
        """Where a run of plain requests of ``keys`` (RunRouter.route_run,
        RunRouter._route_joined) goes: the backend that takes it all, a list of each
        request's backend when they differ (their depth limits unchecked),
        or None when it is routed request by request instead (no direct
        route for gets, a key kept for Lua, a multiget over several
        backends, a key the pool cannot place, a backend with a depth
        limit). For a key kept for Lua it looks at all of ``data``: a match
        outside the run, or in a value, only routes the run the slower way."""
        guard = self._run_guard
        if guard is not None and guard in data:
            return None
        backend = self._sole_backend  # serves every key, a multiget's too
        if backend is None:
            pool = self._plain_pool
            if pool is None:
                return None
            if widths is not None:
                return None  # the keys of a multiget may need several backends
            try:
                chosen = list(map(pool.select, keys))
            except Exception:
                return None
            backend = chosen[0]
            if chosen.count(backend) < len(chosen):
                return chosen
        if backend.options.depth_limit:
            return None
        return backend


def select_backend(pool, req: Request):
    """Where ``pool`` sends ``req``: the backend of its key, or for a
    broadcast command all its backends (pool.Broadcast); ValueError (a Lua
    error) if nowhere."""
    command = req.command
    if command in KEYLESS_COMMANDS:
        if command in BROADCAST_COMMANDS:
            return pool.broadcast()
        raise ValueError("cannot route commands without key")
    return pool.select(req.key)


def send(pool, req: Request, done: Callable[[bytes], None], stats: ProxyStats,
         route_error: Callable[[Request, bytes], None]) -> None:
    """Send ``req`` to ``pool`` as its direct route would; ``done(reply)``
    once, with what the route run in Lua would have answered."""
    try:
        backend = select_backend(pool, req)
    except ValueError as e:
        stats.req_active -= 1
        route_error(req, str(e).encode())
        done(errors.LUA_FAILURE)
        return

    def reply(res: Response) -> None:
        stats.req_active -= 1
        done(client_bytes(res, req))

    backend.send(req, reply)
