"""Runs of plain requests on the direct path: a client's run routed as it
came (``route_run``), and the lone requests of many connections in one poll
joined per backend (``gather_plain``).

These are the engine's per-request path for configs whose gets go to a pool
without Lua (direct.py) or through a native failover; they build units and
hand them to backends, and call back into the engine (``RouteEngine``) for
what runs in Lua or request by request. One :class:`RunRouter` per router
(the engine and each of its views), reconfigured by each config it takes
(``configure``), so that what it gathered in a poll is routed with the
config active when the poll ends, as a request routed alone would be.

Compiled where a compiler is (setup.py; typed by runs.pxd), as the code
every such request runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from itertools import compress

from mcproxy.units import PlainRun, ReplyRun, ReplySink
from mcproxy.wire.errors import END
from mcproxy.wire.request import Request, multiget_key, sent_request
from mcproxy.writes import batch

_EMPTY = b""


class RunRouter:
    """The direct path's runs of one router; ``engine`` is the router."""

    def __init__(self, engine, stats, tunables) -> None:
        self.engine = engine
        self.stats = stats
        self.tunables = tunables
        #: the active config's direct routes (DirectRoutes)
        self.direct = None
        #: the native failover that takes runs (Failover.runs_like), or None
        self.runner = None
        #: whether runs of plain gets are routed in Lua (RouteEngine.route_lua_run)
        self.lua_runs = False
        #: whether plain sets are gathered too
        self.gather_sets = False
        #: RouteEngine.gathers: 0 when nothing is gathered
        self.gathers = 0
        #: the most keys of a multi-key get gather_plain takes, 0: none
        self.gather_multigets = 0
        #: what gather_plain took this poll: (request or None, key, the
        #: bytes sent, whether a set, done, release, a multi-key get's
        #: number of keys or 0) each
        self.gathered: list[tuple] = []
        #: whether a multi-key get is among them
        self.gathered_multigets = False

    def configure(self, direct, runner, lua_runs: bool, gather_sets: bool,
                  gathers: int, gather_multigets: int = 0) -> None:
        """Route with a config's (RouteEngine._take)."""
        self.direct = direct
        self.runner = runner
        self.lua_runs = lua_runs
        self.gather_sets = gather_sets
        self.gathers = gathers
        self.gather_multigets = gather_multigets

    def gather_plain(self, key: bytes, sent: bytes, is_set: bool, done: Callable[[bytes], None],
                     release: Callable[[], None], req: Request | None = None,
                     width: int = 0) -> bool:
        """RouteEngine.gather for the plain request (``scan_plain``'s) of
        a run of one: the get of ``key``, or the set, ``sent``; ``req`` its
        Request when the caller has one (gather). ``width``: the number of
        keys of a multi-key get (``key`` its keys as scanned, joined by
        spaces), taken up to ``gather_multigets`` keys (on the direct path
        to one backend, and where gets are routed in Lua)."""
        if is_set and not self.gather_sets or width > self.gather_multigets \
                or self.tunables.active_req_limit:
            return False
        gathered = self.gathered
        gathered.append((req, key, sent, is_set, done, release, width))
        if width:
            self.gathered_multigets = True
        if len(gathered) == 1:  # (after: the schedule may route at once)
            batch.call_first(self.route_gathered)
        return True

    def route_gathered(self) -> None:
        """Route what gather took this poll, then release its connections."""
        gathered = self.gathered
        self.gathered = []
        multigets = self.gathered_multigets
        self.gathered_multigets = False
        _, keys, sents, is_sets, dones, releases, widths = zip(*gathered, strict=True)
        try:
            sets = list(compress(range(len(is_sets)), is_sets)) if True in is_sets else []
            if len(gathered) == 1 or sets and not self.gather_sets \
                    or multigets and self.runner is not None:
                # alone; or the routes reloaded since (so also below)
                self.route_each(gathered)
            elif self.lua_runs:
                self.engine.route_lua_gathered(keys, sents, sets, dones,
                                               widths if multigets else None)
            elif self.runner is not None:
                if not self.runner.send_joined(list(keys), sents, sets, dones, self.stats,
                                               self.engine._route_error):
                    self.route_each(gathered)
            elif self.gathers:
                self._route_joined(gathered, keys, sents, dones, sets,
                                   {index: width for index, width in enumerate(widths) if width}
                                   if multigets else None)
            else:
                self.route_each(gathered)
        finally:
            for release in releases:
                release()

    def route_each(self, gathered: list[tuple]) -> None:
        """Route every gathered request on its own, as its connection would have."""
        for req, key, sent, is_set, done, _, width in gathered:
            if req is None:
                if self.route_run(sent, 0, [key], [len(sent)], [0] if is_set else [],
                                  {0: width} if width else None, done):
                    continue
                req = sent_request(sent)
                if width:
                    self._route_multiget(req, key.split(b" "), done)
                    continue
            self.engine.route(req, done)

    def _route_multiget(self, req: Request, keys: list[bytes],
                        done: Callable[[bytes], None]) -> None:
        """route_each for a multi-key get route_run did not take (a key
        kept for Lua; the routes reloaded since it was gathered): its keys
        together where the engine can (route_keys), else each routed on its
        own, then the ``END``, as the protocol routes a hooked multiget
        (ProxyServerProtocol._multiget, which a gathered request can no
        longer go back to)."""
        engine = self.engine
        if engine.route_keys(req, keys, done):
            return
        reply = RunsReply(len(keys) + 1, self.stats, done)
        for index, key in enumerate(keys):
            engine.route(multiget_key(req, b"get ", key), partial(reply.answer, index, 0))
        reply.answer(len(keys), 0, END)

    def _route_joined(self, gathered: list[tuple], keys: tuple[bytes, ...],
                      sents: tuple[bytes, ...], dones: tuple, sets: list[int],
                      widths: dict[int, int] | None) -> None:
        """Route gathered requests of the direct path (their ``keys``,
        bytes ``sents``, ``dones``; ``sets`` the indexes of the sets,
        ``widths`` the key counts of the multi-key gets): those its pool
        sends to the same backend go to it as one ReplyRun, each connection
        answered the reply to its own request (the backend's bytes, as
        route_run answers them); one the direct path would not take as a
        run goes alone. Asked of them all at once, the pool usually has one
        backend for the lot."""
        stats = self.stats
        target = self.direct.run_target
        sent = _EMPTY.join(sents)
        chosen = target(sent, keys, widths)
        if chosen is not None and chosen.__class__ is not list:
            unit = ReplyRun(list(keys), partial(joined_answer, stats, dones), None, sent,
                            sets or None, widths)
            stats.count_run(unit.requests, len(sets))
            chosen.send_unit(unit)
            return
        if chosen is None:  # some request it would not take: ask for each
            chosen = [target(one, (key,), {0: widths[index]} if widths and index in widths
                             else None)
                      for index, (key, one) in enumerate(zip(keys, sents, strict=True))]
        runs: dict = {}
        alone = []
        for index, backend in enumerate(chosen):
            if backend is None or backend.options.depth_limit:
                alone.append(index)
            elif backend in runs:
                runs[backend].append(index)
            else:
                runs[backend] = [index]
        setting = frozenset(sets)
        for backend, indexes in runs.items():
            mine = [at for at, index in enumerate(indexes) if index in setting] if sets else None
            theirs = {at: widths[index] for at, index in enumerate(indexes)
                      if index in widths} if widths else None
            unit = ReplyRun([keys[i] for i in indexes],
                            partial(joined_answer, stats, tuple([dones[i] for i in indexes])),
                            None, _EMPTY.join([sents[i] for i in indexes]), mine, theirs or None)
            stats.count_run(unit.requests, len(mine) if mine else 0)
            backend.send_unit(unit)
        if alone:
            self.route_each([gathered[index] for index in alone])

    def route_run(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                  sets: list[int], widths: dict[int, int] | None,
                  done: Callable[[bytes], None], sink: ReplySink | None = None) -> bool:
        """RouteEngine.route_run: route a run of plain requests
        (``request.scan_plain``: they are ``data[start:ends[-1]]``, ``keys``
        and ``ends`` their keys and end offsets in ``data``, ``sets`` the
        indexes of the sets, the rest gets, ``widths`` the key counts of
        multi-key gets) whose commands' routes are the same direct pool call
        (RouteEngine's ``plain_runs``; multi-key gets only with
        ``plain_multigets``).

        The pool still picks each key's backend; each stretch of requests
        bound for the same backend is sent to it as they came (a
        PlainRun), and ``done(reply)`` runs once with every reply in order,
        which is what the requests routed one by one (the keys of a
        multiget together, see RouteEngine.route_keys) would have answered.
        ``sink`` as for route_keys.

        A run whose routes run in Lua is routed as the keys of a multiget
        are (RouteEngine.route_lua_run). A run through ``routes.failover``
        (or routelib's route_failover) goes to its first child as it came,
        only the requests whose answer there is not the route's on to the
        next (Failover.send_run).

        False, with nothing done, when this does not apply (no such route,
        an active request limit, a backend with a depth limit, a key the
        pool cannot place): the caller then routes request by request.
        """
        if self.tunables.active_req_limit:
            return False
        if self.lua_runs:  # no direct pool for gets, no runner (RouteEngine._take)
            return self.engine.route_lua_run(data, start, keys, ends, sets, widths, done, sink)
        backend = self.direct.run_target(data, keys, widths)
        if backend is None:
            runner = self.runner
            if runner is not None:
                return runner.send_run(data, start, keys, ends, sets, done, self.stats,
                                       self.engine._route_error, sink)
            return False
        if backend.__class__ is list:
            return self._route_stretches(data, start, keys, ends, sets, backend, done, sink)
        stop = ends[-1]
        run = PlainRun(data if start == 0 and stop == len(data) else data[start:stop],
                       keys, sets, widths, sink)
        requests = run.size
        self.stats.count_run(requests, len(sets))
        run.done = partial(run_answered, requests, self.stats, done)
        backend.send_unit(run)
        return True

    def _route_stretches(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                         sets: list[int], chosen: list, done: Callable[[bytes], None],
                         sink: ReplySink | None) -> bool:
        """route_run for single-key requests bound for several backends
        (``chosen``, by request): each stretch of consecutive requests for
        the same backend goes to it as a PlainRun; ``done`` gets their
        replies joined in order."""
        starts = [0]
        backends = [chosen[0]]
        for index, backend in enumerate(chosen):
            if backend is not backends[-1]:
                starts.append(index)
                backends.append(backend)
        for backend in backends:
            if backend.options.depth_limit:
                return False
        self.stats.count_run(len(chosen), len(sets))
        reply = RunsReply(len(backends), self.stats, done)
        starts.append(len(chosen))
        offset = start
        for index, backend in enumerate(backends):
            first, last = starts[index], starts[index + 1]
            end = ends[last - 1]
            run = PlainRun(data[offset:end], keys[first:last],
                           [i - first for i in sets if first <= i < last], sink=sink)
            run.done = partial(reply.answer, index, run.size)
            backend.send_unit(run)
            offset = end
        return True


def run_answered(requests: int, stats, done: Callable[[bytes], None], reply: bytes) -> None:
    """The answer of a run that holds every request of the client's run."""
    stats.req_active -= requests
    done(reply)


def joined_answer(stats, dones: Sequence[Callable[[bytes], None]], unit: ReplyRun) -> None:
    """Each connection of a joined ReplyRun its reply, the backend's bytes
    (RunRouter._route_joined; Failover._settle_joined when every one is
    final)."""
    stats.req_active -= unit.requests
    replies = unit.replies
    if len(replies) == len(dones):
        for done, reply in zip(dones, replies, strict=True):
            done(reply)
    else:
        for index, done in enumerate(dones):
            done(unit.reply(index))


class RunsReply:
    """Collects the answers of the parts of one client run into its reply:
    PlainRuns that went to several backends (RunRouter._route_stretches),
    the pieces of a run routed in Lua (RouteEngine._route_lua_pieces)."""

    __slots__ = ("parts", "pending", "stats", "done")

    def __init__(self, runs: int, stats, done: Callable[[bytes], None]) -> None:
        self.parts: list[bytes] = [_EMPTY] * runs
        self.pending = runs
        self.stats = stats
        self.done = done

    def answer(self, index: int, requests: int, reply: bytes) -> None:
        self.stats.req_active -= requests
        self.parts[index] = reply
        self.pending -= 1
        if not self.pending:
            self.done(_EMPTY.join(self.parts))
