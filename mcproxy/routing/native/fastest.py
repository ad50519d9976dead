"""The native runner of routelib's ``route_allfastest`` (see
mcproxy.routing.native)."""

from __future__ import annotations

from functools import partial

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.routing.native.common import Done, RouteError, Runner, lib_backend
from mcproxy.units import ReplySink
from mcproxy.wire.request import Request
from mcproxy.wire.response import Response, client_bytes


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
