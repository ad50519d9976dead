"""Sending what a V2 request context waits for (see routing/v2.lua).

When a funcgen's function waits (``rctx:wait_cond``, ``enqueue_and_wait``,
``wait_handle``), its route coroutine yields the handles queued since the
last wait. :func:`dispatch` sends each request to the backend its pool picks
and hands every reply to the context (v2.lua's ``arrived``), which says when
the wait is over; the route then resumes through ``resumed``. A handle to
another funcgen runs that funcgen's function as a route of its own, driven
here the same way, and its result is the handle's answer.

Replies of handles nobody waits for still go to the context: it records them
for a later wait or result call, and frees itself once its function has
returned and nothing is outstanding.

A wait with a timeout (and ``rctx:sleep``) also arms a timer on the engine's
clock; when it fires, v2.lua's ``timed_out`` says whether that wait is still
going on, and if so the route resumes. A stale timer does nothing.

A request sent to a backend with a ``log`` option (mcp.backend{..., log =
{...}}) may be logged when it is answered (Host.log_backend).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from lupa import lua54
from twisted.logger import Logger

from mcproxy.wire.request import KEYLESS_COMMANDS
from mcproxy.wire.response import Response

#: The step of a route that waits on its request context (mirrors mcp.lua).
YIELD_WAIT = 6

#: Why a request got no backend, or a funcgen handle's route failed.
NO_BACKEND = "nobackend"
ROUTE_FAILED = "route error"

log = Logger()


class _Dispatch:
    """One wait's sends; defers a resume asked for while still sending (a
    backend may answer at once, from inside ``send``)."""

    __slots__ = ("routes", "co", "rctx", "resumed", "sending", "resume")

    def __init__(self, routes, co, rctx, resumed: Callable) -> None:
        self.routes = routes
        self.co = co
        self.rctx = rctx
        self.resumed = resumed
        self.sending = True
        self.resume = False

    def arrived(self, handle: int, res: Response) -> None:
        routes = self.routes
        if res.value is not None:
            routes.handed(len(res.value))
        if self.sending:
            if routes.arrived(self.rctx, handle, res, res.ok, res.hit):
                self.resume = True
            return
        step = routes.arrive(self.co, self.rctx, handle, res, res.ok, res.hit)
        if step is not None:
            self.resumed(step)

    def sub_route(self, handle: int, step) -> None:
        """Drive the route of a funcgen handle until it is over."""
        try:
            while step[0] == YIELD_WAIT:
                step = dispatch(self.routes, step, partial(self.sub_route, handle))
                if step is None:
                    return
        except Exception:
            log.failure("internal error in a function generator handle")
            step = (None, None)
        self.sub_over(handle, step[0], step[1] if len(step) > 1 else None)

    def sub_over(self, handle: int, kind, value) -> None:
        routes = self.routes
        failure = Response.failure(ROUTE_FAILED)
        if self.sending:
            if routes.sub_arrived(self.rctx, handle, kind, value, failure):
                self.resume = True
            return
        step = routes.sub_arrive(self.co, self.rctx, handle, kind, value, failure)
        if step is not None:
            self.resumed(step)


def dispatch(routes, step, resumed: Callable) -> tuple | None:
    """Send the requests of a YIELD_WAIT ``step``; ``resumed(next_step)``
    runs when a reply ends the wait. Returns the next step at once instead
    when the wait is over before any reply is awaited."""
    _, co, rctx, ready, *sends = step
    count = 1
    if sends[0] < 0:  # several: (-1, table of (handle, target, request), count)
        _, table, count = sends
        sends = [table[index] for index in range(1, 3 * count + 1)]
    wait = _Dispatch(routes, co, rctx, resumed)
    for index in range(0, 3 * count, 3):
        handle, target, req = sends[index], sends[index + 1], sends[index + 2]
        if lua54.lua_type(target) == "function":  # a funcgen's route
            wait.sub_route(handle, routes.start(target, req, req.key, req.command))
            continue
        try:
            if req.command in KEYLESS_COMMANDS:
                raise ValueError("cannot route commands without key")
            backend = target.select(req.key)
        except ValueError as e:
            wait.arrived(handle, Response.failure(f"{NO_BACKEND}: {e}"))
            continue
        if backend.options.log is None:
            backend.send(req, lambda res, handle=handle: wait.arrived(handle, res))
        else:
            backend.send(req, partial(_logged, routes.host, req, backend, wait, handle))
    wait.sending = False
    if ready is True or wait.resume:
        return routes.resume_wait(co)
    if ready is not False:  # seconds until the wait times out
        routes.host.clock.callLater(max(ready, 0), _timed_out, routes, co, rctx,
                                    rctx.wait_seq, resumed)
    return None


def _logged(host, req, backend, wait: _Dispatch, handle: int, res: Response) -> None:
    """A reply from a backend that logs requests: log it, then hand it on."""
    host.log_backend(req, res, backend)
    wait.arrived(handle, res)


def _timed_out(routes, co, rctx, seq: int, resumed: Callable) -> None:
    """The timer of wait ``seq`` of ``rctx`` fired."""
    try:
        if routes.state.engine.timed_out(rctx, seq):
            resumed(routes.resume_wait(co))
    except Exception:
        log.failure("internal error ending a request context wait")
