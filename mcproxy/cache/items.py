"""The embedded cache's items: storage, LRU, memory, cas and time.

Pure, and free of any command syntax: this is what memcached's ``items.c``
and ``do_store_item`` / ``do_add_delta`` do, and what the text and meta
commands (:mod:`mcproxy.cache.text`, :mod:`mcproxy.cache.meta`) share.

Time is memcached's: whole seconds since a start time taken from the
injected clock (so tests never sleep), with ``realtime()``'s rules for
relative and absolute expiry times. Items expire lazily on access, die
lazily after ``flush_all``, and are reclaimed when the LRU needs room.

Memory is accounted as memcached accounts an item (header, key, flags,
value and cas: see :func:`item_size`), and the least recently used items
are evicted until a new item fits under ``memory_limit``. Unlike
memcached's per-slab-class segmented LRU there is one plain LRU.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable

from mcproxy.wire.numbers import U32, U64, strtoull
from mcproxy.wire.request import CMD_ADD, CMD_APPEND, CMD_CAS, CMD_PREPEND, CMD_SET

#: The stats :meth:`Items.stats` reports, in memcached's order.
STAT_NAMES = (
    "cmd_get", "cmd_set", "cmd_flush", "cmd_touch", "cmd_meta", "get_hits",
    "get_misses", "get_expired", "get_flushed", "delete_misses",
    "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
    "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
    "store_too_large", "store_no_memory", "limit_maxbytes", "bytes",
    "curr_items", "total_items", "expired_unfetched", "evicted_unfetched",
    "evictions", "reclaimed")

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
FETCHED = 1
ACTIVE = 2
STALE = 4
TOKEN_SENT = 8
KEY_BINARY = 16

#: Outcomes of :meth:`Items.store` (memcached's store_item_type).
STORED, EXISTS, NOT_FOUND, NOT_STORED = range(4)
#: Outcomes of :meth:`Items.add_delta` (memcached's delta_result_type).
DELTA_OK, DELTA_NON_NUMERIC, DELTA_NOT_FOUND, DELTA_CAS_MISMATCH = range(4)
#: Why :meth:`Items.fits` refuses an item: the stat that counts it.
TOO_LARGE = "store_too_large"
NO_MEMORY = "store_no_memory"

CRLF = b"\r\n"


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


class Item:
    """One stored value. ``value`` includes its trailing CRLF.

    ``exptime`` and ``time`` (last access) are in store seconds, as
    memcached's rel_time_t; ``exptime`` 0 means never. ``cas`` is the
    item's cas unique once linked (before, the cas a request compares).
    """

    __slots__ = ("value", "flags", "exptime", "cas", "time", "size", "bits")

    def __init__(self, key: bytes, value: bytes, flags: int, exptime: int,
                 cas: int = 0, bits: int = 0) -> None:
        self.value = value
        self.flags = flags
        self.exptime = exptime
        self.cas = cas
        self.time = 0
        self.size = item_size(len(key), flags, len(value))
        self.bits = bits


class Items:
    """The items by key, in LRU order, within ``memory_limit`` bytes.

    ``memory_limit`` bounds the sum of :func:`item_size` over the items
    (memcached's ``bytes`` stat); ``item_size_max`` is memcached's ``-I``.
    ``clock`` returns unix time in seconds; :meth:`tick` reads it once per
    request into ``now``. ``counters`` holds the stats of
    :data:`STAT_NAMES` that the commands count.
    """

    def __init__(self, memory_limit: int, item_size_max: int,
                 clock: Callable[[], float]) -> None:
        self.memory_limit = memory_limit
        self.item_size_max = item_size_max
        #: Largest item kept in one piece (bigger ones are no numbers).
        self.chunk_max = min(SLAB_CHUNK_MAX, item_size_max)
        self.counters = dict.fromkeys(STAT_NAMES, 0)
        self.now = CLOCK_OFFSET
        self._clock = clock
        self._started = int(clock()) - CLOCK_OFFSET
        self._table: OrderedDict[bytes, Item] = OrderedDict()
        self._bytes = 0
        self._cas_id = 0
        self._oldest_live = 0
        self._oldest_cas = 0
        self._classes = slab_classes(self.chunk_max)

    def __len__(self) -> int:
        return len(self._table)

    def stats(self) -> dict[str, int]:
        """The counters with the current memory and item count."""
        stats = dict(self.counters)
        stats["limit_maxbytes"] = self.memory_limit
        stats["bytes"] = self._bytes
        stats["curr_items"] = len(self._table)
        return stats

    # -- time ----------------------------------------------------------------

    def tick(self) -> None:
        """Read the clock: ``now`` is the time of the request at hand."""
        self.now = (int(self._clock()) - self._started) & U32

    def realtime(self, exptime: int) -> int:
        """memcached's realtime(): a request's expiry in store seconds."""
        if exptime == 0:
            return 0
        if exptime > REALTIME_MAXDELTA:
            if exptime <= self._started:
                return 1
            return (exptime - self._started) & U32
        return (exptime + self.now) & U32

    def expiry(self, exptime: int) -> int:
        """An exptime argument in store seconds; negative is already past."""
        return self.realtime(REALTIME_MAXDELTA + 1 if exptime < 0 else exptime)

    def flush(self, delay: int) -> None:
        """flush_all: every item written up to ``delay`` seconds from now dies.

        memcached's quirks included: a delay of N seconds takes effect after
        N - 1, and items written during that second die too.
        """
        now = self.now
        new_oldest = self.realtime(delay) if delay > 0 else now
        self._oldest_live = (new_oldest - 1) & U32
        if self._oldest_live <= now:
            self._oldest_cas = self.next_cas()

    # -- finding and marking ---------------------------------------------------

    def lookup(self, key: bytes) -> Item | None:
        """The live item under ``key``, unlinking it if flushed or expired."""
        it = self._table.get(key)
        if it is None or not (self._oldest_live or it.exptime):
            return it
        death = self._death(it)
        if death is None:
            return it
        self.unlink(key, it)
        self.counters[death] += 1
        return None

    def _death(self, it: Item) -> str | None:
        """The stat counting ``it`` as flushed or expired, None if alive.

        As memcached's item_is_flushed: once ``oldest_live`` has come, items
        last written at or before it are dead, and so are those older than
        an immediate flush (by cas).
        """
        now = self.now
        oldest_live = self._oldest_live
        if oldest_live and oldest_live <= now and (
                it.time <= oldest_live or it.cas < self._oldest_cas):
            return "get_flushed"
        if it.exptime and it.exptime <= now:
            return "get_expired"
        return None

    def bump(self, key: bytes, it: Item) -> None:
        """A fetch: memcached's FETCHED and ACTIVE marks, and the LRU move."""
        bits = it.bits
        if not bits & ACTIVE:
            if not bits & FETCHED:
                it.bits = bits | FETCHED
            else:
                it.bits = bits | ACTIVE
                it.time = self.now
        self._table.move_to_end(key)

    def refresh(self, key: bytes, it: Item) -> None:
        """memcached's do_item_update: refresh the access time and LRU."""
        it.time = self.now
        self._table.move_to_end(key)

    def next_cas(self) -> int:
        """A fresh cas unique (memcached's get_cas_id)."""
        self._cas_id += 1
        return self._cas_id

    def slab_class(self, size: int) -> int:
        """The slab class memcached would file an item of ``size`` under."""
        return min(bisect_left(self._classes, size), len(self._classes) - 1) + 1

    # -- memory ----------------------------------------------------------------

    def link(self, key: bytes, it: Item) -> None:
        """Insert ``it`` (no item under ``key``), evicting to make room."""
        self._cas_id += 1
        it.cas = self._cas_id
        it.time = self.now
        if self._bytes + it.size > self.memory_limit:
            self._evict(it.size)
        self._table[key] = it
        self._bytes += it.size
        self.counters["total_items"] += 1

    def unlink(self, key: bytes, it: Item) -> None:
        """Remove ``it``, the item under ``key``."""
        del self._table[key]
        self._bytes -= it.size

    def replace(self, key: bytes, old: Item, new: Item) -> None:
        """Put ``new`` in the place of ``old`` (with a new cas)."""
        self.unlink(key, old)
        self.link(key, new)

    def fits(self, size: int) -> str | None:
        """None if an item of ``size`` bytes can be stored, else why not
        (:data:`TOO_LARGE` or :data:`NO_MEMORY`, counted)."""
        if size > self.item_size_max:
            reason = TOO_LARGE
        elif size > self.memory_limit:
            reason = NO_MEMORY
        else:
            return None
        self.counters[reason] += 1
        return reason

    def set_memory_limit(self, limit: int) -> None:
        """A new ``memory_limit``; items over it go, oldest first."""
        self.memory_limit = limit
        if self._bytes > limit:
            self._evict(0)

    def _evict(self, size: int) -> None:
        """Drop least recently used items until ``size`` more bytes fit.

        Dead (expired or flushed) items found on the way are reclaimed;
        live ones count as evictions.
        """
        table = self._table
        counters = self.counters
        limit = self.memory_limit - size
        while table and self._bytes > limit:
            _, it = table.popitem(last=False)
            self._bytes -= it.size
            unfetched = not it.bits & FETCHED
            if self._death(it) is not None:
                counters["reclaimed"] += 1
                counters["expired_unfetched"] += unfetched
            else:
                counters["evictions"] += 1
                counters["evicted_unfetched"] += unfetched

    # -- storing and arithmetic --------------------------------------------------

    def store(self, key: bytes, it: Item, comm: int, cas_stale: bool
              ) -> tuple[int, int]:
        """memcached's do_store_item: the outcome and the new cas (or 0).

        ``comm`` is the storage command (``CMD_SET``, ``CMD_ADD`` ...);
        ``it.cas`` holds the cas the request asked to compare (0: none).
        With ``cas_stale`` (meta's ``I``) a cas older than the item's still
        wins, and the item is stored stale.
        """
        counters = self.counters
        old = self.lookup(key)
        if old is None:
            if comm == CMD_SET or comm == CMD_ADD:
                self.link(key, it)
                return STORED, it.cas
            if comm == CMD_CAS:
                counters["cas_misses"] += 1
                return NOT_FOUND, 0
            return NOT_STORED, 0
        want = it.cas
        if comm == CMD_ADD:
            self.refresh(key, old)
            return NOT_STORED, 0
        if comm == CMD_CAS:
            if want and want == old.cas:
                counters["cas_hits"] += 1
            elif want and cas_stale and want < old.cas:
                it.exptime = old.exptime
                it.bits |= STALE | (old.bits & TOKEN_SENT)
                counters["cas_hits"] += 1
            else:
                counters["cas_badval"] += 1
                return EXISTS, 0
        elif comm == CMD_APPEND or comm == CMD_PREPEND:
            if want and want != old.cas:
                return EXISTS, 0
            if comm == CMD_APPEND:
                value = old.value[:-2] + it.value
            else:
                value = it.value[:-2] + old.value
            it = Item(key, value, old.flags, old.exptime)
            if it.size > self.item_size_max or it.size > self.memory_limit:
                return NOT_STORED, 0
        self.replace(key, old, it)
        return STORED, it.cas

    def add_delta(self, key: bytes, incr: bool, delta: int, req_cas: int
                  ) -> tuple[int, bytes, Item | None]:
        """memcached's do_add_delta: outcome, new number, affected item.

        A result that fits in the old value's length is written in place,
        padded with spaces (as memcached does); otherwise a new item
        replaces the old one and the returned (old) item takes its cas.
        """
        it = self.lookup(key)
        if it is None:
            return DELTA_NOT_FOUND, b"", None
        data = it.value
        if len(data) <= 2 or it.size > self.chunk_max:
            return DELTA_NON_NUMERIC, b"", None
        if req_cas and it.cas != req_cas:
            return DELTA_CAS_MISMATCH, b"", None
        value = strtoull(data[:-2])
        if value is None:
            return DELTA_NON_NUMERIC, b"", None
        counters = self.counters
        if incr:
            value = (value + delta) & U64
            counters["incr_hits"] += 1
        else:
            value = 0 if delta > value else value - delta
            counters["decr_hits"] += 1
        number = b"%d" % value
        if len(number) + 2 <= len(data):
            it.cas = self.next_cas()
            it.value = number.ljust(len(data) - 2) + CRLF
            self.refresh(key, it)
        else:
            new = Item(key, number + CRLF, it.flags, it.exptime)
            self.replace(key, it, new)
            it.cas = new.cas
        return DELTA_OK, number, it
