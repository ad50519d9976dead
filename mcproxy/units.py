"""The work in flight on a backend connection: units behind one interface.

Pure: no Twisted imports. A backend connection (backends/connection.py)
holds a queue of units, writes them in per-turn batches and hands the
replies to the unit at the head; it never asks which kind it holds. Every
unit implements :class:`Unit`: the bytes to write, consuming its replies
(each checked against its request), failing, and delivering its result to
``done``, exactly once either way.

The kinds, and what ``done`` gets:

* :class:`Single`: one request; its Response (the reply, or a failure).
* :class:`KeyBatch`: the keys of one client multiget bound for one
  backend, sent as one multi-key get; the client bytes of each key, in
  order.
* :class:`KeyFetch`: the keys of one client multiget that Lua routes sent
  to one backend, sent as one multi-key get; the unit, from which each
  key's route gets its own answer.
* :class:`ReplyRun`: plain gets and sets sent to one backend as the
  client sent them, each reply kept apart (the gets Lua routes sent
  unedited to it, a stretch of a run a native runner sends); the unit, as
  for a KeyFetch.
* :class:`PlainRun`: a run of plain requests forwarded as the client sent
  them; the client bytes of them all.
* Consecutive Singles that are keys of client multigets, written in one
  batch, travel as one multi-key get (:class:`_MergedGets`, as nutcracker
  does) whose reply is split per key: each Single stays a unit of its own,
  answered with its key's Response.

What a client gets for a key that missed or failed is
``response.key_reply``/``response.every_key``'s rule, used by every kind.

Where a C compiler is, Cython also builds this module from this file,
typed by ``units.pxd`` (mcproxy.compiled): each kind is then an extension
type whose state is C fields (so, as with ``__slots__``, a unit has no
attribute but those).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from mcproxy.wire.errors import END
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import CMD_GET, CMD_GETS, Request
from mcproxy.wire.response import (
    MCMC_RESP_END,
    MCMC_RESP_ERRMSG,
    Response,
    check_reply,
    every_key,
    key_reply,
    mismatched,
)

_EMPTY = b""

#: KeyFetch.flags of a key that missed, and of one that hit.
_MISSED = 1
_HIT = 2
#: one key's hit, as ``flags`` gives it
_ALL_HIT = bytes((_HIT,))

#: Keys merged into one backend multiget at most.
MAX_MERGED_KEYS = 100


class ReplySink(Protocol):
    """Whom the reply of a KeyBatch or PlainRun is for: told of its bytes as
    they arrive (they count against the client's output limit), and asked
    whether they are still wanted (if not, they are framed and dropped)."""

    def arriving(self, size: int) -> None: ...

    @property
    def wanted(self) -> bool: ...


@runtime_checkable
class Unit(Protocol):
    """What a backend connection knows of the work it carries.

    A Protocol, not a base class: the kinds share no code, and the hot path
    pays for no inheritance; ``isinstance(unit, Unit)`` checks the shape.

    ``size``: the client requests it carries (each key of a KeyBatch, each
    request and multiget key of a PlainRun), counted in the backend's depth
    and once each in its latency samples. ``sent``: when the backend queued
    it (set by ``Backend.send_unit``; its read deadline and latency run
    from then). ``sink``: the
    ReplySink its reply's bytes are counted against as they arrive, or None.
    ``done``: called once with the unit's result (see the module docstring).
    """

    size: int
    sent: float
    sink: ReplySink | None
    done: Callable

    def write(self, out: list[bytes], batch: list[Unit], index: int) -> int:
        """Append the bytes to send to ``out``. ``batch[index:]`` are the
        units written after this one in the same send; a unit may take
        some into its own backend request (each still read and settled as
        a unit of its own). Returns the index of the first unit it did not
        take."""

    def read(self, reader: ResponseReader) -> bool:
        """Consume this unit's replies from ``reader``, as far as they have
        arrived; True once complete. Raises ``BackendProtocolError`` for a
        reply that does not answer its request, or a garbage stream."""

    def deliver(self, elapsed: int) -> None:
        """Give ``done`` the result, once ``read`` returned True; ``elapsed``
        is microseconds since ``sent``."""

    def fail(self, reason: str, elapsed: int) -> None:
        """Give ``done`` a failure for ``reason`` instead, each request its
        own (memcached's backend failure names)."""


class Single:
    """One request; ``done`` gets its Response: the reply, checked against
    the request (``response.check_reply``), or a failure. ``response`` is
    set once read."""

    __slots__ = ("request", "done", "sent", "response", "merged")

    size = 1
    sink = None

    def __init__(self, request: Request, done: Callable[[Response], object]) -> None:
        self.request = request
        self.done = done
        #: the multi-key get this request was written in, if any
        self.merged: _MergedGets | None = None

    def __repr__(self) -> str:
        return f"<Single {self.request.line!r}>"

    def write(self, out: list[bytes], batch: list, index: int) -> int:
        req = self.request
        name = _merge_name(req) if req.multiget else None
        if name is not None:
            end = index
            stop = min(len(batch), index + MAX_MERGED_KEYS - 1)
            while end < stop and _merge_name_of(batch[end]) == name:
                end += 1
            if end > index:
                out.append(_MergedGets(name, [self, *batch[index:end]]).line)
                return end
        out.append(req.wire_line())
        value = req.value
        if value is not None:
            out.append(value)
        return index

    def read(self, reader: ResponseReader) -> bool:
        merged = self.merged
        if merged is not None:
            return merged.read(reader)
        res = reader.read()
        if res is None:
            return False
        check_reply(self.request, res)
        self.response = res
        return True

    def deliver(self, elapsed: int) -> None:
        res = self.response
        res.elapsed = elapsed
        self.done(res)

    def fail(self, reason: str, elapsed: int) -> None:
        self.merged = None
        res = Response.failure(reason)
        res.elapsed = elapsed
        self.done(res)


_MERGEABLE = {CMD_GET: b"get", CMD_GETS: b"gets"}


def _merge_name(req: Request) -> bytes | None:
    """``get``/``gets`` if ``req`` is one key of a client multiget that can
    share a backend request with its neighbours (unedited, no noreply)."""
    if not req.multiget or req.noreply:
        return None
    name = _MERGEABLE.get(req.command)
    tokens = req.tokens
    if name is None or len(tokens) != 2 or tokens[0] != name or tokens[1] != req.key:
        return None
    return name


def _merge_name_of(unit: Unit) -> bytes | None:
    """_merge_name of a unit's request, None for a unit that is not a Single."""
    return _merge_name(unit.request) if unit.__class__ is Single else None


class _MergedGets:
    """Consecutive Singles, each a key of a client multiget, written as one
    multi-key ``get``/``gets`` (one backend request and reply instead of
    one per key). Each Single stays a unit in the queue; the first to read
    reads the whole reply and gives each its response: its ``VALUE``, a
    miss, or the error line that answers them all."""

    __slots__ = ("singles", "keys", "line", "values", "complete")

    def __init__(self, name: bytes, singles: list[Single]) -> None:
        self.singles = singles
        self.keys = keys = [single.request.key for single in singles]
        self.line = b"%s %s\r\n" % (name, b" ".join(keys))
        #: the VALUE items read so far (ResponseReader.read_aligned)
        self.values: list[bytes | None] = []
        self.complete = False
        for single in singles:
            single.merged = self

    def read(self, reader: ResponseReader) -> bool:
        if self.complete:
            return True
        values = self.values
        res = reader.read_aligned(self.keys, values)
        if res is None:
            return False
        _check_multi_end(res)
        singles = self.singles
        if res.type == MCMC_RESP_END:
            for single, value in zip(singles, values, strict=True):
                single.response = Response.miss() if value is None else Response.of_item(value)
        else:
            for single in singles:
                single.response = res
        self.complete = True
        self.singles = self.values = None  # no cycle left with the Singles
        return True


def _read_parts(reader: ResponseReader, keys: list[bytes], parts: list[bytes | None],
                sink: ReplySink | None) -> Response | None:
    """ResponseReader.read_aligned, for a ``sink`` that no longer wants the
    reply dropping the values as they come (their keys read as misses:
    nobody gets the reply, which is still checked)."""
    res = reader.read_aligned(keys, parts)
    if sink is not None and not sink.wanted:
        parts[:] = [None] * len(parts)
    return res


class KeyBatch:
    """The keys of one client ``get``/``gets`` multiget that go to the same
    backend, sent as one multi-key request (see ``RouteEngine.route_keys``).
    ``keys`` keeps duplicates and the client's order. ``done`` gets the
    client bytes of each key (``response.key_reply``), in that order.
    Values for a ``sink`` that no longer wants them are dropped as they
    come (their keys are kept: the reply is still checked)."""

    __slots__ = ("name", "keys", "done", "sink", "sent", "size", "_values", "_parts")

    def __init__(self, name: bytes, keys: list[bytes], done: Callable[[list[bytes]], object],
                 sink: ReplySink | None = None) -> None:
        self.name = name
        self.keys = keys
        self.done = done
        self.sink = sink
        self.size = len(keys)
        #: the VALUE items read so far (ResponseReader.read_aligned)
        self._values: list[bytes | None] = []
        self._parts: list[bytes] = []

    def __repr__(self) -> str:
        return f"<KeyBatch {self.name.decode()} of {self.size}>"

    def write(self, out: list[bytes], batch: list, index: int) -> int:
        out.append(b"%s %s\r\n" % (self.name, b" ".join(self.keys)))
        return index

    def read(self, reader: ResponseReader) -> bool:
        values = self._values
        res = _read_parts(reader, self.keys, values, self.sink)
        if res is None:
            return False
        _check_multi_end(res)
        if res.type == MCMC_RESP_END:
            self._parts = [value or _EMPTY for value in values]
        else:
            self._parts = [key_reply(res)] * self.size
        self._values = []
        return True

    def deliver(self, elapsed: int) -> None:
        self.done(self._parts)

    def fail(self, reason: str, elapsed: int) -> None:
        self.done([key_reply(Response.failure(reason))] * self.size)


class KeyFetch:
    """Keys of one client ``get``/``gets`` multiget that Lua routes sent to
    the same backend, as one multi-key request (``RouteEngine.route_keys``
    for a Lua route). Unlike a KeyBatch, each key keeps its own answer for its
    route to look at: ``done`` gets the unit itself, which gives each
    key's ``ok``/``hit`` (``flags``), its Response (``response``, made
    only when asked) and its client bytes (``part``: key_reply's rule).
    ``keys`` keeps duplicates and the order they were sent in. Values for a
    ``sink`` that no longer wants them are dropped as they come (their keys
    then read as misses: nobody gets the reply)."""

    __slots__ = ("name", "keys", "done", "sink", "sent", "size", "elapsed", "items",
                 "parts", "error", "_responses")

    def __init__(self, name: bytes, keys: list[bytes], done: Callable[[KeyFetch], object],
                 sink: ReplySink | None = None) -> None:
        self.name = name
        self.keys = keys
        self.done = done
        self.sink = sink
        self.size = len(keys)
        self.elapsed = 0
        #: per key its VALUE item or None (a miss), once read
        self.items: list[bytes | None] = []
        #: per key what the client gets for it (key_reply's rule), once read
        self.parts: list[bytes] = []
        #: the Response answering every key (an error line, a failure)
        self.error: Response | None = None
        self._responses: dict[int, Response] = {}

    def __repr__(self) -> str:
        return f"<KeyFetch {self.name.decode()} of {self.size}>"

    def write(self, out: list[bytes], batch: list, index: int) -> int:
        out.append(b"%s %s\r\n" % (self.name, b" ".join(self.keys)))
        return index

    def read(self, reader: ResponseReader) -> bool:
        items = self.items
        res = _read_parts(reader, self.keys, items, self.sink)
        if res is None:
            return False
        _check_multi_end(res)
        if res.type == MCMC_RESP_END:
            # (every key a hit, most often: the items are the parts)
            self.parts = items if None not in items else [item or _EMPTY for item in items]
        else:
            self._answer_all(res)
        return True

    def deliver(self, elapsed: int) -> None:
        self.elapsed = elapsed
        self.done(self)

    def fail(self, reason: str, elapsed: int) -> None:
        self._answer_all(Response.failure(reason))
        self.elapsed = elapsed
        self.done(self)

    def _answer_all(self, res: Response) -> None:
        """``res`` answers every key (an error line, a failure)."""
        self.error = res
        self.parts = [key_reply(res)] * self.size

    def flags(self) -> bytes:
        """Each key's ``ok`` and ``hit`` in one byte: 0 failed (not ok),
        1 missed, 2 hit (mcp.lua's resume_keys reads them)."""
        error = self.error
        if error is not None:
            return bytes((error.ok + error.hit,)) * self.size
        items = self.items
        if None not in items:
            return _ALL_HIT * len(items)
        return bytes([_MISSED if item is None else _HIT for item in items])

    def response(self, index: int) -> Response:
        """The Response of the key at ``index`` (one object per key)."""
        res = self._responses.get(index)
        if res is None:
            res = self.error
            if res is None:
                item = self.items[index]
                res = Response.miss() if item is None else Response.of_item(item)
                self._responses[index] = res
            res.elapsed = self.elapsed
        return res

    def value_bytes(self) -> int:
        """Bytes of the values read (with their VALUE lines)."""
        return sum(map(len, self.parts))


class ReplyRun:
    """Plain ``get <key>`` and ``set`` requests sent to one backend as the
    client sent them (``data``; None: gets of ``keys``, one line each),
    each reply kept as the bytes that came (``replies``) and checked against
    its request as a PlainRun's are (``sets``: the indexes of the sets), so
    the backend sees and answers exactly what it would for the requests
    alone. The unit of the gets Lua routes sent unedited to one backend
    (engine._LuaKeys) and of a stretch of a client's run a native runner
    sends to one backend (native/failover.py): ``done`` gets the unit, and
    each request its own answer: ``flags`` (KeyFetch's), ``reply(index)``
    (what the client of the request unedited gets: the backend's bytes),
    ``response(index)`` (a Response, made only when asked). ``widths``
    maps the index of each multi-key get among them (``data`` then holds
    it, its keys joined by spaces in ``keys``, as a PlainRun's) to its
    number of keys; only the direct path joins those
    (RunRouter._route_joined), and asks for ``reply`` alone. ``requests``
    counts every key of those as a request, as routing them one by one
    does. While it is read, ``size`` counts the requests not yet answered
    (what a reset fails); once read, all of them (each a latency sample).
    Values for a ``sink`` that no longer wants them are dropped as they
    come (those gets then read as misses: nobody gets the reply)."""

    __slots__ = ("keys", "data", "sets", "widths", "done", "sink", "sent", "requests", "size",
                 "elapsed", "replies", "failure", "_responses")

    def __init__(self, keys: list[bytes], done: Callable[[ReplyRun], object],
                 sink: ReplySink | None = None, data: bytes | None = None,
                 sets: list[int] | None = None, widths: dict[int, int] | None = None) -> None:
        self.keys = keys
        self.data = data
        self.sets = frozenset(sets) if sets else None
        self.widths = widths
        self.done = done
        self.sink = sink
        self.requests = self.size = len(keys) if widths is None \
            else len(keys) + sum(widths.values()) - len(widths)
        self.elapsed = 0
        #: each request's reply as it came, for those read
        self.replies: list[bytes] = []
        #: what answers the requests left unread when the unit failed
        self.failure: Response | None = None
        self._responses: dict[int, Response] = {}

    def __repr__(self) -> str:
        return f"<ReplyRun of {len(self.keys)}>"

    def write(self, out: list[bytes], batch: list, index: int) -> int:
        data = self.data
        out.append(b"get %s\r\n" % b"\r\nget ".join(self.keys) if data is None else data)
        return index

    def read(self, reader: ResponseReader) -> bool:
        keys = self.keys
        sets = self.sets
        replies = self.replies
        count = len(keys)
        sink = self.sink
        try:
            while len(replies) < count:
                had = len(replies)
                read = reader.read_each(count - had, replies, keys, sets, self.widths)
                if not read:
                    return False
                if sink is not None and not sink.wanted:  # nobody gets the values
                    for i in range(had, had + read):
                        if replies[i].startswith(b"VALUE "):
                            replies[i] = END
        finally:  # the requests still waiting (all of them once answered)
            self.size = self._left(len(replies))
        return True

    def _left(self, read: int) -> int:
        """The requests of those after the first ``read`` (all once every
        one is read)."""
        widths = self.widths
        if read == len(self.keys):
            return self.requests
        if widths is None:
            return len(self.keys) - read
        return sum([widths.get(index, 1) for index in range(read, len(self.keys))])

    def deliver(self, elapsed: int) -> None:
        self.elapsed = elapsed
        self.done(self)

    def fail(self, reason: str, elapsed: int) -> None:
        """Those read keep their replies; the rest fail, each its own."""
        self.failure = Response.failure(reason)
        self.deliver(elapsed)

    def flags(self) -> bytes:
        """As KeyFetch.flags: 2 for a hit (an error line is one, as for a
        Response), 1 for a miss, 0 for a request the failure answers."""
        replies = self.replies
        if END not in replies:  # every request read a hit, most often
            flags = _ALL_HIT * len(replies)
        else:
            flags = bytes([_MISSED if reply == END else _HIT for reply in replies])
        return flags + bytes(len(self.keys) - len(flags))

    def reply(self, index: int) -> bytes:
        """What the client of request ``index``, unedited, gets."""
        replies = self.replies
        if index < len(replies):
            return replies[index]
        width = None if self.widths is None else self.widths.get(index)
        return self.failure.line if width is None else every_key(self.failure.line, width)

    def response(self, index: int) -> Response:
        """The Response of request ``index`` (one object per request)."""
        res = self._responses.get(index)
        if res is None:
            replies = self.replies
            if index < len(replies):
                reader = ResponseReader()
                reader.feed(replies[index])
                res = reader.read()
            else:
                res = Response.failure(self.failure.reason)
            res.elapsed = self.elapsed
            self._responses[index] = res
        return res

    @property
    def parts(self) -> list[bytes]:
        """As KeyFetch.parts: each request's reply by key_reply's rule (for
        a route of a multiget's key that answers with a run's response)."""
        return [key_reply(self.response(index)) for index in range(len(self.keys))]

    def value_bytes(self) -> int:
        """Bytes of the replies read."""
        return sum(map(len, self.replies))


class PlainRun:
    """Consecutive plain ``get``/``set`` requests of one client bound for
    the same backend (see ``request.scan_plain``), sent as the client sent
    them: ``data`` is their bytes, ``keys`` the key of each (a multi-key
    get's keys as sent, one space between them), ``sets`` the indexes of
    the sets among them (None: there are none). ``widths`` maps the index
    of each ``get`` of several keys to its number of keys (None: there are
    none); ``size`` counts every key of those as a request, as routing them
    one by one does.

    The replies are collected in ``parts`` as they arrive, ``answered`` of
    them so far, each checked against its request
    (``ResponseReader.read_raw``). ``done`` (set by the sender) gets the
    client bytes of them all: the replies as they came, or on a failure
    those that came and a failure for each request left. Replies for a
    ``sink`` that no longer wants them are dropped as they come."""

    __slots__ = ("data", "keys", "count", "sets", "widths", "size", "parts", "answered",
                 "sink", "done", "sent")

    def __init__(self, data: bytes, keys: list[bytes], sets: list[int] | None = None,
                 widths: dict[int, int] | None = None, sink: ReplySink | None = None) -> None:
        self.sink = sink
        self.data = data
        self.keys = keys
        self.count = count = len(keys)
        self.sets = frozenset(sets) if sets else None
        self.widths = widths
        self.size = count if widths is None else count + sum(widths.values()) - len(widths)
        self.parts: list[bytes] = []
        self.answered = 0

    def __repr__(self) -> str:
        return f"<PlainRun of {self.count}>"

    def write(self, out: list[bytes], batch: list, index: int) -> int:
        out.append(self.data)
        return index

    def read(self, reader: ResponseReader) -> bool:
        count = self.count
        answered = self.answered
        sink = self.sink
        while answered < count:
            framed = reader.read_raw(count - answered, self.parts, self.keys, self.sets,
                                     self.widths, answered)
            if sink is not None and not sink.wanted:
                self.parts.clear()
                reader.drop_held()
            if not framed:
                return False
            answered += framed
            self.answered = answered
        return True

    def deliver(self, elapsed: int) -> None:
        parts = self.parts
        self.done(parts[0] if len(parts) == 1 else _EMPTY.join(parts))

    def fail(self, reason: str, elapsed: int) -> None:
        line = Response.failure(reason).line
        parts = self.parts
        widths = self.widths
        if widths is None:
            parts.append(line * (self.count - self.answered))
        else:
            for index in range(self.answered, self.count):
                width = widths.get(index)
                parts.append(line if width is None else every_key(line, width))
        self.done(_EMPTY.join(parts))


def _check_multi_end(res: Response) -> None:
    """A multi-key get's reply ends in ``END`` or an error line."""
    if res.type != MCMC_RESP_END and res.type != MCMC_RESP_ERRMSG:
        raise mismatched("reply of the wrong kind", b"get", res.line)
