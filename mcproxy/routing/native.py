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

A shuffle draws Python's random numbers where the Lua body draws Lua's:
the client cannot tell which child a draw picked, and each order of the
children is as likely as in the Lua body (tests/routing/test_native.py
tests the distribution). A multiget draws one order for all its keys, so
that they still travel together; each key alone is as likely to go to each
child as when routed by itself. (routelib shuffles once, when the route is
built: its order is fixed.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import permutations
from random import random, sample

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.direct import pool_of, select_backend
from mcproxy.routing.shapes import Shape
from mcproxy.units import KeyBatch, ReplySink
from mcproxy.wire import errors
from mcproxy.wire.request import (
    BROADCAST_COMMANDS,
    CMD_CAS,
    CMD_GATS,
    CMD_GET,
    CMD_GETS,
    CMD_MA,
    CMD_MD,
    CMD_MG,
    CMD_MS,
    KEYLESS_COMMANDS,
    EditError,
    Request,
    find_flag,
)
from mcproxy.wire.response import (
    MCMC_CODE_CLIENT_ERROR,
    MCMC_CODE_END,
    MCMC_CODE_ERROR,
    MCMC_CODE_SERVER_ERROR,
    Response,
    client_bytes,
    key_reply,
)

_EMPTY = b""

#: Children up to which a shuffle picks one of all their orders, listed
#: once (a C-level random() per request); beyond, random.sample.
_LISTED_ORDERS = 4

#: Codes of the ok answers a failover moves on from, by (lib, miss).
_MOVES_ON = {
    (False, False): frozenset(),
    (False, True): frozenset([MCMC_CODE_END]),
    (True, False): frozenset([MCMC_CODE_SERVER_ERROR, MCMC_CODE_CLIENT_ERROR,
                              MCMC_CODE_ERROR]),
    (True, True): frozenset([MCMC_CODE_END]),
}
#: Why a routelib child got no backend (rcontext's name for it).
_NO_BACKEND = "nobackend"

Done = Callable[[bytes], None]
RouteError = Callable[[Request, bytes], None]


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
    if kind == "split" or kind == "route_split":
        return _split(route, command, kind == "route_split")
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


class Failover:
    """``routes.failover`` over ``pools``, or routelib's ``route_failover``
    (``lib``): see the module docstring."""

    __slots__ = ("pools", "tries", "miss", "shuffle", "lib", "moves_on", "_orders",
                 "depth_limited", "prefix", "guard")

    def __init__(self, pools: list[Pool], miss: bool, count: int | None,
                 shuffle: bool, lib: bool = False) -> None:
        self.pools = pools
        self.lib = lib
        #: codes of the ok answers that go on to the next child
        self.moves_on = _MOVES_ON[lib, miss]
        tries = len(pools)
        if count is not None and count < tries:
            tries = int(count)
        #: children tried at most per request
        self.tries = tries
        self.miss = miss
        self.shuffle = shuffle
        #: every order a shuffle may pick, first ``tries`` children of each
        #: (None: too many to list, or no shuffle)
        self._orders = None
        if shuffle and len(pools) <= _LISTED_ORDERS:
            self._orders = [list(order)[:tries] for order in permutations(pools)]
        #: whether a backend of a child has a depth limit: its multigets
        #: then go key by key, each key a unit (as route_keys does)
        self.depth_limited = any(backend.options.depth_limit
                                 for pool in pools for backend in pool.backends)
        #: the key prefix of requests kept for Lua (introspection's), and
        #: what a request line holds where such a key starts
        self.prefix: bytes | None = None
        self.guard: bytes | None = None

    def keep_for_lua(self, prefix: bytes) -> None:
        """Leave requests whose key starts with ``prefix`` to Lua."""
        self.prefix = prefix
        self.guard = b" " + prefix  # a space comes before every key

    def order(self) -> list[Pool]:
        """The children to try for one client request, in order."""
        if not self.shuffle:
            return self.pools
        orders = self._orders
        if orders is not None:
            return orders[int(random() * len(orders))]
        return sample(self.pools, self.tries)

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the Lua body would; False,
        with nothing done, for a request kept for Lua. The first child's
        answer is most often the route's: an _Attempt, which follows the
        route from child to child, is made only when it is not."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        order = self.pools if not self.shuffle else self.order()
        moves_on = self.moves_on

        def first(res: Response) -> None:
            if res.ok and res.code not in moves_on:
                stats.req_active -= 1
                done(client_bytes(res, req))
            else:
                _Attempt(self, order, req, done, stats, route_error).answer(res)

        try:
            backend = select_backend(order[0], req)
        except ValueError as e:
            if self.lib:  # the child failed
                first(Response.failure(f"{_NO_BACKEND}: {e}"))
                return True
            stats.req_active -= 1  # a Lua error in the body: the route fails
            route_error(req, str(e).encode())
            done(errors.LUA_FAILURE)
            return True
        backend.send(req, first)
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """Route the keys of the client multiget ``req`` (see
        RouteEngine.route_keys); False, with nothing done, when they go key
        by key instead (a backend with a depth limit, a key the first child
        cannot place, maybe a key kept for Lua)."""
        if self.depth_limited:
            return False
        guard = self.guard
        if guard is not None and guard in req.line:
            return False
        order = self.order()
        groups, unplaced = _groups(order[0], keys, range(len(keys)))
        if unplaced:
            return False  # routed key by key, each key gets its error
        count = len(keys)
        stats.conn_requests += count
        stats.commands[req.command] += count
        stats.req_active += count
        _KeysAttempt(self, order, req, keys, done, stats, route_error, sink).round(groups)
        return True


class _Attempt:
    """One request through a Failover: the children tried so far."""

    __slots__ = ("req", "done", "stats", "route_error", "order", "tries", "moves_on", "lib",
                 "index", "best")

    def __init__(self, failover: Failover, order: list[Pool], req: Request, done: Done,
                 stats: ProxyStats, route_error: RouteError) -> None:
        self.req = req
        self.done = done
        self.stats = stats
        self.route_error = route_error
        self.order = order
        self.tries = failover.tries
        self.moves_on = failover.moves_on
        self.lib = failover.lib
        self.index = 0
        #: what to answer if no child answers well enough: the last ok
        #: answer (a miss), else the last failure; routelib's: the last
        self.best: Response | None = None

    def next(self) -> None:
        """Send to the child at ``index``."""
        req = self.req
        try:
            backend = select_backend(self.order[self.index], req)
        except ValueError as e:
            if self.lib:  # the child failed
                self.answer(Response.failure(f"{_NO_BACKEND}: {e}"))
                return
            self.stats.req_active -= 1  # a Lua error in the body: the route fails
            self.route_error(req, str(e).encode())
            self.done(errors.LUA_FAILURE)
            return
        backend.send(req, self.answer)

    def answer(self, res: Response) -> None:
        """A child's answer: the route's, or on to the next child."""
        if res.ok and res.code not in self.moves_on:
            self._finish(res)
            return
        best = self.best
        if best is None or res.ok or not best.ok or self.lib:
            self.best = best = res
        self.index += 1
        if self.index >= self.tries:
            self._finish(best)
        else:
            self.next()

    def _finish(self, res: Response) -> None:
        self.stats.req_active -= 1
        self.done(client_bytes(res, self.req))


def _groups(pool: Pool, keys: list[bytes], positions) -> tuple[dict, list]:
    """Where ``pool`` sends the keys at ``positions``: backend -> their
    positions, in order; and ``(position, why)`` of each key it cannot
    place."""
    groups: dict = {}
    unplaced = []
    select = pool.select
    if len(pool.backends) == 1 and positions:  # serves every key if it serves one
        try:
            return {select(keys[positions[0]]): list(positions)}, unplaced
        except ValueError:
            pass  # each key gets its error
    for position in positions:
        try:
            backend = select(keys[position])
        except ValueError as e:
            unplaced.append((position, str(e).encode()))
            continue
        mine = groups.get(backend)
        if mine is None:
            groups[backend] = [position]
        else:
            mine.append(position)
    return groups, unplaced


class _Batch(KeyBatch):
    """A KeyBatch whose failure goes to ``failed(reason)``: a failover
    must tell a failure from an error line a backend answered."""

    __slots__ = ("failed",)

    def fail(self, reason: str, elapsed: int) -> None:
        self.failed(reason)


class _KeysAttempt:
    """The keys of one client multiget through a Failover: each round
    sends the keys still open to the next child, one KeyBatch per backend;
    ``parts`` holds each key's answer (final, or the best so far)."""

    __slots__ = ("order", "tries", "miss", "lib", "req", "keys", "done", "stats",
                 "route_error", "sink", "parts", "oks", "index", "waiting", "open")

    def __init__(self, failover: Failover, order: list[Pool], req: Request, keys: list[bytes],
                 done: Done, stats: ProxyStats, route_error: RouteError,
                 sink: ReplySink | None) -> None:
        self.order = order
        self.tries = failover.tries
        self.miss = failover.miss
        self.lib = failover.lib
        self.req = req
        self.keys = keys
        self.done = done
        self.stats = stats
        self.route_error = route_error
        self.sink = sink
        self.parts: list[bytes] = [_EMPTY] * len(keys)
        #: by key: whether its best answer so far is ok (a miss)
        self.oks = [False] * len(keys)
        self.index = 0
        self.waiting = 0
        #: positions of the keys that go on to the next child
        self.open: list[int] = []

    def round(self, groups: dict, carried: list[int] | None = None) -> None:
        """Send each backend of the child at ``index`` its keys; the keys
        ``carried`` go on to the next child whatever it answers."""
        self.waiting = len(groups)
        self.open = carried or []
        name = self.req.tokens[0]
        keys = self.keys
        for backend, positions in groups.items():
            batch = _Batch(name, keys if len(positions) == len(keys) else
                           [keys[p] for p in positions],
                           partial(self.answered, positions), self.sink)
            batch.failed = partial(self.failed, positions)
            backend.send_unit(batch)

    def answered(self, positions: list[int], parts: list[bytes]) -> None:
        """A backend's answer to its keys (``units.KeyBatch``: a VALUE, a
        miss, or the error line that answered them all), each ok: with
        ``miss`` a miss goes on; routelib's failover without ``miss``
        takes the error line for a failure."""
        if self.miss:
            mine, oks, still = self.parts, self.oks, self.open
            for position, part in zip(positions, parts, strict=True):
                mine[position] = part
                if not part:
                    oks[position] = True
                    still.append(position)
        elif self.lib:
            mine, still = self.parts, self.open
            for position, part in zip(positions, parts, strict=True):
                mine[position] = part
                if part and not part.startswith(b"VALUE "):
                    still.append(position)
        elif len(positions) == len(self.parts):  # every key, answered
            self.parts = parts
        else:
            mine = self.parts
            for position, part in zip(positions, parts, strict=True):
                mine[position] = part
        self._settled()

    def failed(self, positions: list[int], reason: str) -> None:
        """A backend failed its keys: each goes on, keeping a miss it had
        (routelib's: the failure is its answer so far)."""
        line = key_reply(Response.failure(reason))
        mine, oks, lib = self.parts, self.oks, self.lib
        for position in positions:
            if lib or not oks[position]:
                mine[position] = line
        self.open.extend(positions)
        self._settled()

    def _settled(self) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        still = self.open
        sink = self.sink
        if sink is not None and not sink.wanted:
            self._finish()  # nobody reads the answer
            return
        still.sort()
        while still:
            self.index += 1
            if self.index >= self.tries:
                break
            groups, unplaced = _groups(self.order[self.index], self.keys, still)
            for position, why in unplaced:
                if self.lib:  # the child failed that key
                    self.parts[position] = key_reply(Response.failure(
                        f"{_NO_BACKEND}: {why.decode()}"))
                else:  # a Lua error in that key's body: its route fails
                    self.route_error(self.req, why)
                    self.parts[position] = errors.LUA_FAILURE
            if groups:
                self.round(groups, [position for position, _ in unplaced] if self.lib else None)
                return
            if not self.lib:
                break
            still = [position for position, _ in unplaced]
        self._finish()

    def _finish(self) -> None:
        parts = self.parts
        self.stats.req_active -= len(parts)
        parts.append(errors.END)
        self.done(_EMPTY.join(parts))


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


def _uses_cas(req: Request) -> bool | None:
    """Whether ``req`` reads or compares a cas unique (routes.lua's
    cas_use); None when its flags cannot be read (the Lua body says why)."""
    command = req.command
    if command == CMD_GETS or command == CMD_GATS or command == CMD_CAS:
        return True
    try:
        if command == CMD_MG:
            return find_flag(req, b"c") is not None
        if command == CMD_MS or command == CMD_MD or command == CMD_MA:
            return find_flag(req, b"C") is not None
    except EditError:
        return None
    return False


def _lib_backend(pool: Pool, req: Request):
    """Where routelib's child ``pool`` sends ``req``, or the failure it
    answers with (rcontext's rule: keyless commands go nowhere)."""
    try:
        if req.command in KEYLESS_COMMANDS:
            raise ValueError("cannot route commands without key")
        return pool.select(req.key)
    except ValueError as e:
        return Response.failure(f"{_NO_BACKEND}: {e}")


def _is_error(part: bytes) -> bool:
    """Whether a key's client bytes are an error line or a failure's (a
    multiget's key gets a VALUE, nothing for a miss, or such a line)."""
    return bool(part) and not part.startswith(b"VALUE ")


class AllSync:
    """``routes.all_sync`` over ``pools``, or routelib's ``route_allsync``
    (``lib``): see the module docstring."""

    __slots__ = ("pools", "strict", "lib", "depth_limited", "prefix", "guard")

    def __init__(self, pools: list[Pool], strict: bool, lib: bool) -> None:
        self.pools = pools
        self.strict = strict
        self.lib = lib
        self.depth_limited = any(backend.options.depth_limit
                                 for pool in pools for backend in pool.backends)
        self.prefix: bytes | None = None
        self.guard: bytes | None = None

    def keep_for_lua(self, prefix: bytes) -> None:
        """Leave requests whose key starts with ``prefix`` to Lua."""
        self.prefix = prefix
        self.guard = b" " + prefix

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would; False,
        with nothing done, for a request the body treats apart (Lua runs
        it)."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        if self.lib:
            targets = [_lib_backend(pool, req) for pool in self.pools]
        else:
            if req.command in BROADCAST_COMMANDS or _uses_cas(req) is not False:
                return False
            try:
                targets = [select_backend(pool, req) for pool in self.pools]
            except ValueError as e:  # a Lua error in the body: the route fails
                stats.req_active -= 1
                route_error(req, str(e).encode())
                done(errors.LUA_FAILURE)
                return True
        gather = _Gather(self, req, done, stats, len(targets))
        for index, target in enumerate(targets):
            if target.__class__ is Response:
                gather.arrived(index, target)
            else:
                target.send(req, partial(gather.arrived, index))
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """Route the keys of the client multiget ``req`` to every child
        together (see RouteEngine.route_keys); False, with nothing done,
        when they go key by key instead (a gets outside routelib, a
        backend with a depth limit, a key a child cannot place, maybe a key
        kept for Lua)."""
        if self.depth_limited or (req.command != CMD_GET and not self.lib):
            return False
        guard = self.guard
        if guard is not None and guard in req.line:
            return False
        positions = range(len(keys))
        rounds = []
        for pool in self.pools:
            groups, unplaced = _groups(pool, keys, positions)
            if unplaced:
                return False
            rounds.append(groups)
        count = len(keys)
        stats.conn_requests += count
        stats.commands[req.command] += count
        stats.req_active += count
        gather = _KeysGather(self, req, keys, done, stats,
                             sum(len(groups) for groups in rounds))
        name = req.tokens[0]
        for child, groups in enumerate(rounds):
            for backend, mine in groups.items():
                batch = _Batch(name, keys if len(mine) == count else [keys[p] for p in mine],
                               partial(gather.answered, child, mine), sink)
                batch.failed = partial(gather.failed, child, mine)
                backend.send_unit(batch)
        return True


class _Gather:
    """The answers of every child to one request through an AllSync."""

    __slots__ = ("all_sync", "req", "done", "stats", "pending", "arrivals", "by_child")

    def __init__(self, all_sync: AllSync, req: Request, done: Done, stats: ProxyStats,
                 count: int) -> None:
        self.all_sync = all_sync
        self.req = req
        self.done = done
        self.stats = stats
        self.pending = count
        #: the answers in arrival order, and by child
        self.arrivals: list[Response] = []
        self.by_child: list[Response | None] = [None] * count

    def arrived(self, index: int, res: Response) -> None:
        self.arrivals.append(res)
        self.by_child[index] = res
        self.pending -= 1
        if self.pending:
            return
        if self.all_sync.lib:
            answer = self.by_child[-1]
            for res in self.by_child:
                if not res.ok or res.code in _ERROR_CODES:
                    answer = res
                    break
        else:
            answer = _best_of(self.arrivals, self.all_sync.strict)
        self.stats.req_active -= 1
        self.done(client_bytes(answer, self.req))


#: The codes of error lines (routelib's is_error, beyond failures).
_ERROR_CODES = _MOVES_ON[True, False]


def _best_of(arrivals: list[Response], strict: bool) -> Response:
    """routes.all_sync's answer: with ``strict`` the first failure; else
    the first hit, else the first ok answer, else the first."""
    if strict:
        for res in arrivals:
            if not res.ok:
                return res
    first_ok = None
    for res in arrivals:
        if res.ok:
            if res.code != MCMC_CODE_END:
                return res
            if first_ok is None:
                first_ok = res
    return first_ok or arrivals[0]


class _KeysGather:
    """The answers of every child to the keys of one client multiget
    through an AllSync: by key, ``(ok, client bytes)`` in arrival order
    and by child."""

    __slots__ = ("all_sync", "req", "keys", "done", "stats", "pending", "arrivals")

    def __init__(self, all_sync: AllSync, req: Request, keys: list[bytes], done: Done,
                 stats: ProxyStats, batches: int) -> None:
        self.all_sync = all_sync
        self.req = req
        self.keys = keys
        self.done = done
        self.stats = stats
        self.pending = batches
        #: by key: (child, ok, client bytes) of each answer, in arrival order
        self.arrivals: list[list[tuple[int, bool, bytes]]] = [[] for _ in keys]

    def answered(self, child: int, positions: list[int], parts: list[bytes]) -> None:
        arrivals = self.arrivals
        for position, part in zip(positions, parts, strict=True):
            arrivals[position].append((child, True, part))
        self._settled()

    def failed(self, child: int, positions: list[int], reason: str) -> None:
        line = key_reply(Response.failure(reason))
        arrivals = self.arrivals
        for position in positions:
            arrivals[position].append((child, False, line))
        self._settled()

    def _settled(self) -> None:
        self.pending -= 1
        if self.pending:
            return
        lib = self.all_sync.lib
        strict = self.all_sync.strict
        parts = [(_lib_pick if lib else _keys_best_of)(answers, strict)
                 for answers in self.arrivals]
        self.stats.req_active -= len(parts)
        parts.append(errors.END)
        self.done(_EMPTY.join(parts))


def _lib_pick(answers: list[tuple[int, bool, bytes]], strict: bool) -> bytes:
    """route_allsync's answer for a key: the first error in the children's
    order, else the last child's answer."""
    by_child = sorted(answers)
    for _, _, part in by_child:
        if _is_error(part):
            return part
    return by_child[-1][2]


def _keys_best_of(answers: list[tuple[int, bool, bytes]], strict: bool) -> bytes:
    """_best_of for a key, from its ``(child, ok, client bytes)`` answers."""
    if strict:
        for _, ok, part in answers:
            if not ok:
                return part
    first_ok = None
    for _, ok, part in answers:
        if ok:
            if part:
                return part
            if first_ok is None:
                first_ok = part
    return answers[0][2] if first_ok is None else first_ok


def _await_done(mode_miss: bool, wanted: int, good: int, hit: bool, remaining: int) -> bool:
    """Whether routes.zfailover's mcp.await of the far zones is over
    (engine._Await): with ``miss`` (AWAIT_FASTGOOD, every zone wanted) at a
    hit or once every zone answered ok; else (AWAIT_OK, one wanted) at the
    first ok answer; either way once every zone answered."""
    if mode_miss and hit:
        return True
    return good >= wanted or not remaining


class ZoneFailover:
    """``routes.zfailover``: the local zone's pool, then every other zone
    at once (see the module docstring)."""

    __slots__ = ("near", "far", "miss", "depth_limited", "prefix", "guard")

    def __init__(self, near: Pool, far: list[Pool], miss: bool) -> None:
        self.near = near
        self.far = far
        self.miss = miss
        self.depth_limited = any(backend.options.depth_limit
                                 for pool in (near, *far) for backend in pool.backends)
        self.prefix: bytes | None = None
        self.guard: bytes | None = None

    def keep_for_lua(self, prefix: bytes) -> None:
        """Leave requests whose key starts with ``prefix`` to Lua."""
        self.prefix = prefix
        self.guard = b" " + prefix

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the Lua body would;
        False, with nothing done, for a broadcast command (Lua runs it)."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        if req.command in BROADCAST_COMMANDS:
            return False
        try:
            backend = select_backend(self.near, req)
        except ValueError as e:
            _route_failed(req, done, stats, route_error, e)
            return True
        miss = self.miss

        def near(res: Response) -> None:
            if res.hit or (not miss and res.ok) or not self.far:
                stats.req_active -= 1
                done(client_bytes(res, req))
                return
            try:
                backends = [select_backend(pool, req) for pool in self.far]
            except ValueError as e:
                _route_failed(req, done, stats, route_error, e)
                return
            gather = _FarGather(res, len(backends), miss, req, done, stats)
            for backend in backends:
                backend.send(req, gather.arrived)

        backend.send(req, near)
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """Route the keys of the client multiget ``req`` (see
        RouteEngine.route_keys): to the local zone together, then those it
        did not answer well enough to every other zone together; False,
        with nothing done, when they go key by key instead (a backend with
        a depth limit, a key the local zone cannot place, maybe a key kept
        for Lua)."""
        if self.depth_limited:
            return False
        guard = self.guard
        if guard is not None and guard in req.line:
            return False
        groups, unplaced = _groups(self.near, keys, range(len(keys)))
        if unplaced:
            return False
        count = len(keys)
        stats.conn_requests += count
        stats.commands[req.command] += count
        stats.req_active += count
        _ZoneKeys(self, req, keys, done, stats, route_error, sink).near(groups)
        return True


def _route_failed(req: Request, done: Done, stats: ProxyStats, route_error: RouteError,
                  error: ValueError) -> None:
    """A Lua error in a route's body: the route fails."""
    stats.req_active -= 1
    route_error(req, str(error).encode())
    done(errors.LUA_FAILURE)


class _FarGather:
    """The far zones' answers to one request through a ZoneFailover, until
    its mcp.await is over."""

    __slots__ = ("local", "remaining", "wanted", "miss", "req", "done", "stats", "results",
                 "good", "over")

    def __init__(self, local: Response, count: int, miss: bool, req: Request, done: Done,
                 stats: ProxyStats) -> None:
        self.local = local
        self.remaining = count
        self.wanted = count if miss else 1
        self.miss = miss
        self.req = req
        self.done = done
        self.stats = stats
        self.results: list[Response] = []
        self.good = 0
        self.over = False

    def arrived(self, res: Response) -> None:
        self.remaining -= 1
        if self.over:
            return  # after the await was over: dropped, as mcp.await drops it
        self.results.append(res)
        self.good += res.ok
        if not _await_done(self.miss, self.wanted, self.good, res.hit, self.remaining):
            return
        self.over = True
        best = _best_of(self.results, False)
        local = self.local
        answer = best if best.hit or not local.ok else local
        self.stats.req_active -= 1
        self.done(client_bytes(answer, self.req))


class _ZoneKeys:
    """The keys of one client multiget through a ZoneFailover: the local
    zone's batches first, then the far zones' for the keys it did not
    answer well enough, each key's mcp.await over as the route's would be."""

    __slots__ = ("zfailover", "req", "keys", "done", "stats", "route_error", "sink",
                 "parts", "local_ok", "open", "waiting", "remaining", "good", "results",
                 "over")

    def __init__(self, zfailover: ZoneFailover, req: Request, keys: list[bytes], done: Done,
                 stats: ProxyStats, route_error: RouteError,
                 sink: ReplySink | None) -> None:
        self.zfailover = zfailover
        self.req = req
        self.keys = keys
        self.done = done
        self.stats = stats
        self.route_error = route_error
        self.sink = sink
        count = len(keys)
        #: by key: its answer so far (the local zone's, then the route's)
        self.parts: list[bytes] = [_EMPTY] * count
        self.local_ok = [True] * count
        self.open: list[int] = []
        self.waiting = 0
        #: by key, for the far zones' await: answers still to come, ok
        #: answers, the answers while it ran, whether it is over
        self.remaining: list[int] = []
        self.good: list[int] = []
        self.results: list[list[tuple[bool, bytes]]] = []
        self.over: list[bool] = []

    def send(self, pool: Pool, groups: dict, answered, failed) -> None:
        name = self.req.tokens[0]
        keys = self.keys
        for backend, positions in groups.items():
            batch = _Batch(name, keys if len(positions) == len(keys) else
                           [keys[p] for p in positions], partial(answered, positions),
                           self.sink)
            batch.failed = partial(failed, positions)
            backend.send_unit(batch)

    def near(self, groups: dict) -> None:
        """Send the keys to the local zone."""
        self.waiting = len(groups)
        self.send(self.zfailover.near, groups, self.near_answered, self.near_failed)

    def near_answered(self, positions: list[int], parts: list[bytes]) -> None:
        mine, still, miss = self.parts, self.open, self.zfailover.miss
        for position, part in zip(positions, parts, strict=True):
            mine[position] = part
            if miss and not part:
                still.append(position)
        self._near_settled()

    def near_failed(self, positions: list[int], reason: str) -> None:
        line = key_reply(Response.failure(reason))
        mine, oks = self.parts, self.local_ok
        for position in positions:
            mine[position] = line
            oks[position] = False
        self.open.extend(positions)
        self._near_settled()

    def _near_settled(self) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        far = self.zfailover.far
        sink = self.sink
        still = sorted(self.open)
        if not still or not far or (sink is not None and not sink.wanted):
            self._finish()
            return
        rounds = []
        for pool in far:
            groups, unplaced = _groups(pool, self.keys, still)
            for position, why in unplaced:  # a Lua error in that key's body
                if position in still:
                    self.route_error(self.req, why)
                    self.parts[position] = errors.LUA_FAILURE
                    still.remove(position)
            rounds.append(groups)
        count = len(self.keys)
        self.remaining = [len(far)] * count
        self.good = [0] * count
        self.results = [[] for _ in range(count)]
        self.over = [True] * count
        for position in still:
            self.over[position] = False
        self.open = still
        placed = set(still)
        rounds = [{backend: [p for p in positions if p in placed]
                   for backend, positions in groups.items()} for groups in rounds]
        rounds = [{backend: positions for backend, positions in groups.items() if positions}
                  for groups in rounds]
        self.waiting = sum(len(groups) for groups in rounds)
        if not self.waiting:
            self._finish()
            return
        for pool, groups in zip(far, rounds, strict=True):
            self.send(pool, groups, self.far_answered, self.far_failed)

    def far_answered(self, positions: list[int], parts: list[bytes]) -> None:
        for position, part in zip(positions, parts, strict=True):
            self._arrived(position, True, part)
        self._far_settled()

    def far_failed(self, positions: list[int], reason: str) -> None:
        line = key_reply(Response.failure(reason))
        for position in positions:
            self._arrived(position, False, line)
        self._far_settled()

    def _arrived(self, position: int, ok: bool, part: bytes) -> None:
        self.remaining[position] -= 1
        if self.over[position]:
            return
        self.results[position].append((ok, part))
        self.good[position] += ok
        miss = self.zfailover.miss
        if _await_done(miss, len(self.zfailover.far) if miss else 1, self.good[position],
                       ok and bool(part), self.remaining[position]):
            self.over[position] = True

    def _far_settled(self) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        parts, oks = self.parts, self.local_ok
        for position in self.open:
            ok, best = _first_good(self.results[position])
            # a hit anywhere; else the local answer if it was one (a miss);
            # else whatever the others said
            if (ok and best) or not oks[position]:
                parts[position] = best
        self._finish()

    def _finish(self) -> None:
        parts = self.parts
        self.stats.req_active -= len(parts)
        parts.append(errors.END)
        self.done(_EMPTY.join(parts))


def _first_good(answers: list[tuple[bool, bytes]]) -> tuple[bool, bytes]:
    """The first hit of a key's ``(ok, client bytes)`` answers, else the
    first ok answer (a miss), else the first (routes.lua's best_of)."""
    first_ok = None
    for answer in answers:
        if answer[0]:
            if answer[1]:
                return answer
            if first_ok is None:
                first_ok = answer
    return first_ok or answers[0]


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


class Split:
    """``routes.split``: the request to the shadows in the background (only
    for keys under ``fraction``), then to the primary, whose answer is the
    route's; or routelib's ``route_split`` (``lib``: one shadow, child_b,
    every request). A broadcast command goes to Lua."""

    __slots__ = ("main", "shadows", "fraction", "lib", "depth_limited", "prefix", "guard")

    def __init__(self, main: Pool, shadows: list[Pool], fraction: float | None,
                 lib: bool) -> None:
        self.main = main
        self.shadows = shadows
        self.fraction = fraction
        self.lib = lib
        self.depth_limited = any(backend.options.depth_limit
                                 for pool in (main, *shadows) for backend in pool.backends)
        self.prefix: bytes | None = None
        self.guard: bytes | None = None

    def keep_for_lua(self, prefix: bytes) -> None:
        """Leave requests whose key starts with ``prefix`` to Lua."""
        self.prefix = prefix
        self.guard = b" " + prefix

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
                target = _lib_backend(pool, req)
                if target.__class__ is not Response:
                    target.send(req, _ignore)
            target = _lib_backend(self.main, req)
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
                _route_failed(req, done, stats, route_error, e)
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
            groups, unplaced = _groups(pool, keys, shadowed)
            if unplaced:
                return False
            rounds.append(groups)
        main, unplaced = _groups(self.main, keys, range(len(keys)))
        if unplaced:
            return False
        count = len(keys)
        stats.conn_requests += count
        stats.commands[req.command] += count
        stats.req_active += count
        name = req.tokens[0]
        for groups in rounds:
            for backend, positions in groups.items():
                backend.send_unit(KeyBatch(name, [keys[p] for p in positions], _ignore_keys))
        reply = _SplitReply(count, len(main), stats, done)
        for backend, positions in main.items():
            backend.send_unit(KeyBatch(name, keys if len(positions) == count else
                                       [keys[p] for p in positions],
                                       partial(reply.answer, positions), sink))
        return True


class _SplitReply:
    """The primary's answers to the keys of one client multiget through a
    Split, joined in the client's order."""

    __slots__ = ("parts", "pending", "stats", "done")

    def __init__(self, count: int, batches: int, stats: ProxyStats, done: Done) -> None:
        self.parts: list[bytes] = [_EMPTY] * count
        self.pending = batches
        self.stats = stats
        self.done = done

    def answer(self, positions: list[int], parts: list[bytes]) -> None:
        mine = self.parts
        for position, part in zip(positions, parts, strict=True):
            mine[position] = part
        self.pending -= 1
        if not self.pending:
            self.stats.req_active -= len(mine)
            mine.append(errors.END)
            self.done(_EMPTY.join(mine))
