"""The native runners of ``routes.zfailover`` and routelib's
``route_zfailover`` (see mcproxy.routing.native)."""

from __future__ import annotations

from functools import partial

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.direct import select_backend
from mcproxy.routing.native.common import (
    ERROR_CODES,
    Done,
    FailBatch,
    RouteError,
    Runner,
    best_of,
    first_good,
    key_groups,
    lib_backend,
    route_failed,
)
from mcproxy.units import ReplySink
from mcproxy.wire import errors
from mcproxy.wire.request import BROADCAST_COMMANDS, Request
from mcproxy.wire.response import Response, client_bytes, key_reply

_EMPTY = b""


def await_done(mode_miss: bool, wanted: int, good: int, hit: bool, remaining: int) -> bool:
    """Whether routes.zfailover's mcp.await of the far zones is over
    (engine._Await): with ``miss`` (AWAIT_FASTGOOD, every zone wanted) at a
    hit or once every zone answered ok; else (AWAIT_OK, one wanted) at the
    first ok answer; either way once every zone answered."""
    if mode_miss and hit:
        return True
    return good >= wanted or not remaining


class ZoneFailover(Runner):
    """``routes.zfailover``: the local zone's pool, then every other zone
    at once (see the module docstring)."""

    __slots__ = ("near", "far", "miss")

    def __init__(self, near: Pool, far: list[Pool], miss: bool) -> None:
        super().__init__([near, *far])
        self.near = near
        self.far = far
        self.miss = miss

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
            route_failed(req, done, stats, route_error, e)
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
                route_failed(req, done, stats, route_error, e)
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
        groups, unplaced = key_groups(self.near, keys, range(len(keys)))
        if unplaced:
            return False
        count = len(keys)
        stats.count_keys(req.command, count)
        _ZoneKeys(self, req, keys, done, stats, route_error, sink).near(groups)
        return True


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
        if not await_done(self.miss, self.wanted, self.good, res.hit, self.remaining):
            return
        self.over = True
        best = best_of(self.results, False)
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
            batch = FailBatch(name, keys if len(positions) == len(keys) else
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
            groups, unplaced = key_groups(pool, self.keys, still)
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
        if await_done(miss, len(self.zfailover.far) if miss else 1, self.good[position],
                       ok and bool(part), self.remaining[position]):
            self.over[position] = True

    def _far_settled(self) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        parts, oks = self.parts, self.local_ok
        for position in self.open:
            ok, best = first_good(self.results[position])
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


#: RES_* judgements of an answer, ranked as rctx:best_result ranks them.
_GOOD, _OK, _ANY = 3, 2, 1


def _rank(res: Response) -> int:
    return _GOOD if res.hit else _OK if res.ok else _ANY


class LibZoneFailover(Runner):
    """routelib's ``route_zfailover``: the local zone's pool; unless it
    answers a hit (with ``miss``) or an answer that is no error (without),
    every other zone at once, the answer once all have answered being the
    first of them, in the order of their names, judged best (a hit, else an
    ok answer, else any)."""

    __slots__ = ("near", "far", "miss")

    def __init__(self, near: Pool, far: list[Pool], miss: bool) -> None:
        super().__init__([near, *far])
        self.near = near
        self.far = far
        self.miss = miss

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would."""
        miss = self.miss
        far = self.far

        def near(res: Response) -> None:
            good = res.hit if miss else res.ok and res.code not in ERROR_CODES
            if good or not far:
                stats.req_active -= 1
                done(client_bytes(res, req))
                return
            gather = _AllFar(len(far), req, done, stats)
            for index, pool in enumerate(far):
                target = lib_backend(pool, req)
                if target.__class__ is Response:
                    gather.arrived(index, target)
                else:
                    target.send(req, partial(gather.arrived, index))

        target = lib_backend(self.near, req)
        if target.__class__ is Response:
            near(target)
        else:
            target.send(req, near)
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """False: a multiget's keys go key by key, each through ``send``."""
        return False


class _AllFar:
    """The far zones' answers to one request through a LibZoneFailover:
    its body waits for them all (``wait_cond(#far, ...)`` ends no sooner)."""

    __slots__ = ("results", "pending", "req", "done", "stats")

    def __init__(self, count: int, req: Request, done: Done, stats: ProxyStats) -> None:
        self.results: list[Response | None] = [None] * count
        self.pending = count
        self.req = req
        self.done = done
        self.stats = stats

    def arrived(self, index: int, res: Response) -> None:
        self.results[index] = res
        self.pending -= 1
        if self.pending:
            return
        best = None
        for res in self.results:
            if best is None or _rank(res) > _rank(best):
                best = res
        self.stats.req_active -= 1
        self.done(client_bytes(best, self.req))
