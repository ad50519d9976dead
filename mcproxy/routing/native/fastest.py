"""The native runners of ``routes.all_fastest`` and routelib's
``route_allfastest`` (see mcproxy.routing.native)."""

from __future__ import annotations

from functools import partial

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.direct import select_backend
from mcproxy.routing.native.allsync import uses_cas
from mcproxy.routing.native.common import (
    Done,
    RouteError,
    Runner,
    best_of,
    lib_backend,
    route_failed,
)
from mcproxy.routing.native.zones import await_done
from mcproxy.units import ReplySink
from mcproxy.wire.request import BROADCAST_COMMANDS, Request
from mcproxy.wire.response import Response, client_bytes


class Fastest(Runner):
    """``routes.all_fastest`` over ``pools``: the request to every child
    at once, answered, as its body's mcp.await collects them (over at the
    first ok answer; with ``miss`` at the first hit or once all answered
    ok), with the first hit, else the first ok answer, else the first. A
    request that reads or compares a cas unique (its body's cas_at_primary)
    and a broadcast command go to Lua."""

    __slots__ = ("pools", "miss")

    def __init__(self, pools: list[Pool], miss: bool) -> None:
        super().__init__(pools)
        self.pools = pools
        self.miss = miss

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would; False,
        with nothing done, for a request Lua runs."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        if req.command in BROADCAST_COMMANDS or uses_cas(req) is not False:
            return False
        try:
            backends = [select_backend(pool, req) for pool in self.pools]
        except ValueError as e:
            route_failed(req, done, stats, route_error, e)
            return True
        gather = _Await(len(backends), self.miss, req, done, stats)
        for backend in backends:
            backend.send(req, gather.arrived)
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """False: a multiget's keys go key by key, each through ``send``."""
        return False


class _Await:
    """The children's answers to one request through a Fastest, until its
    mcp.await is over (later ones are dropped, as mcp.await drops them)."""

    __slots__ = ("remaining", "wanted", "miss", "req", "done", "stats", "results", "good",
                 "over")

    def __init__(self, count: int, miss: bool, req: Request, done: Done,
                 stats: ProxyStats) -> None:
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
            return
        self.results.append(res)
        self.good += res.ok
        if await_done(self.miss, self.wanted, self.good, res.hit, self.remaining):
            self.over = True
            self.stats.req_active -= 1
            self.done(client_bytes(best_of(self.results, False), self.req))


class AllFastest(Runner):
    """routelib's ``route_allfastest`` over ``pools``: the request to every
    child at once; once one answers ok (its body's ``wait_cond(1,
    WAIT_OK)``) or all answered, the first child in order that has
    answered ok, else the last child's answer."""

    __slots__ = ("pools",)

    def __init__(self, pools: list[Pool]) -> None:
        super().__init__(pools)
        self.pools = pools

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would."""
        gather = _Fastest(len(self.pools), req, done, stats)
        for index, pool in enumerate(self.pools):
            target = lib_backend(pool, req)
            if target.__class__ is Response:
                gather.arrived(index, target)
            else:
                target.send(req, partial(gather.arrived, index))
        gather.sent()
        return True

    def send_keys(self, req: Request, keys: list[bytes], done: Done, stats: ProxyStats,
                  route_error: RouteError, sink: ReplySink | None) -> bool:
        """False: a multiget's keys go key by key, each through ``send``."""
        return False


class _Fastest:
    """The children's answers to one request, until the body's wait is
    over; answers that come in while the request is still being sent are
    only recorded, as the V2 context records them (rcontext.dispatch)."""

    __slots__ = ("results", "pending", "req", "done", "stats", "sending", "ready", "over")

    def __init__(self, count: int, req: Request, done: Done, stats: ProxyStats) -> None:
        self.results: list[Response | None] = [None] * count
        self.pending = count
        self.req = req
        self.done = done
        self.stats = stats
        self.sending = True
        #: whether the wait was over while sending
        self.ready = False
        self.over = False

    def arrived(self, index: int, res: Response) -> None:
        self.results[index] = res
        self.pending -= 1
        if self.over or self.ready or not (res.ok or not self.pending):
            return
        if self.sending:
            self.ready = True
        else:
            self._finish()

    def sent(self) -> None:
        self.sending = False
        if self.ready:
            self._finish()

    def _finish(self) -> None:
        self.over = True
        results = self.results
        answer = results[-1]
        for res in results:
            if res is not None and res.ok:
                answer = res
                break
        self.stats.req_active -= 1
        self.done(client_bytes(answer, self.req))
