"""The native runner of ``routes.all_sync`` and routelib's
``route_allsync`` (see mcproxy.routing.native)."""

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
    is_error,
    key_groups,
    lib_backend,
)
from mcproxy.units import ReplySink
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
    EditError,
    Request,
    find_flag,
)
from mcproxy.wire.response import Response, client_bytes, key_reply

_EMPTY = b""


def uses_cas(req: Request) -> bool | None:
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


class AllSync(Runner):
    """``routes.all_sync`` over ``pools``, or routelib's ``route_allsync``
    (``lib``): see the module docstring."""

    __slots__ = ("pools", "strict", "lib")

    def __init__(self, pools: list[Pool], strict: bool, lib: bool) -> None:
        super().__init__(pools)
        self.pools = pools
        self.strict = strict
        self.lib = lib

    def send(self, req: Request, done: Done, stats: ProxyStats,
             route_error: RouteError) -> bool:
        """Route ``req``; ``done(reply)`` once, as the body would; False,
        with nothing done, for a request the body treats apart (Lua runs
        it)."""
        prefix = self.prefix
        if prefix is not None and req.key.startswith(prefix):
            return False
        if self.lib:
            targets = [lib_backend(pool, req) for pool in self.pools]
        else:
            if req.command in BROADCAST_COMMANDS or uses_cas(req) is not False:
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
            groups, unplaced = key_groups(pool, keys, positions)
            if unplaced:
                return False
            rounds.append(groups)
        count = len(keys)
        stats.count_keys(req.command, count)
        gather = _KeysGather(self, req, keys, done, stats,
                             sum(len(groups) for groups in rounds))
        name = req.tokens[0]
        for child, groups in enumerate(rounds):
            for backend, mine in groups.items():
                batch = FailBatch(name, keys if len(mine) == count else [keys[p] for p in mine],
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
                if not res.ok or res.code in ERROR_CODES:
                    answer = res
                    break
        else:
            answer = best_of(self.arrivals, self.all_sync.strict)
        self.stats.req_active -= 1
        self.done(client_bytes(answer, self.req))


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
        if is_error(part):
            return part
    return by_child[-1][2]


def _keys_best_of(answers: list[tuple[int, bool, bytes]], strict: bool) -> bytes:
    """best_of for a key, from its ``(child, ok, client bytes)`` answers."""
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
