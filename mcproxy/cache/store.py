"""The embedded cache: memcached 1.6's local item store, in pure Python.

Commands that no route attaches are answered here, byte for byte as a
memcached 1.6.18 server would answer them: classic text storage and
retrieval commands, ``flush_all``, ``verbosity`` and the meta commands
(``mg ms md ma mn me``). The rules follow memcached's ``proto_text.c`` and
``items.c``, including their quirks: numbers are read the way ``strtoul`` /
``strtol`` read them and then truncated to 32 bits, ``incr``/``decr`` pad a
shorter result with spaces in place, ``flush_all`` invalidates lazily by
time and cas, and error replies are the same strings.

Time is memcached's too: whole seconds since a start time taken from the
injected clock (so tests never sleep), with ``realtime()``'s rules for
relative and absolute expiry times. Items expire lazily on access and are
reclaimed when the LRU needs room.

Memory is accounted as memcached accounts an item (header, key, flags,
value and cas: see :func:`item_size`), and the least recently used items
are evicted until a new item fits under ``memory_limit``. Unlike
memcached's per-slab-class segmented LRU there is one plain LRU.
"""

from __future__ import annotations

import base64
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable

from mcproxy.wire.numbers import INT_MAX, U32, U64, strtol32, strtoul32, strtoull
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
    CMD_MA,
    CMD_MD,
    CMD_ME,
    CMD_MG,
    CMD_MN,
    CMD_MS,
    CMD_PREPEND,
    CMD_REPLACE,
    CMD_SET,
    CMD_TOUCH,
    CMD_VERBOSITY,
    Request,
)

# Replies, exactly as memcached writes them.
ERROR = b"ERROR\r\n"
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
OK = b"OK\r\n"
END = b"END\r\n"
MN = b"MN\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_DELETE_FORMAT = (b"CLIENT_ERROR bad command line format.  "
                     b"Usage: delete <key> [noreply]\r\n")
BAD_DATA_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
INVALID_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
INVALID_DELTA_ARGUMENT = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
OUT_OF_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
OUT_OF_MEMORY_VIVIFY = b"SERVER_ERROR Out of memory allocating new item\r\n"
MG_FLAGS_TOO_LONG = b"CLIENT_ERROR options flags are too long\r\n"
META_FLAGS_TOO_LONG = b"CLIENT_ERROR options flags too long\r\n"
MEMLIMIT_TOO_SMALL = b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
MEMLIMIT_NOT_BYTES = b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
#: cache_memlimit's bounds, in megabytes (memcached's).
MEMLIMIT_MIN_MB = 8
MEMLIMIT_MAX_MB = 1_000_000_000
DUPLICATE_FLAG = b"CLIENT_ERROR duplicate flag\r\n"
INVALID_FLAG = b"CLIENT_ERROR invalid flag\r\n"
INVALID_OR_DUPLICATE_FLAG = b"CLIENT_ERROR invalid or duplicate flag\r\n"
BAD_TOKEN = b"CLIENT_ERROR bad token in command line format\r\n"
KEY_DECODE_ERROR = b"CLIENT_ERROR error decoding key\r\n"
BAD_M_TOKEN = b"CLIENT_ERROR incorrect length for M token\r\n"
INVALID_INITIAL = b"CLIENT_ERROR invalid numeric initial value\r\n"
INVALID_DELTA = b"CLIENT_ERROR invalid numeric delta value\r\n"
OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"
INVALID_MS_MODE = b"CLIENT_ERROR invalid mode for ms M token\r\n"
INVALID_MA_MODE = b"CLIENT_ERROR invalid mode for ma M token\r\n"

# Meta status codes and the pieces of meta reply lines.
HD = b"HD"
EN = b"EN"
VA = b"VA %d"
NF = b"NF"
NS = b"NS"
EX = b"EX"
ME_LINE = b"ME %b exp=%d la=%d cas=%d fetch=%b cls=%d size=%d\r\n"
VALUE_LINE = b"VALUE %b %d %d\r\n"
VALUE_LINE_CAS = b"VALUE %b %d %d %d\r\n"
CRLF = b"\r\n"

#: Every command :meth:`Store.execute` answers.
SERVED_COMMANDS = frozenset((
    CMD_GET, CMD_GETS, CMD_GAT, CMD_GATS, CMD_SET, CMD_ADD, CMD_REPLACE,
    CMD_APPEND, CMD_PREPEND, CMD_CAS, CMD_INCR, CMD_DECR, CMD_TOUCH,
    CMD_DELETE, CMD_FLUSH_ALL, CMD_VERBOSITY, CMD_MG, CMD_MS, CMD_MD,
    CMD_MA, CMD_MN, CMD_ME))

#: The stats :meth:`Store.stats` reports, in memcached's order.
STAT_NAMES = (
    "cmd_get", "cmd_set", "cmd_flush", "cmd_touch", "cmd_meta", "get_hits",
    "get_misses", "get_expired", "get_flushed", "delete_misses",
    "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
    "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
    "store_too_large", "store_no_memory", "limit_maxbytes", "bytes",
    "curr_items", "total_items", "expired_unfetched", "evicted_unfetched",
    "evictions", "reclaimed")

KEY_MAX_LENGTH = 250
#: memcached indexes at most this many tokens (the last is the remainder).
MAX_TOKENS = 24
#: Meta commands with more tokens than this are refused.
META_MAX_TOKENS = 20
META_MAX_OPAQUE_LENGTH = 32
#: Longest relative expiry time; larger values are absolute unix times.
REALTIME_MAXDELTA = 60 * 60 * 24 * 30
#: memcached starts its clock this far in the past (ITEM_UPDATE_INTERVAL + 2).
CLOCK_OFFSET = 62
#: sizeof(item) + the cas field, on a 64-bit memcached.
ITEM_HEADER_SIZE = 48 + 8
SLAB_MIN_CHUNK = 96
#: Items bigger than this are stored in chunks (and cannot be incremented).
SLAB_CHUNK_MAX = 2**19
SLAB_GROWTH_FACTOR = 1.25

# Item bits (memcached's it_flags that change replies).
_FETCHED = 1
_ACTIVE = 2
_STALE = 4
_TOKEN_SENT = 8
_KEY_BINARY = 16

# Internal results of storing an item and of incr/decr.
_STORED, _EXISTS, _NOT_FOUND, _NOT_STORED = range(4)
_DELTA_OK, _DELTA_NON_NUMERIC, _DELTA_NOT_FOUND, _DELTA_CAS_MISMATCH = range(4)
_STORE_REPLIES = {_STORED: STORED, _EXISTS: EXISTS, _NOT_FOUND: NOT_FOUND,
                  _NOT_STORED: NOT_STORED}
_MS_CODES = {_STORED: HD, _EXISTS: EX, _NOT_FOUND: NF, _NOT_STORED: NS}
_MS_MODES = {None: CMD_SET, 69: CMD_ADD, 65: CMD_APPEND, 80: CMD_PREPEND,
             82: CMD_REPLACE, 83: CMD_SET}  # E A P R S
_MA_MODES = {None: True, 73: True, 43: True, 68: False, 45: False}  # I + D -
_NOREPLY = b"noreply"


def item_size(nkey: int, flags: int, nbytes: int) -> int:
    """Bytes memcached accounts for an item (ITEM_ntotal).

    ``nbytes`` is the value length including its CRLF; flags take 4 bytes
    only when non-zero.
    """
    return ITEM_HEADER_SIZE + nkey + 1 + (4 if flags else 0) + nbytes


def slab_classes(chunk_max: int) -> list[int]:
    """memcached's default slab chunk sizes (the ``cls`` of ``me``)."""
    sizes = []
    size = SLAB_MIN_CHUNK
    while size < chunk_max / SLAB_GROWTH_FACTOR:
        size += -size % 8
        sizes.append(size)
        size = int(size * SLAB_GROWTH_FACTOR)
    sizes.append(chunk_max)
    return sizes


def _tokens(line: bytes) -> list[bytes]:
    """Split a command line on spaces, as memcached's tokenizer does.

    memcached stops at the first NUL byte and drops the line ending.
    """
    if line.endswith(CRLF):
        body = line[:-2]
    elif line.endswith(b"\n"):
        body = line[:-1]
    else:
        body = line
    if b"\0" in body:
        body = body[:body.index(b"\0")]
    tokens = body.split(b" ")
    if b"" in tokens:
        tokens = [t for t in tokens if t]
    return tokens


def _ntokens(tokens: list[bytes]) -> int:
    """memcached's token count: indexed tokens plus the terminal one."""
    return min(len(tokens), MAX_TOKENS - 1) + 1


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_INVALID = 0x80
_B64_TABLE = [_B64_INVALID] * 256
for _i, _c in enumerate(_B64_ALPHABET):
    _B64_TABLE[_c] = _i
_B64_TABLE[61] = 0  # "="


def b64decode_key(src: bytes) -> bytes | None:
    """Decode a base64 key as memcached does (None where it fails).

    Bytes outside the alphabet are skipped; the rest must come in groups
    of four; decoding stops after the first group holding padding.
    """
    table = _B64_TABLE
    count = sum(1 for c in src if table[c] != _B64_INVALID)
    if count == 0 or count % 4:
        return None
    out = bytearray()
    block: list[int] = []
    pad = 0
    for c in src:
        v = table[c]
        if v == _B64_INVALID:
            continue
        if c == 61:
            pad += 1
        block.append(v)
        if len(block) == 4:
            out += bytes(((block[0] << 2 | block[1] >> 4) & 255,
                          (block[1] << 4 | block[2] >> 2) & 255,
                          (block[2] << 6 | block[3]) & 255))
            block = []
            if pad:
                if pad > 2:
                    return None
                del out[-pad:]
                break
    return bytes(out) or None


def _key_token(key: bytes, binary: bool) -> bytes:
    """A meta reply's ``k`` flag: the key, base64 plus ``b`` if binary."""
    if binary:
        return b" k" + base64.b64encode(key) + b" b"
    return b" k" + key


class _Item:
    """One stored value. ``value`` includes its trailing CRLF.

    ``exptime`` and ``time`` (last access) are in store seconds, as
    memcached's rel_time_t; ``exptime`` 0 means never.
    """

    __slots__ = ("value", "flags", "exptime", "cas", "time", "size", "bits")

    def __init__(self, key: bytes, value: bytes, flags: int, exptime: int,
                 cas: int = 0, bits: int = 0) -> None:
        self.value = value
        self.flags = flags
        self.exptime = exptime
        self.cas = cas
        self.time = 0
        self.size = (ITEM_HEADER_SIZE + 1 + len(key) + len(value)
                     + (4 if flags else 0))
        self.bits = bits


class _MetaFlags:
    """The flags of one meta request, as memcached's preparse reads them."""

    __slots__ = ("key", "binary", "quiet", "locked", "vivify", "value",
                 "no_update", "set_stale", "has_cas", "new_ttl", "mode",
                 "exptime", "autoviv_exptime", "recache_time",
                 "client_flags", "req_cas", "delta", "initial")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.binary = self.quiet = self.locked = self.vivify = False
        self.value = self.no_update = self.set_stale = False
        self.has_cas = self.new_ttl = False
        self.mode: int | None = None
        self.exptime = self.autoviv_exptime = self.recache_time = 0
        self.client_flags = self.req_cas = self.initial = 0
        self.delta = 1


class Store:
    """A memory-bounded LRU cache answering memcached requests.

    ``memory_limit`` bounds the sum of :func:`item_size` over the items
    (memcached's ``bytes`` stat); ``item_size_max`` is memcached's ``-I``.
    ``clock`` returns unix time in seconds.
    """

    def __init__(self, memory_limit: int = 64 * 2**20,
                 item_size_max: int = 2**20,
                 clock: Callable[[], float] = time.time) -> None:
        self.memory_limit = memory_limit
        self.item_size_max = item_size_max
        self._clock = clock
        self._started = int(clock()) - CLOCK_OFFSET
        self._now = CLOCK_OFFSET
        self._items: OrderedDict[bytes, _Item] = OrderedDict()
        self._bytes = 0
        self._cas_id = 0
        self._oldest_live = 0
        self._oldest_cas = 0
        self._chunk_max = min(SLAB_CHUNK_MAX, item_size_max)
        self._classes = slab_classes(self._chunk_max)
        self._counters = dict.fromkeys(STAT_NAMES, 0)
        self._handlers: dict[int, Callable[[Request], bytes]] = {
            CMD_GET: self._retrieve, CMD_GETS: self._retrieve,
            CMD_GAT: self._retrieve, CMD_GATS: self._retrieve,
            CMD_SET: self._update, CMD_ADD: self._update,
            CMD_REPLACE: self._update, CMD_APPEND: self._update,
            CMD_PREPEND: self._update, CMD_CAS: self._update,
            CMD_INCR: self._arithmetic, CMD_DECR: self._arithmetic,
            CMD_TOUCH: self._touch, CMD_DELETE: self._delete,
            CMD_FLUSH_ALL: self._flush_all, CMD_VERBOSITY: self._verbosity,
            CMD_CACHE_MEMLIMIT: self._cache_memlimit,
            CMD_MG: self._mg, CMD_MS: self._ms, CMD_MD: self._md,
            CMD_MA: self._ma, CMD_MN: self._mn, CMD_ME: self._me,
        }

    def __len__(self) -> int:
        return len(self._items)

    def execute(self, req: Request) -> bytes:
        """The bytes memcached would write to the client for ``req``.

        Storage requests must carry their payload in ``req.value``. Raises
        ValueError for commands outside :data:`SERVED_COMMANDS`.
        """
        handler = self._handlers.get(req.command)
        if handler is None:
            raise ValueError(f"the store does not serve {req!r}")
        self._now = (int(self._clock()) - self._started) & U32
        return handler(req)

    def stats(self) -> dict[str, int]:
        """memcached's general stats that the store owns, in its order."""
        stats = dict(self._counters)
        stats["limit_maxbytes"] = self.memory_limit
        stats["bytes"] = self._bytes
        stats["curr_items"] = len(self._items)
        return stats

    # -- item life cycle -------------------------------------------------

    def _realtime(self, exptime: int) -> int:
        """memcached's realtime(): a request's expiry in store seconds."""
        if exptime == 0:
            return 0
        if exptime > REALTIME_MAXDELTA:
            if exptime <= self._started:
                return 1
            return (exptime - self._started) & U32
        return (exptime + self._now) & U32

    def _expiry(self, exptime: int) -> int:
        """An exptime argument in store seconds; negative is already past."""
        return self._realtime(REALTIME_MAXDELTA + 1 if exptime < 0 else exptime)

    def _lookup(self, key: bytes) -> _Item | None:
        """The live item under ``key``, unlinking it if flushed or expired."""
        it = self._items.get(key)
        if it is None:
            return None
        death = self._death(it)
        if death is None:
            return it
        self._unlink(key, it)
        self._counters[death] += 1
        return None

    def _death(self, it: _Item) -> str | None:
        """The stat counting ``it`` as flushed or expired, None if alive.

        As memcached's item_is_flushed: once ``oldest_live`` has come, items
        last written at or before it are dead, and so are those older than
        an immediate flush (by cas).
        """
        now = self._now
        oldest_live = self._oldest_live
        if oldest_live and oldest_live <= now and (
                it.time <= oldest_live or it.cas < self._oldest_cas):
            return "get_flushed"
        if it.exptime and it.exptime <= now:
            return "get_expired"
        return None

    def _bump(self, key: bytes, it: _Item) -> None:
        """A fetch: memcached's FETCHED and ACTIVE marks, and the LRU move."""
        bits = it.bits
        if not bits & _ACTIVE:
            if not bits & _FETCHED:
                it.bits = bits | _FETCHED
            else:
                it.bits = bits | _ACTIVE
                it.time = self._now
        self._items.move_to_end(key)

    def _touch_item(self, key: bytes, it: _Item) -> None:
        """memcached's do_item_update: refresh the access time and LRU."""
        it.time = self._now
        self._items.move_to_end(key)

    def _next_cas(self) -> int:
        """A fresh cas unique (memcached's get_cas_id)."""
        self._cas_id += 1
        return self._cas_id

    def _link(self, key: bytes, it: _Item) -> None:
        """Insert ``it`` (no item under ``key``), evicting to make room."""
        self._cas_id += 1
        it.cas = self._cas_id
        it.time = self._now
        if self._bytes + it.size > self.memory_limit:
            self._evict(it.size)
        self._items[key] = it
        self._bytes += it.size
        self._counters["total_items"] += 1

    def _unlink(self, key: bytes, it: _Item) -> None:
        del self._items[key]
        self._bytes -= it.size

    def _replace(self, key: bytes, old: _Item, new: _Item) -> None:
        self._unlink(key, old)
        self._link(key, new)

    def _evict(self, size: int) -> None:
        """Drop least recently used items until ``size`` more bytes fit.

        Dead (expired or flushed) items found on the way are reclaimed;
        live ones count as evictions.
        """
        items = self._items
        counters = self._counters
        limit = self.memory_limit - size
        while items and self._bytes > limit:
            _, it = items.popitem(last=False)
            self._bytes -= it.size
            unfetched = not it.bits & _FETCHED
            if self._death(it) is not None:
                counters["reclaimed"] += 1
                counters["expired_unfetched"] += unfetched
            else:
                counters["evictions"] += 1
                counters["evicted_unfetched"] += unfetched

    def _fits(self, size: int) -> bytes | None:
        """None if an item of ``size`` bytes can be stored, else the error."""
        if size > self.item_size_max:
            self._counters["store_too_large"] += 1
            return TOO_LARGE
        if size > self.memory_limit:
            self._counters["store_no_memory"] += 1
            return OUT_OF_MEMORY
        return None

    def _store(self, key: bytes, it: _Item, comm: int, cas_stale: bool
               ) -> tuple[int, int]:
        """memcached's do_store_item: the outcome and the new cas (or 0).

        ``it.cas`` holds the cas the request asked to compare (0: none).
        """
        counters = self._counters
        old = self._lookup(key)
        if old is None:
            if comm == CMD_SET or comm == CMD_ADD:
                self._link(key, it)
                return _STORED, it.cas
            if comm == CMD_CAS:
                counters["cas_misses"] += 1
                return _NOT_FOUND, 0
            return _NOT_STORED, 0
        want = it.cas
        if comm == CMD_ADD:
            self._touch_item(key, old)
            return _NOT_STORED, 0
        if comm == CMD_CAS:
            if want and want == old.cas:
                counters["cas_hits"] += 1
            elif want and cas_stale and want < old.cas:
                it.exptime = old.exptime
                it.bits |= _STALE | (old.bits & _TOKEN_SENT)
                counters["cas_hits"] += 1
            else:
                counters["cas_badval"] += 1
                return _EXISTS, 0
        elif comm == CMD_APPEND or comm == CMD_PREPEND:
            if want and want != old.cas:
                return _EXISTS, 0
            if comm == CMD_APPEND:
                value = old.value[:-2] + it.value
            else:
                value = it.value[:-2] + old.value
            it = _Item(key, value, old.flags, old.exptime)
            if it.size > self.item_size_max or it.size > self.memory_limit:
                return _NOT_STORED, 0
        self._replace(key, old, it)
        return _STORED, it.cas

    def _add_delta(self, key: bytes, incr: bool, delta: int, req_cas: int
                   ) -> tuple[int, bytes, _Item | None]:
        """memcached's do_add_delta: outcome, new number, affected item.

        A result that fits in the old value's length is written in place,
        padded with spaces (as memcached does); otherwise a new item
        replaces the old one and the returned (old) item takes its cas.
        """
        it = self._lookup(key)
        if it is None:
            return _DELTA_NOT_FOUND, b"", None
        data = it.value
        if len(data) <= 2 or it.size > self._chunk_max:
            return _DELTA_NON_NUMERIC, b"", None
        if req_cas and it.cas != req_cas:
            return _DELTA_CAS_MISMATCH, b"", None
        value = strtoull(data[:-2])
        if value is None:
            return _DELTA_NON_NUMERIC, b"", None
        counters = self._counters
        if incr:
            value = (value + delta) & U64
            counters["incr_hits"] += 1
        else:
            value = 0 if delta > value else value - delta
            counters["decr_hits"] += 1
        number = b"%d" % value
        if len(number) + 2 <= len(data):
            it.cas = self._next_cas()
            it.value = number.ljust(len(data) - 2) + CRLF
            self._touch_item(key, it)
        else:
            new = _Item(key, number + CRLF, it.flags, it.exptime)
            self._replace(key, it, new)
            it.cas = new.cas
        return _DELTA_OK, number, it

    def _cls(self, size: int) -> int:
        """The slab class memcached would file an item of ``size`` under."""
        return min(bisect_left(self._classes, size), len(self._classes) - 1) + 1

    # -- classic text commands ---------------------------------------------

    def _retrieve(self, req: Request) -> bytes:
        """get, gets, gat, gats: VALUE lines for the hits, then END."""
        tokens = _tokens(req.line)
        if len(tokens) < 2:
            return ERROR
        cmd = req.command
        counters = self._counters
        items = self._items
        with_cas = cmd == CMD_GETS or cmd == CMD_GATS
        touch = cmd == CMD_GAT or cmd == CMD_GATS
        exptime = 0
        if touch:
            exptime_arg = strtol32(tokens[1])
            if exptime_arg is None:
                return INVALID_EXPTIME
            exptime = self._expiry(exptime_arg)
            keys = tokens[2:]
        else:
            keys = tokens[1:]
        out = []
        for key in keys:
            if len(key) > KEY_MAX_LENGTH:
                return BAD_FORMAT
            it = items.get(key)
            if it is not None and (self._oldest_live or it.exptime):
                it = self._lookup(key)
            if it is None:
                if touch:
                    counters["cmd_touch"] += 1
                    counters["touch_misses"] += 1
                else:
                    counters["cmd_get"] += 1
                    counters["get_misses"] += 1
                continue
            self._bump(key, it)
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

    def _update(self, req: Request) -> bytes:
        """set, add, replace, append, prepend, cas."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        cmd = req.command
        if ntokens != 7 and ntokens != (8 if cmd == CMD_CAS else 6):
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
        return b"" if tokens[ntokens - 2] == _NOREPLY else reply

    def _update_item(self, req: Request, cmd: int, key: bytes, flags: int,
                     exptime: int, vlen: int, req_cas: int) -> bytes:
        """The storage part of :meth:`_update`, once the line is valid."""
        value = req.value
        size = item_size(len(key), flags, vlen + 2)
        if size > self.item_size_max or size > self.memory_limit:
            error = self._fits(size)
            if error is not None:
                if cmd == CMD_SET:
                    old = self._lookup(key)
                    if old is not None:
                        self._unlink(key, old)
                return error
        self._counters["cmd_set"] += 1
        if value is None or len(value) != vlen + 2 or value[-2:] != CRLF:
            return BAD_DATA_CHUNK
        it = _Item(key, value, flags, self._expiry(exptime) if exptime else 0,
                   req_cas)
        return _STORE_REPLIES[self._store(key, it, cmd, False)[0]]

    def _arithmetic(self, req: Request) -> bytes:
        """incr and decr."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        if ntokens != 4 and ntokens != 5:
            return ERROR
        noreply = tokens[ntokens - 2] == _NOREPLY
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        elif (delta := strtoull(tokens[2])) is None:
            reply = INVALID_DELTA_ARGUMENT
        else:
            incr = req.command == CMD_INCR
            result, number, _ = self._add_delta(key, incr, delta, 0)
            if result == _DELTA_OK:
                reply = number + CRLF
            elif result == _DELTA_NON_NUMERIC:
                reply = NON_NUMERIC
            else:
                self._counters["incr_misses" if incr else "decr_misses"] += 1
                reply = NOT_FOUND
        return b"" if noreply else reply

    def _touch(self, req: Request) -> bytes:
        """touch <key> <exptime> [noreply]."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        if ntokens != 4 and ntokens != 5:
            return ERROR
        noreply = tokens[ntokens - 2] == _NOREPLY
        key = tokens[1]
        counters = self._counters
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        elif (exptime := strtol32(tokens[2])) is None:
            reply = INVALID_EXPTIME
        else:
            exptime = self._expiry(exptime)
            it = self._lookup(key)
            counters["cmd_touch"] += 1
            if it is None:
                counters["touch_misses"] += 1
                reply = NOT_FOUND
            else:
                self._bump(key, it)
                it.exptime = exptime
                counters["touch_hits"] += 1
                reply = TOUCHED
        return b"" if noreply else reply

    def _delete(self, req: Request) -> bytes:
        """delete <key> [0] [noreply]: only a hold time of 0 is accepted."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        if ntokens < 3 or ntokens > 5:
            return ERROR
        noreply = False
        if ntokens > 3:
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[ntokens - 2] == _NOREPLY
            if not ((ntokens == 4 and (hold_is_zero or noreply))
                    or (ntokens == 5 and hold_is_zero and noreply)):
                return b"" if noreply else BAD_DELETE_FORMAT
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            reply = BAD_FORMAT
        else:
            it = self._lookup(key)
            if it is None:
                self._counters["delete_misses"] += 1
                reply = NOT_FOUND
            else:
                self._unlink(key, it)
                self._counters["delete_hits"] += 1
                reply = DELETED
        return b"" if noreply else reply

    def _flush_all(self, req: Request) -> bytes:
        """flush_all [delay] [noreply]: invalidate items lazily.

        memcached's quirks included: a delay of N seconds takes effect after
        N - 1, and items written during that second die too.
        """
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        if ntokens < 2 or ntokens > 4:
            return ERROR
        noreply = tokens[ntokens - 2] == _NOREPLY
        self._counters["cmd_flush"] += 1
        exptime = 0
        if ntokens != (3 if noreply else 2):
            exptime = strtol32(tokens[1])
            if exptime is None:
                return b"" if noreply else INVALID_EXPTIME
        now = self._now
        new_oldest = self._realtime(exptime) if exptime > 0 else now
        self._oldest_live = (new_oldest - 1) & U32
        if self._oldest_live <= now:
            self._oldest_cas = self._next_cas()
        return b"" if noreply else OK

    def _verbosity(self, req: Request) -> bytes:
        """verbosity <level>: accepted and ignored."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        if ntokens != 3 and ntokens != 4:
            return ERROR
        noreply = tokens[ntokens - 2] == _NOREPLY
        if noreply:
            return b""
        return OK if strtoul32(tokens[1]) is not None else BAD_FORMAT

    def _cache_memlimit(self, req: Request) -> bytes:
        """cache_memlimit <megabytes> [noreply]: a new memory limit, as
        memcached sets its own (items over it are evicted, oldest first)."""
        tokens = _tokens(req.line)
        ntokens = _ntokens(tokens)
        megabytes = strtoul32(tokens[1]) if ntokens in (3, 4) else None
        if megabytes is None:
            return ERROR
        noreply = tokens[ntokens - 2] == _NOREPLY
        if megabytes < MEMLIMIT_MIN_MB:
            reply = MEMLIMIT_TOO_SMALL
        elif megabytes > MEMLIMIT_MAX_MB:
            reply = MEMLIMIT_NOT_BYTES
        else:
            self.memory_limit = megabytes * 2**20
            if self._bytes > self.memory_limit:
                self._evict(0)
            reply = OK
        return b"" if noreply else reply

    # -- meta commands -----------------------------------------------------

    def _preparse(self, tokens: list[bytes], start: int, of: _MetaFlags
                  ) -> bytes | None:
        """Read the flags from ``tokens[start:]`` into ``of``.

        Returns None, or the error memcached's _meta_flag_preparse gives:
        an unknown or repeated flag stops at once, a bad value is reported
        after the rest were read (the last bad value's error wins).
        """
        seen = set()
        error = None
        bad = False
        for token in tokens[start:]:
            flag = token[0]
            if flag >= 127 or flag in seen:
                return DUPLICATE_FLAG
            seen.add(flag)
            arg = token[1:]
            if flag == 98:  # b
                key = b64decode_key(of.key)
                if key is None:
                    error = KEY_DECODE_ERROR
                else:
                    of.key = key
                of.binary = True
            elif flag == 78:  # N
                of.locked = of.vivify = True
                value = strtol32(arg)
                if value is None:
                    error = BAD_TOKEN
                else:
                    of.autoviv_exptime = self._expiry(value)
            elif flag == 84:  # T
                of.locked = True
                value = strtol32(arg)
                if value is None:
                    error = BAD_TOKEN
                else:
                    of.exptime = self._expiry(value)
                    of.new_ttl = True
            elif flag == 82:  # R
                of.locked = True
                value = strtol32(arg)
                if value is None:
                    error = BAD_TOKEN
                else:
                    of.recache_time = self._expiry(value)
            elif flag == 108 or flag == 104:  # l h
                of.locked = True
            elif flag == 118:  # v
                of.value = True
            elif flag == 117:  # u
                of.no_update = True
            elif flag == 113:  # q
                of.quiet = True
            elif flag == 70:  # F: a bad value keeps the previous error
                value = strtoul32(arg)
                if value is None:
                    bad = True
                else:
                    of.client_flags = value
            elif flag == 67:  # C
                value = strtoull(arg)
                if value is None:
                    error = BAD_TOKEN
                else:
                    of.req_cas = value
                    of.has_cas = True
            elif flag == 77:  # M
                if len(token) != 2:
                    error = BAD_M_TOKEN
                else:
                    of.mode = token[1]
            elif flag == 74:  # J
                value = strtoull(arg)
                if value is None:
                    error = INVALID_INITIAL
                else:
                    of.initial = value
            elif flag == 68:  # D
                value = strtoull(arg)
                if value is None:
                    error = INVALID_DELTA
                else:
                    of.delta = value
            elif flag == 73:  # I
                of.set_stale = True
            elif flag not in b"OPLkstcf":
                return INVALID_FLAG
        if error is None and bad:
            return BAD_FORMAT
        return error

    def _meta_start(self, tokens: list[bytes], too_long: bytes
                    ) -> bytes | None:
        """The checks every meta command starts with; None when passed."""
        ntokens = _ntokens(tokens)
        if ntokens < 3:
            return ERROR
        if len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        if ntokens > META_MAX_TOKENS:
            return too_long
        return None

    def _mg(self, req: Request) -> bytes:
        """Meta get: HD or VA with the requested fields, EN on a miss."""
        tokens = _tokens(req.line)
        error = self._meta_start(tokens, MG_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = _MetaFlags(tokens[1])
        error = self._preparse(tokens, 2, of)
        if error is not None:
            return error
        key = of.key
        counters = self._counters
        it = self._lookup(key)
        if it is not None and not of.locked and not of.no_update:
            self._bump(key, it)
        created = False
        if it is None and of.vivify:
            it = _Item(key, CRLF, 0, 0)
            if it.size <= self.memory_limit:
                self._link(key, it)
                created = True
            else:
                it = None
        if it is None:
            counters["cmd_get"] += 1
            counters["get_misses"] += 1
            out = [EN]
            for token in tokens[2:]:
                flag = token[0]
                if flag == 79:  # O
                    if len(token) > META_MAX_OPAQUE_LENGTH:
                        return OPAQUE_TOO_LONG
                    out.append(b" " + token)
                elif flag == 107:  # k
                    out.append(_key_token(key, of.binary))
            if of.quiet:
                return b""
            out.append(CRLF)
            return b"".join(out)

        now = self._now
        out = [VA % (len(it.value) - 2) if of.value else HD]
        won = ttl_set = False
        for token in tokens[2:]:
            flag = token[0]
            if flag == 84:  # T
                ttl_set = True
                it.exptime = of.exptime
            elif flag == 78:  # N
                if created:
                    it.exptime = of.autoviv_exptime
                    won = True
            elif flag == 82:  # R
                if (not it.bits & _TOKEN_SENT and not created and it.exptime
                        and it.exptime < of.recache_time):
                    won = True
            elif flag == 115:  # s
                out.append(b" s%d" % (len(it.value) - 2))
            elif flag == 116:  # t
                out.append(b" t%d" % ((it.exptime - now) & U32)
                           if it.exptime else b" t-1")
            elif flag == 99:  # c
                out.append(b" c%d" % it.cas)
            elif flag == 102:  # f
                out.append(b" f%d" % it.flags)
            elif flag == 108:  # l
                out.append(b" l%d" % ((now - it.time) & U32))
            elif flag == 104:  # h
                out.append(b" h1" if it.bits & _FETCHED else b" h0")
            elif flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                out.append(b" " + token)
            elif flag == 107:  # k
                out.append(_key_token(key, bool(it.bits & _KEY_BINARY)))
        if it.bits & _TOKEN_SENT:
            out.append(b" Z")
        if it.bits & _STALE:
            out.append(b" X")
            if not it.bits & _TOKEN_SENT:
                won = True
        if won:
            out.append(b" W")
            it.bits |= _TOKEN_SENT
        out.append(CRLF)
        if of.value:
            out.append(it.value)
        if of.locked and not of.no_update:
            self._bump(key, it)
        if ttl_set:
            counters["cmd_touch"] += 1
            counters["touch_hits"] += 1
        else:
            counters["cmd_get"] += 1
            counters["get_hits"] += 1
        return b"".join(out)

    def _ms(self, req: Request) -> bytes:
        """Meta set: HD/NS/EX/NF, with the requested O, k and c fields."""
        tokens = _tokens(req.line)
        error = self._meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        if _ntokens(tokens) == 3:
            return BAD_FORMAT
        vlen = strtol32(tokens[2])
        if vlen is None or vlen < 0 or vlen > INT_MAX - 2:
            return BAD_FORMAT
        of = _MetaFlags(tokens[1])
        error = self._preparse(tokens, 3, of)
        if error is not None:
            return error
        key = of.key
        echo = []
        error = None
        for token in tokens[3:]:
            flag = token[0]
            if flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    error = OPAQUE_TOO_LONG
                else:
                    echo.append(token)
            elif flag == 107 or flag == 99:  # k c
                echo.append(token[:1])
        comm = _MS_MODES.get(of.mode)
        if comm is None:
            return INVALID_MS_MODE
        if of.has_cas and (comm == CMD_SET or comm == CMD_REPLACE):
            comm = CMD_CAS
        if error is not None:
            return error
        error = self._fits(item_size(len(key), of.client_flags, vlen + 2))
        if error is not None:
            old = self._lookup(key)
            if old is not None:
                self._unlink(key, old)
            return error
        self._counters["cmd_set"] += 1
        value = req.value
        if value is None or len(value) != vlen + 2 or value[-2:] != CRLF:
            return BAD_DATA_CHUNK
        it = _Item(key, value, of.client_flags, of.exptime, of.req_cas,
                   _KEY_BINARY if of.binary else 0)
        result, cas = self._store(key, it, comm, of.set_stale and comm == CMD_CAS)
        if result == _STORED and of.quiet:
            return b""
        out = [_MS_CODES[result]]
        for token in echo:
            if token == b"k":
                out.append(_key_token(key, of.binary))
            elif token == b"c":
                out.append(b" c%d" % cas)
            else:
                out.append(b" " + token)
        out.append(CRLF)
        return b"".join(out)

    def _md(self, req: Request) -> bytes:
        """Meta delete: HD, NF or EX; I marks stale instead of deleting."""
        tokens = _tokens(req.line)
        error = self._meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = _MetaFlags(tokens[1])
        if self._preparse(tokens, 2, of) is not None:
            return INVALID_OR_DUPLICATE_FLAG
        key = of.key
        echo = []
        for token in tokens[2:]:
            flag = token[0]
            if flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                echo.append(b" " + token)
            elif flag == 107:  # k
                echo.append(_key_token(key, of.binary))
        counters = self._counters
        it = self._lookup(key)
        if it is None:
            counters["delete_misses"] += 1
            code = NF
        elif of.has_cas and it.cas != of.req_cas:
            counters["delete_misses"] += 1
            code = EX
        else:
            if of.set_stale:
                if of.new_ttl:
                    it.exptime = of.exptime
                it.bits = (it.bits | _STALE) & ~_TOKEN_SENT
                it.cas = self._next_cas()
            else:
                counters["delete_hits"] += 1
                self._unlink(key, it)
            if of.quiet:
                return b""
            code = HD
        return code + b"".join(echo) + CRLF

    def _ma(self, req: Request) -> bytes:
        """Meta arithmetic: HD or VA with the new number, NF, EX."""
        tokens = _tokens(req.line)
        error = self._meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = _MetaFlags(tokens[1])
        if self._preparse(tokens, 2, of) is not None:
            return INVALID_OR_DUPLICATE_FLAG
        key = of.key
        incr = _MA_MODES.get(of.mode)
        if incr is None:
            return INVALID_MA_MODE
        result, number, it = self._add_delta(key, incr, of.delta, of.req_cas)
        created = False
        code = HD
        if result == _DELTA_NON_NUMERIC:
            return NON_NUMERIC
        if result == _DELTA_NOT_FOUND:
            if of.vivify:
                number = b"%d" % of.initial
                it = _Item(key, number + CRLF, 0, 0)
                if it.size > self.memory_limit:
                    return OUT_OF_MEMORY_VIVIFY
                self._store(key, it, CMD_ADD, False)
                created = True
            else:
                self._counters["incr_misses" if incr else "decr_misses"] += 1
                code = NF
        elif result == _DELTA_CAS_MISMATCH:
            code = EX
        if it is None:
            out = [code]
            for token in tokens[2:]:
                flag = token[0]
                if flag == 79:  # O
                    if len(token) > META_MAX_OPAQUE_LENGTH:
                        return OPAQUE_TOO_LONG
                    out.append(b" " + token)
                elif flag == 107:  # k
                    out.append(_key_token(key, of.binary))
            out.append(CRLF)
            return b"".join(out)
        out = [VA % len(number) if of.value else HD]
        for token in tokens[2:]:
            flag = token[0]
            if flag == 99:  # c
                out.append(b" c%d" % it.cas)
            elif flag == 116:  # t
                out.append(b" t%d" % ((it.exptime - self._now) & U32)
                           if it.exptime else b" t-1")
            elif flag == 84:  # T
                it.exptime = of.exptime
            elif flag == 78:  # N
                if created:
                    it.exptime = of.autoviv_exptime
            elif flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                out.append(b" " + token)
            elif flag == 107:  # k
                out.append(_key_token(key, of.binary))
        if of.quiet and result == _DELTA_OK:
            return b""
        if of.value:
            out.append(CRLF)
            out.append(number)
        out.append(CRLF)
        return b"".join(out)

    def _mn(self, req: Request) -> bytes:
        """Meta no-op: memcached flushes its pending replies, then MN."""
        return MN

    def _me(self, req: Request) -> bytes:
        """Meta debug: one line describing the item, or EN."""
        tokens = _tokens(req.line)
        if _ntokens(tokens) < 3 or len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        key = tokens[1]
        if len(tokens) >= 3 and tokens[2] == b"b":
            key = b64decode_key(key)
            if key is None:
                return BAD_FORMAT
        it = self._lookup(key)
        self._counters["cmd_meta"] += 1
        if it is None:
            return EN + CRLF
        now = self._now
        if it.exptime:
            exp = (now - it.exptime) & U32
            exp = exp - 2**32 if exp > INT_MAX else exp
        else:
            exp = -1
        shown = base64.b64encode(key) if it.bits & _KEY_BINARY else key
        return ME_LINE % (shown, exp, (now - it.time) & U32, it.cas,
                          b"yes" if it.bits & _FETCHED else b"no",
                          self._cls(it.size), it.size)
