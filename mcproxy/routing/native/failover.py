"""The native runner of ``routes.failover`` and routelib's
``route_failover`` (see mcproxy.routing.native)."""

from __future__ import annotations

from functools import partial
from itertools import permutations
from random import random, sample

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.direct import select_backend
from mcproxy.routing.native.common import (
    ERROR_CODES,
    NO_BACKEND,
    Done,
    FailBatch,
    RouteError,
    Runner,
    key_groups,
)
from mcproxy.routing.runs import joined_answer
from mcproxy.units import ReplyRun, ReplySink
from mcproxy.wire import errors
from mcproxy.wire.request import Request, sent_request
from mcproxy.wire.response import MCMC_CODE_END, Response, client_bytes, key_reply

_EMPTY = b""

#: Children up to which a shuffle picks one of all their orders, listed
#: once (a C-level random() per request); beyond, random.sample.
_LISTED_ORDERS = 4


#: Codes of the ok answers a failover moves on from, by (lib, miss).
_MOVES_ON = {
    (False, False): frozenset(),
    (False, True): frozenset([MCMC_CODE_END]),
    (True, False): ERROR_CODES,
    (True, True): frozenset([MCMC_CODE_END]),
}


def _final(moves_on: frozenset[int], unit: ReplyRun, index: int) -> bool:
    """Whether the first child's reply to request ``index`` of ``unit``
    (one it has) is the route's: a hit always, else by its code."""
    return not moves_on or unit.replies[index].startswith(b"VALUE ") \
        or unit.response(index).code not in moves_on


class Failover(Runner):
    """``routes.failover`` over ``pools``, or routelib's ``route_failover``
    (``lib``): see the module docstring."""

    __slots__ = ("pools", "tries", "miss", "shuffle", "lib", "moves_on", "_orders")

    def __init__(self, pools: list[Pool], miss: bool, count: int | None,
                 shuffle: bool, lib: bool = False) -> None:
        super().__init__(pools)
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
                first(Response.failure(f"{NO_BACKEND}: {e}"))
                return True
            stats.req_active -= 1  # a Lua error in the body: the route fails
            route_error(req, str(e).encode())
            done(errors.LUA_FAILURE)
            return True
        backend.send(req, first)
        return True

    def runs_like(self, other: object) -> bool:
        """Whether ``other`` is a Failover that routes as this one does (the
        runner of another command of the same route): a run of both
        commands' requests may then go through this one. It may keep no
        keys for Lua, or the same as this one (send_run leaves a run with
        such a key to be routed one by one, whatever its command)."""
        return (other.__class__ is Failover and other.pools == self.pools
                and other.moves_on == self.moves_on and other.tries == self.tries
                and other.shuffle == self.shuffle and other.lib == self.lib
                and other.prefix in (None, self.prefix))

    def send_run(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                 sets: list[int], done: Done, stats: ProxyStats, route_error: RouteError,
                 sink: ReplySink | None) -> bool:
        """Route a run of plain gets and sets (RouteEngine.route_run; its
        requests are ``data[start:ends[-1]]``): each stretch of requests
        whose first child places on the same backend goes to it as the
        client sent them (a ReplyRun), and a request whose answer there is
        not the route's goes on alone, as ``send`` takes it on; ``done``
        gets every reply in order. False, with nothing done, when they go
        one by one instead (a backend with a depth limit, a key kept for
        Lua, a key the first child cannot place)."""
        if self.depth_limited or self.keeps_any(keys):
            return False
        if len(keys) == 1 and not self.shuffle:  # most often, with one request in flight
            try:
                backend = self.pools[0].select(keys[0])
            except ValueError:
                return False
            stats.count_run(1, len(sets))
            sent = data[start:ends[0]]
            backend.send_unit(ReplyRun(keys, partial(self._settle_joined, (sent,), (done,), stats,
                                                     route_error), sink, sent, sets or None))
            return True
        orders = [self.order() for _ in keys] if self.shuffle else None
        try:
            if orders is None:
                select = self.pools[0].select
                chosen = [select(key) for key in keys]
            else:
                chosen = [order[0].select(key) for order, key in zip(orders, keys, strict=True)]
        except ValueError:
            return False
        count = len(keys)
        stats.count_run(count, len(sets))
        run = _RunAttempt(self, orders, data, start, ends, done, stats, route_error)
        first = 0
        offset = start
        backend = chosen[0]
        for index in range(1, count + 1):
            if index == count or chosen[index] is not backend:
                end = ends[index - 1]
                mine = [i - first for i in sets if first <= i < index] if sets else None
                backend.send_unit(ReplyRun(keys[first:index], partial(run.settle, first), sink,
                                           data[offset:end], mine))
                if index < count:
                    first, offset, backend = index, end, chosen[index]
        return True

    def send_joined(self, keys: list[bytes], sents: list[bytes], sets: list[int],
                    dones: list[Done], stats: ProxyStats, route_error: RouteError) -> bool:
        """Route the lone plain requests of several connections (``sents``,
        of ``keys``; ``sets`` the indexes of the sets; RouteEngine.gather_plain):
        those the first child places on the same backend go to it as one
        ReplyRun, each settled as send_run settles a run of one, its reply
        to ``dones[i]``. False, with nothing done, when they go one by one
        instead (shuffled children, a backend with a depth limit, a key
        kept for Lua, a key the first child cannot place)."""
        if self.depth_limited or self.shuffle or self.keeps_any(keys):
            return False
        runs, unplaced = key_groups(self.pools[0], keys, range(len(keys)))
        if unplaced:
            return False
        stats.count_run(len(keys), len(sets))
        for backend, mine in runs.items():
            if len(runs) == 1:
                keys_of, sents_of, dones_of, data = keys, sents, dones, _EMPTY.join(sents)
            else:
                keys_of = [keys[i] for i in mine]
                sents_of = [sents[i] for i in mine]
                dones_of = [dones[i] for i in mine]
                data = _EMPTY.join(sents_of)
            sets_of = [at for at, i in enumerate(mine) if i in sets] if sets else None
            backend.send_unit(ReplyRun(keys_of, partial(self._settle_joined, sents_of, dones_of,
                                                         stats, route_error),
                                       None, data, sets_of))
        return True

    def _settle_joined(self, sents: list[bytes], dones: list[Done], stats: ProxyStats,
                       route_error: RouteError, unit: ReplyRun) -> None:
        """The first child's answers to lone requests (send_joined; of one,
        send_run's run of one): each reply the route's is final (the
        backend's bytes are the client's), the others go on, each as an
        _Attempt of its own (without one for those that do not)."""
        replies = unit.replies
        moves_on = self.moves_on
        if not moves_on and len(replies) == len(dones):  # every one read, every one final
            joined_answer(stats, dones, unit)
            return
        for index, done in enumerate(dones):
            if index < len(replies) and _final(moves_on, unit, index):
                stats.req_active -= 1
                done(replies[index])
                continue
            sent = sents[index]
            _RunAttempt(self, None, sent, 0, [len(sent)], done, stats, route_error)._go_on(
                0, unit.response(index))

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
        groups, unplaced = key_groups(order[0], keys, range(len(keys)))
        if unplaced:
            return False  # routed key by key, each key gets its error
        count = len(keys)
        stats.count_keys(req.command, count)
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
                self.answer(Response.failure(f"{NO_BACKEND}: {e}"))
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


class _RunAttempt:
    """A run of plain requests through a Failover (Failover.send_run): the
    replies of the first child's ReplyRuns, and the requests that go on,
    each as an _Attempt; ``done`` gets every request's reply, in order."""

    __slots__ = ("failover", "orders", "data", "start", "ends", "done", "stats",
                 "route_error", "parts", "pending")

    def __init__(self, failover: Failover, orders: list[list[Pool]] | None, data: bytes,
                 start: int, ends: list[int], done: Done, stats: ProxyStats,
                 route_error: RouteError) -> None:
        self.failover = failover
        #: each request's order of the children (None: the failover's own)
        self.orders = orders
        self.data = data
        self.start = start
        self.ends = ends
        self.done = done
        self.stats = stats
        self.route_error = route_error
        self.parts: list[bytes] = [_EMPTY] * len(ends)
        self.pending = len(ends)

    def settle(self, first: int, unit: ReplyRun) -> None:
        """The first child's answers to the requests from ``first`` on: each
        reply the route's is final (the backend's bytes are then the
        client's, as for any plain request), the others go on."""
        moves_on = self.failover.moves_on
        parts = self.parts
        replies = unit.replies
        final = 0
        for j in range(len(unit.keys)):
            if j < len(replies) and _final(moves_on, unit, j):
                parts[first + j] = replies[j]
                final += 1
                continue
            self._go_on(first + j, unit.response(j))
        if final:
            self.stats.req_active -= final
            self.pending -= final
            if not self.pending:
                self.done(_EMPTY.join(parts))

    def _go_on(self, index: int, res: Response) -> None:
        """Request ``index`` goes on from its first child's answer ``res``."""
        begin = self.start if index == 0 else self.ends[index - 1]
        req = sent_request(self.data[begin:self.ends[index]])
        failover = self.failover
        order = failover.pools if self.orders is None else self.orders[index]
        _Attempt(failover, order, req, partial(self._answer, index), self.stats,
                 self.route_error).answer(res)

    def _answer(self, index: int, reply: bytes) -> None:
        self.parts[index] = reply
        self.pending -= 1
        if not self.pending:
            self.done(_EMPTY.join(self.parts))


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
            batch = FailBatch(name, keys if len(positions) == len(keys) else
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
            groups, unplaced = key_groups(self.order[self.index], self.keys, still)
            for position, why in unplaced:
                if self.lib:  # the child failed that key
                    self.parts[position] = key_reply(Response.failure(
                        f"{NO_BACKEND}: {why.decode()}"))
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
