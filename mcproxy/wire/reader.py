"""The incremental reader of one backend connection's byte stream.

Pure: no Twisted imports. It frames what arrives into replies: each one
parsed into a Response (``read``, mcproxy.wire.response's parse_reply), the
items of a multi-key get's reply by key (``read_aligned``), or, for
requests whose client gets the backend's bytes as they came (runs of plain
requests), only framed and checked against its request (``read_raw``).
Anything that does not answer its request is raised as
BackendProtocolError.

Compiled where a compiler is (setup.py; typed by reader.pxd): every reply
every backend sends goes through it. The framing loops of plain replies are
C either way where ``_frames`` is built.
"""

from __future__ import annotations

try:  # the compiled framing loops (setup.py builds them where a compiler is)
    from mcproxy.wire._frames import aligned_values, plain_run
except ImportError:
    aligned_values = plain_run = None
from mcproxy.wire.errors import END
from mcproxy.wire.response import (
    MAX_LINE,
    MCMC_RESP_END,
    MCMC_RESP_ERRMSG,
    MCMC_RESP_GET,
    VALUE_LINE,
    WHOLE_LINES,
    BackendProtocolError,
    Response,
    every_key,
    mismatched,
    parse_reply,
    value_key,
)

_EMPTY = b""

#: What read_aligned returns for the ``END`` that ends a multi-key reply:
#: one Response for every such reply, for its caller to recognise, not to
#: keep or change.
_ALIGNED_END = Response.miss()


def _plain_end(buf: bytes, pos: int, key: bytes, is_set: bool) -> int:
    """Where the reply at ``buf[pos]`` to a plain ``get <key>`` (with
    ``is_set``, a plain ``set``) ends, for the common complete replies (a
    line that is just a known token, a plain ``VALUE`` with its data and
    ``END``), raising FAIL_MISMATCH if it cannot answer that request; 0
    for anything else, which ``parse_reply`` and ``_check_plain`` judge."""
    if buf.startswith(b"VALUE ", pos):
        line = VALUE_LINE.match(buf, pos)
        if line is not None:
            vend = line.end() + int(line[2]) + 2
            if buf.startswith(b"\r\nEND\r\n", vend - 2):
                if is_set or line[1] != key:
                    raise mismatched("VALUE of another request", key, line[0])
                return vend + 5
        return 0
    end = buf.find(b"\n", pos) + 1
    if end:
        answers = _PLAIN_ANSWERS.get(buf[pos:end])
        if answers is not None:
            if answers is not _ANY and answers is not is_set:
                raise mismatched("reply of the wrong kind", key, buf[pos:end])
            return end
    return 0


#: The replies a plain ``set`` gets besides error lines.
_SET_REPLIES = (b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n")
_ANY = "any"
#: Whole-line replies a plain request may get: to a get (False), to a set
#: (True), or to either (_ANY, the error lines).
_PLAIN_ANSWERS = {
    END: False, **dict.fromkeys(_SET_REPLIES, True),
    **{line: _ANY for line, known in WHOLE_LINES.items() if known[1] == MCMC_RESP_ERRMSG},
}
def _check_plain(res: Response, key: bytes, is_set: bool) -> None:
    """Raise FAIL_MISMATCH unless ``res`` (one ``_plain_end`` could not
    frame) can answer a plain ``get <key>`` (or with ``is_set`` a plain
    ``set``): the same rules, on a parsed reply."""
    rtype = res.type
    if rtype == MCMC_RESP_ERRMSG:
        return
    if is_set:
        if res.line in _SET_REPLIES:
            return
    elif rtype == MCMC_RESP_END or (rtype == MCMC_RESP_GET and value_key(res.line) == key):
        return
    raise mismatched("reply of another request", key, res.line)


def _next_key(keys: list[bytes], index: int, key: bytes) -> int:
    """The index after ``key`` among ``keys[index:]``: memcached answers a
    multi-key get in the order of its keys, skipping misses, so a key not
    found there is another request's."""
    try:
        return keys.index(key, index) + 1
    except ValueError:
        raise mismatched("VALUE of a key not asked for, or out of order",
                         b" ".join(keys), key) from None


def _multi_end(buf: bytes, pos: int, keys: list[bytes]) -> int:
    """Where the reply to a get of ``keys`` at ``buf[pos]`` ends, when it is
    complete and plain (plain ``VALUE`` items of those keys in their order,
    then ``END``); 0 for anything else, which ``ResponseReader._read_multi``
    judges."""
    index = 0
    match = VALUE_LINE.match
    find = keys.index
    while (line := match(buf, pos)) is not None:
        try:
            index = find(line[1], index) + 1
        except ValueError:
            _next_key(keys, index, line[1])  # raises the mismatch
        pos = line.end() + int(line[2]) + 2
        if not buf.startswith(b"\r\n", pos - 2):
            return 0
    return pos + 5 if buf.startswith(b"END\r\n", pos) else 0


class ResponseReader:
    """Incremental parser for one backend connection's byte stream.

    ``feed`` received bytes, then call ``read`` until it returns None. While
    a reply is incomplete the reader only collects chunks: it knows how many
    bytes it needs (or that it needs a newline) and joins the chunks once,
    so values of any size cost linear time.
    """

    __slots__ = ("_buf", "_pos", "_parts", "_have", "_need", "_held", "_held_next")

    def __init__(self) -> None:
        self._buf = _EMPTY
        self._pos = 0
        self._parts: list = []
        self._have = 0
        self._need = 0
        #: the VALUE items of the multi-key reply read_raw is reading, and
        #: the index of the key the next may answer, while its END has not
        #: arrived
        self._held: list[bytes] = []
        self._held_next = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a reply."""
        return len(self._buf) - self._pos + self._have

    def unread(self, limit: int) -> bytes:
        """Up to ``limit`` of the bytes received and not yet returned as a
        reply (what a backend event shows as ``rbuf``)."""
        rest = self._buf[self._pos:self._pos + limit]
        if len(rest) < limit and self._parts:
            rest += _EMPTY.join(self._parts)[:limit - len(rest)]
        return rest

    def feed(self, data: bytes) -> bool:
        """Add received bytes; False while a pending reply surely is incomplete."""
        need = self._need
        if need:
            parts = self._parts
            parts.append(data)
            have = self._have + len(data)
            self._have = have
            if need > 0:
                if have < need:
                    return False
            elif b"\n" not in data and have <= MAX_LINE:
                return False
            self._buf = _EMPTY.join(parts)
            self._parts = []
            self._have = 0
            self._need = 0
        elif self._pos < len(self._buf):
            self._buf = self._buf[self._pos:] + data
        else:
            self._buf = data
        self._pos = 0
        return True

    def read(self, version: bool = False, multi: bool = False) -> Response | None:
        """The next complete reply, or None until more bytes are fed.

        ``multi``: read one item of the reply to a multi-key get (a
        ``VALUE`` alone, or the final ``END``). Raises
        :class:`BackendProtocolError` when the stream is garbage.
        """
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return None
        result = parse_reply(buf, pos, version, multi)
        if result.__class__ is int:
            self._wait(buf, pos, result)
            return None
        self._pos = result[1]
        return result[0]

    def _wait(self, buf: bytes, pos: int, need: int) -> None:
        """Keep the incomplete reply at ``buf[pos:]`` until ``need`` (as
        ``parse_reply`` gives it) is met."""
        self._parts = [memoryview(buf)[pos:] if pos else buf]
        self._have = len(buf) - pos
        self._need = need - pos if need > 0 else -1
        self._buf = _EMPTY
        self._pos = 0

    def read_raw(self, count: int, parts: list[bytes], keys: list[bytes],
                 sets: frozenset[int] | None = None, widths: dict[int, int] | None = None,
                 first: int = 0) -> int:
        """Read on up to ``count`` complete replies as the bytes that came,
        appended to ``parts``; return how many were read.

        For requests whose client gets exactly the backend's reply (plain
        ``get``/``set``, see ``client_bytes``; a PlainRun): no Response is
        made. ``first`` is the index of the next reply's request; ``keys``
        gives each request's key (a multi-key get's keys as sent), ``sets``
        the indexes of the sets, and every reply is checked against its
        request (``_check_plain``). ``widths`` gives the key count of each
        get of several keys by its index: its reply is ``VALUE`` items of
        those keys in their order and ``END``, or for an error line that
        line for each key and ``END``, what the client gets for keys routed
        together (RouteEngine.route_keys). A stream that turns to garbage
        or to another request's reply after some replies gives those first;
        the next call raises.
        """
        buf = self._buf
        start = pos = self._pos
        framed = 0
        if plain_run is not None:
            # The plain replies in C, the first other one below (and all of a
            # multi-key reply whose first items are held).
            if not (widths and self._held):
                pos, framed = plain_run(buf, pos, keys, first, count, sets, widths)
                if framed == count:
                    parts.append(buf[start:pos])
                    self._pos = pos
                    return framed
        elif count == 1 and widths is None:
            # One plain reply, most often: framed without the loop below.
            end = _plain_end(buf, pos, keys[first], sets is not None and first in sets)
            if end:
                parts.append(buf[pos:end])
                self._pos = end
                return 1
        size = len(buf)
        result = 0
        try:
            while framed < count and pos < size:
                index = first + framed
                width = None if widths is None else widths.get(index)
                if width is None:
                    key = keys[index]
                    is_set = sets is not None and index in sets
                    end = _plain_end(buf, pos, key, is_set)
                    if not end:
                        result = parse_reply(buf, pos, False)
                        if result.__class__ is int:
                            break
                        end = result[1]
                        _check_plain(result[0], key, is_set)
                else:
                    wanted = keys[index].split(b" ")
                    end = 0 if self._held else _multi_end(buf, pos, wanted)
                    if not end:
                        if pos > start:
                            parts.append(buf[start:pos])
                        start = pos
                        got = self._read_multi(buf, pos, wanted, parts)
                        if got is None:
                            return framed
                        start = end = got
                pos = end
                framed += 1
        except BackendProtocolError:
            if not framed:
                raise
            result = 0
        if pos > start:
            parts.append(buf[start:pos])
        if result.__class__ is int and result:
            self._wait(buf, pos, result)
        else:
            self._pos = pos
        return framed

    def read_each(self, count: int, replies: list[bytes], keys: list[bytes],
                  sets: frozenset[int] | None, widths: dict[int, int] | None = None) -> int:
        """:meth:`read_raw` of plain requests, each reply appended to
        ``replies`` as its own bytes (the next is that of request
        ``len(replies)``; a multi-key get's, by ``widths``, what its client
        gets); return how many were read."""
        read = 0
        if plain_run is not None and not (widths and self._held):
            self._pos, read = plain_run(self._buf, self._pos, keys, len(replies), count, sets,
                                        widths, replies)
        if widths is None:
            while read < count and self.read_raw(1, replies, keys, sets, None, len(replies)):
                read += 1
            return read
        parts: list[bytes] = []
        while read < count and self.read_raw(1, parts, keys, sets, widths, len(replies)):
            replies.append(parts[0] if len(parts) == 1 else _EMPTY.join(parts))
            parts.clear()
            read += 1
        return read

    def drop_held(self) -> None:
        """Forget the items held for the multi-key reply being read (its
        client is gone); the reply is still framed and its items counted."""
        if self._held:
            self._held[:] = [_EMPTY]

    def _read_multi(self, buf: bytes, pos: int, keys: list[bytes],
                    parts: list[bytes]) -> int | None:
        """Read on in the reply to a get of ``keys`` at ``buf[pos]``, after
        the items held from earlier bytes: once complete, append what the
        client gets to ``parts`` and return the reply's end; until then hold
        its complete items and return None."""
        held = self._held
        index = self._held_next
        item = pos
        while True:
            result = parse_reply(buf, item, False, True)
            if result.__class__ is int:
                if item > pos:
                    held.append(buf[pos:item])
                self._held_next = index
                self._wait(buf, item, result)
                return None
            res, end = result
            rtype = res.type
            if rtype == MCMC_RESP_GET:
                index = _next_key(keys, index, value_key(res.line))
                item = end
                continue
            if rtype == MCMC_RESP_END:
                parts += held
                parts.append(buf[pos:end])
            elif rtype == MCMC_RESP_ERRMSG:
                parts.append(every_key(res.line, len(keys)))
            else:
                raise mismatched("reply of the wrong kind", b"get", res.line)
            held.clear()
            self._held_next = 0
            return end

    def read_aligned(self, keys: list[bytes], parts: list[bytes | None]) -> Response | None:
        """Read on in the reply to a multi-key get of ``keys``: append to
        ``parts``, for each key the reply has got past, its ``VALUE`` item
        (line and data, as a client receives them) or None (a miss); return
        the line that ends the reply (``END``, after which ``parts`` has one
        entry per key: one shared Response, to recognise, not to keep or
        change; or an error line), or None until it has arrived.

        memcached answers the keys in their order and skips misses; a value
        of a key not asked for, or out of that order, is another request's
        (BackendProtocolError). Plain ``VALUE`` items are framed here in one
        loop, without a Response each (they are the bulk of a multiget's
        reply); anything else goes through :meth:`read`.
        """
        buf = self._buf
        pos = self._pos
        if aligned_values is not None:  # the plain items in C; the rest below
            pos = aligned_values(buf, pos, keys, parts)
        match = VALUE_LINE.match
        find = keys.index
        index = len(parts)
        while True:
            line = match(buf, pos)
            if line is not None:
                vend = line.end() + int(line[2]) + 2
                if buf.startswith(b"\r\n", vend - 2):
                    try:
                        found = find(line[1], index)
                    except ValueError:
                        _next_key(keys, index, line[1])  # raises the mismatch
                    if found > index:
                        parts += [None] * (found - index)
                    parts.append(buf[pos:vend])
                    index = found + 1
                    pos = vend
                    continue
            elif buf.startswith(END, pos):  # the reply's end, most often: not parsed
                self._pos = pos + len(END)
                if index < len(keys):
                    parts += [None] * (len(keys) - index)
                return _ALIGNED_END
            self._pos = pos
            res = self.read(multi=True)
            if res is None:
                return None
            if res.type != MCMC_RESP_GET:
                if res.type == MCMC_RESP_END and index < len(keys):
                    parts += [None] * (len(keys) - index)
                return res
            found = _next_key(keys, index, value_key(res.line))
            if found - index > 1:
                parts += [None] * (found - index - 1)
            parts.append(res.line + res.value)
            index = found
            buf = self._buf
            pos = self._pos
