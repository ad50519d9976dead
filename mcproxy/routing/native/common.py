"""What the native runners share: the keys of a multiget grouped per
backend and their answers collected (also the direct path's), a KeyBatch
that tells failures apart, routelib's rule for a
request no backend takes, and the answers picked from several children."""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat

from mcproxy.backends.pool import Pool
from mcproxy.counters import ProxyStats
from mcproxy.units import KeyBatch
from mcproxy.wire import errors
from mcproxy.wire.request import KEYLESS_COMMANDS, Request
from mcproxy.wire.response import (
    MCMC_CODE_CLIENT_ERROR,
    MCMC_CODE_END,
    MCMC_CODE_ERROR,
    MCMC_CODE_SERVER_ERROR,
    Response,
)

_EMPTY = b""

Done = Callable[[bytes], None]
RouteError = Callable[[Request, bytes], None]

#: Why a routelib child got no backend (rcontext's name for it).
NO_BACKEND = "nobackend"
#: The codes of error lines (routelib's is_error, beyond failures).
ERROR_CODES = frozenset([MCMC_CODE_SERVER_ERROR, MCMC_CODE_CLIENT_ERROR, MCMC_CODE_ERROR])


class Runner:
    """What every native runner knows beyond its shape: whether a backend
    of a child has a depth limit (its multigets then go key by key, each
    key a unit, as RouteEngine.route_keys does), and the key prefix of the
    requests it keeps for Lua (introspection's) with what a request line
    holds where such a key starts."""

    __slots__ = ("depth_limited", "prefix", "guard")

    def __init__(self, pools: list[Pool]) -> None:
        self.depth_limited = any(backend.options.depth_limit
                                 for pool in pools for backend in pool.backends)
        self.prefix: bytes | None = None
        self.guard: bytes | None = None

    def keep_for_lua(self, prefix: bytes) -> None:
        """Leave requests whose key starts with ``prefix`` to Lua."""
        self.prefix = prefix
        self.guard = b" " + prefix  # a space comes before every key

    def keeps_any(self, keys: list[bytes]) -> bool:
        """Whether any of ``keys`` is one left to Lua (keep_for_lua)."""
        prefix = self.prefix
        return prefix is not None and any(map(bytes.startswith, keys, repeat(prefix)))


def key_groups(pool: Pool, keys: list[bytes], positions) -> tuple[dict, list]:
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


class FailBatch(KeyBatch):
    """A KeyBatch whose failure goes to ``failed(reason)``: a failover
    must tell a failure from an error line a backend answered."""

    __slots__ = ("failed",)

    def fail(self, reason: str, elapsed: int) -> None:
        self.failed(reason)


class KeysReply:
    """Collects the answers of the KeyBatches of one client multiget
    (RouteEngine.route_keys, a Router's keys) into its reply."""

    __slots__ = ("parts", "pending", "stats", "done")

    def __init__(self, count: int, batches: int, stats: ProxyStats, done: Done) -> None:
        self.parts: list[bytes] = [_EMPTY] * count
        self.pending = batches
        self.stats = stats
        self.done = done

    def answer_all(self, parts: list[bytes]) -> None:
        """The answer of the one batch that holds every key: each key's
        reply (units.KeyBatch), then the multiget's END."""
        self.stats.req_active -= len(self.parts)
        parts.append(errors.END)
        self.done(_EMPTY.join(parts))

    def answer(self, positions: list[int], parts: list[bytes]) -> None:
        """The answer of the batch of the keys at ``positions``."""
        self.stats.req_active -= len(positions)
        mine = self.parts
        for position, part in zip(positions, parts, strict=True):
            mine[position] = part
        self.pending -= 1
        if not self.pending:
            mine.append(errors.END)
            self.done(_EMPTY.join(mine))


def lib_backend(pool: Pool, req: Request):
    """Where routelib's child ``pool`` sends ``req``, or the failure it
    answers with (rcontext's rule: keyless commands go nowhere)."""
    try:
        if req.command in KEYLESS_COMMANDS:
            raise ValueError("cannot route commands without key")
        return pool.select(req.key)
    except ValueError as e:
        return Response.failure(f"{NO_BACKEND}: {e}")


def route_failed(req: Request, done: Done, stats: ProxyStats, route_error: RouteError,
                  error: ValueError) -> None:
    """A Lua error in a route's body: the route fails."""
    stats.req_active -= 1
    route_error(req, str(error).encode())
    done(errors.LUA_FAILURE)


def is_error(part: bytes) -> bool:
    """Whether a key's client bytes are an error line or a failure's (a
    multiget's key gets a VALUE, nothing for a miss, or such a line)."""
    return bool(part) and not part.startswith(b"VALUE ")


def best_of(arrivals: list[Response], strict: bool) -> Response:
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


def first_good(answers: list[tuple[bool, bytes]]) -> tuple[bool, bytes]:
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
