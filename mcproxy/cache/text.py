"""memcached's classic text commands, answered from the embedded cache.

get, gets, gat, gats, set, add, replace, append, prepend, cas, incr,
decr, touch, delete, flush_all, verbosity and cache_memlimit, read and
answered as memcached 1.6.18's ``proto_text.c`` does, quirks included:
numbers are read the way ``strtoul`` / ``strtol`` read them and then
truncated to 32 bits, and ``noreply`` is the next-to-last token.
"""

from __future__ import annotations

from collections.abc import Callable

from mcproxy.cache.items import (
    DELTA_NON_NUMERIC,
    DELTA_OK,
    Item,
    Items,
    item_size,
)
from mcproxy.cache.replies import (
    BAD_DATA_CHUNK,
    BAD_DELETE_FORMAT,
    BAD_FORMAT,
    CRLF,
    DELETED,
    END,
    ERROR,
    INVALID_DELTA_ARGUMENT,
    INVALID_EXPTIME,
    MEMLIMIT_NOT_BYTES,
    MEMLIMIT_TOO_SMALL,
    NO_ROOM,
    NON_NUMERIC,
    NOT_FOUND,
    OK,
    STORE_REPLIES,
    TOUCHED,
    VALUE_LINE,
    VALUE_LINE_CAS,
)
from mcproxy.cache.tokens import KEY_MAX_LENGTH, NOREPLY, ntokens, tokenize
from mcproxy.wire.numbers import INT_MAX, strtol32, strtoul32, strtoull
from mcproxy.wire.request import (
    CMD_ADD,
    CMD_APPEND,
    CMD_CACHE_MEMLIMIT,
    CMD_CAS,
    CMD_DECR,
    CMD_DELETE,
    CMD_FLUSH_ALL,
    CMD_GAT,
    CMD_GATS,
    CMD_GET,
    CMD_GETS,
    CMD_INCR,
    CMD_PREPEND,
    CMD_REPLACE,
    CMD_SET,
    CMD_TOUCH,
    CMD_VERBOSITY,
    Request,
)

#: cache_memlimit's bounds, in megabytes (memcached's).
MEMLIMIT_MIN_MB = 8
MEMLIMIT_MAX_MB = 1_000_000_000


class TextCommands:
    """The text commands over ``items``; :meth:`handlers` dispatches them."""

    def __init__(self, items: Items) -> None:
        self.items = items

    def handlers(self) -> dict[int, Callable[[Request], bytes]]:
        """The handler of each command, by command number."""
        return {
            CMD_GET: self.retrieve, CMD_GETS: self.retrieve,
            CMD_GAT: self.retrieve, CMD_GATS: self.retrieve,
            CMD_SET: self.update, CMD_ADD: self.update,
            CMD_REPLACE: self.update, CMD_APPEND: self.update,
            CMD_PREPEND: self.update, CMD_CAS: self.update,
            CMD_INCR: self.arithmetic, CMD_DECR: self.arithmetic,
            CMD_TOUCH: self.touch, CMD_DELETE: self.delete,
            CMD_FLUSH_ALL: self.flush_all, CMD_VERBOSITY: self.verbosity,
            CMD_CACHE_MEMLIMIT: self.cache_memlimit,
        }

    def retrieve(self, req: Request) -> bytes:
        """get, gets, gat, gats: VALUE lines for the hits, then END."""
        tokens = tokenize(req.line)
        if len(tokens) < 2:
            return ERROR
        cmd = req.command
        items = self.items
        counters = items.counters
        with_cas = cmd == CMD_GETS or cmd == CMD_GATS
        touch = cmd == CMD_GAT or cmd == CMD_GATS
        exptime = 0
        if touch:
            exptime_arg = strtol32(tokens[1])
            if exptime_arg is None:
                return INVALID_EXPTIME
            exptime = items.expiry(exptime_arg)
            keys = tokens[2:]
        else:
            keys = tokens[1:]
        out = []
        for key in keys:
            if len(key) > KEY_MAX_LENGTH:
                return BAD_FORMAT
            it = items.lookup(key)
            if it is None:
                if touch:
                    counters["cmd_touch"] += 1
                    counters["touch_misses"] += 1
                else:
                    counters["cmd_get"] += 1
                    counters["get_misses"] += 1
                continue
            items.bump(key, it)
            if touch:
                it.exptime = exptime
                counters["cmd_touch"] += 1
                counters["touch_hits"] += 1
            else:
                counters["cmd_get"] += 1
                counters["get_hits"] += 1
            if with_cas:
                out.append(VALUE_LINE_CAS % (key, it.flags, len(it.value) - 2,
                                             it.cas))
            else:
                out.append(VALUE_LINE % (key, it.flags, len(it.value) - 2))
            out.append(it.value)
        out.append(END)
        return b"".join(out)

    def update(self, req: Request) -> bytes:
        """set, add, replace, append, prepend, cas."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        cmd = req.command
        if count != 7 and count != (8 if cmd == CMD_CAS else 6):
            return ERROR
        key = tokens[1]
        flags = strtoul32(tokens[2])
        exptime = strtol32(tokens[3])
        vlen = strtol32(tokens[4])
        req_cas = 0
        if cmd == CMD_CAS:
            req_cas = strtoull(tokens[5])
        if (len(key) > KEY_MAX_LENGTH or flags is None or exptime is None
                or vlen is None or req_cas is None
                or vlen < 0 or vlen > INT_MAX - 2):
            reply = BAD_FORMAT
        else:
            reply = self._update_item(req, cmd, key, flags, exptime, vlen,
                                      req_cas)
        return b"" if tokens[count - 2] == NOREPLY else reply

    def _update_item(self, req: Request, cmd: int, key: bytes, flags: int,
                     exptime: int, vlen: int, req_cas: int) -> bytes:
        """The storage part of :meth:`update`, once the line is valid."""
        items = self.items
        value = req.value
        reason = items.fits(item_size(len(key), flags, vlen + 2))
        if reason is not None:
            if cmd == CMD_SET:
                old = items.lookup(key)
                if old is not None:
                    items.unlink(key, old)
            return NO_ROOM[reason]
        items.counters["cmd_set"] += 1
        if value is None or len(value) != vlen + 2 or value[-2:] != CRLF:
            return BAD_DATA_CHUNK
        it = Item(key, value, flags, items.expiry(exptime) if exptime else 0,
                  req_cas)
        return STORE_REPLIES[items.store(key, it, cmd, False)[0]]

    def arithmetic(self, req: Request) -> bytes:
        """incr and decr."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        if count != 4 and count != 5:
            return ERROR
        noreply = tokens[count - 2] == NOREPLY
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        elif (delta := strtoull(tokens[2])) is None:
            reply = INVALID_DELTA_ARGUMENT
        else:
            incr = req.command == CMD_INCR
            result, number, _ = self.items.add_delta(key, incr, delta, 0)
            if result == DELTA_OK:
                reply = number + CRLF
            elif result == DELTA_NON_NUMERIC:
                reply = NON_NUMERIC
            else:
                self.items.counters["incr_misses" if incr else "decr_misses"] += 1
                reply = NOT_FOUND
        return b"" if noreply else reply

    def touch(self, req: Request) -> bytes:
        """touch <key> <exptime> [noreply]."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        if count != 4 and count != 5:
            return ERROR
        noreply = tokens[count - 2] == NOREPLY
        key = tokens[1]
        items = self.items
        counters = items.counters
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        elif (exptime := strtol32(tokens[2])) is None:
            reply = INVALID_EXPTIME
        else:
            exptime = items.expiry(exptime)
            it = items.lookup(key)
            counters["cmd_touch"] += 1
            if it is None:
                counters["touch_misses"] += 1
                reply = NOT_FOUND
            else:
                items.bump(key, it)
                it.exptime = exptime
                counters["touch_hits"] += 1
                reply = TOUCHED
        return b"" if noreply else reply

    def delete(self, req: Request) -> bytes:
        """delete <key> [0] [noreply]: only a hold time of 0 is accepted."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        if count < 3 or count > 5:
            return ERROR
        noreply = False
        if count > 3:
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[count - 2] == NOREPLY
            if not ((count == 4 and (hold_is_zero or noreply))
                    or (count == 5 and hold_is_zero and noreply)):
                return b"" if noreply else BAD_DELETE_FORMAT
        key = tokens[1]
        items = self.items
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        else:
            it = items.lookup(key)
            if it is None:
                items.counters["delete_misses"] += 1
                reply = NOT_FOUND
            else:
                items.unlink(key, it)
                items.counters["delete_hits"] += 1
                reply = DELETED
        return b"" if noreply else reply

    def flush_all(self, req: Request) -> bytes:
        """flush_all [delay] [noreply]: invalidate items lazily."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        if count < 2 or count > 4:
            return ERROR
        noreply = tokens[count - 2] == NOREPLY
        self.items.counters["cmd_flush"] += 1
        delay = 0
        if count != (3 if noreply else 2):
            delay = strtol32(tokens[1])
            if delay is None:
                return b"" if noreply else INVALID_EXPTIME
        self.items.flush(delay)
        return b"" if noreply else OK

    def verbosity(self, req: Request) -> bytes:
        """verbosity <level>: accepted and ignored."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        if count != 3 and count != 4:
            return ERROR
        if tokens[count - 2] == NOREPLY:
            return b""
        return OK if strtoul32(tokens[1]) is not None else BAD_FORMAT

    def cache_memlimit(self, req: Request) -> bytes:
        """cache_memlimit <megabytes> [noreply]: a new memory limit, as
        memcached sets its own (items over it are evicted, oldest first)."""
        tokens = tokenize(req.line)
        count = ntokens(tokens)
        megabytes = strtoul32(tokens[1]) if count in (3, 4) else None
        if megabytes is None:
            return ERROR
        noreply = tokens[count - 2] == NOREPLY
        if megabytes < MEMLIMIT_MIN_MB:
            reply = MEMLIMIT_TOO_SMALL
        elif megabytes > MEMLIMIT_MAX_MB:
            reply = MEMLIMIT_NOT_BYTES
        else:
            self.items.set_memory_limit(megabytes * 2**20)
            reply = OK
        return b"" if noreply else reply
