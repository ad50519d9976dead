"""Unit tests for the cache's items alone: LRU, memory, cas, time, storing.

No command syntax here: items are made and stored directly, on a clock
the test moves, so each rule of ``items.py`` is checked without the
command layer that test_store.py drives.
"""

from __future__ import annotations

import pytest

from mcproxy.cache.items import (
    ACTIVE,
    CLOCK_OFFSET,
    DELTA_CAS_MISMATCH,
    DELTA_NON_NUMERIC,
    DELTA_NOT_FOUND,
    DELTA_OK,
    EXISTS,
    FETCHED,
    NO_MEMORY,
    NOT_FOUND,
    NOT_STORED,
    REALTIME_MAXDELTA,
    SLAB_CHUNK_MAX,
    STALE,
    STAT_NAMES,
    STORED,
    TOKEN_SENT,
    TOO_LARGE,
    Item,
    Items,
    item_size,
    slab_classes,
)
from mcproxy.wire.request import CMD_ADD, CMD_APPEND, CMD_CAS, CMD_PREPEND, CMD_REPLACE, CMD_SET

START = 1_700_000_000


class Clock:
    def __init__(self) -> None:
        self.now = START + 0.5

    def __call__(self) -> float:
        return self.now


def make(memory_limit: int = 2**20, item_size_max: int = 2**20) -> tuple[Items, Clock]:
    clock = Clock()
    items = Items(memory_limit, item_size_max, clock)
    items.tick()
    return items, clock


def later(items: Items, clock: Clock, seconds: int) -> None:
    clock.now += seconds
    items.tick()


def put(items: Items, key: bytes, value: bytes = b"v", exptime: int = 0,
        flags: int = 0) -> Item:
    it = Item(key, value + b"\r\n", flags, exptime)
    assert items.store(key, it, CMD_SET, False) == (STORED, it.cas)
    return it


def size_of(key: bytes, value: bytes = b"v", flags: int = 0) -> int:
    return item_size(len(key), flags, len(value) + 2)


# -- memory ----------------------------------------------------------------------


def test_an_item_counts_as_memcached_counts_it():
    assert Item(b"key", b"val\r\n", 0, 0).size == 56 + 4 + 5
    assert Item(b"key", b"val\r\n", 7, 0).size == 56 + 4 + 4 + 5
    items, _ = make()
    put(items, b"a", b"1234")
    put(items, b"b", b"", flags=1)
    stats = items.stats()
    assert stats["bytes"] == size_of(b"a", b"1234") + size_of(b"b", b"", 1)
    assert (stats["curr_items"], stats["total_items"], len(items)) == (2, 2, 2)
    assert list(stats) == list(STAT_NAMES)


def test_replacing_and_unlinking_keep_the_accounting():
    items, _ = make()
    old = put(items, b"k", b"short")
    put(items, b"k", b"a longer value")
    assert items.stats()["bytes"] == size_of(b"k", b"a longer value")
    items.unlink(b"k", items.lookup(b"k"))
    assert (items.stats()["bytes"], len(items), items.lookup(b"k")) == (0, 0, None)
    assert old.cas == 1 and items.stats()["total_items"] == 2


def test_the_least_recently_used_item_is_evicted_first():
    one = size_of(b"a")
    items, _ = make(memory_limit=3 * one)
    for key in (b"a", b"b", b"c"):
        put(items, key)
    items.bump(b"a", items.lookup(b"a"))
    put(items, b"d")
    assert [k for k in (b"a", b"b", b"c", b"d") if items.lookup(k)] == [b"a", b"c", b"d"]
    stats = items.stats()
    assert (stats["evictions"], stats["evicted_unfetched"], stats["reclaimed"]) == (1, 1, 0)
    assert stats["bytes"] == 3 * one


def test_a_fetched_item_evicted_is_not_unfetched():
    items, _ = make(memory_limit=size_of(b"a"))
    put(items, b"a")
    items.bump(b"a", items.lookup(b"a"))
    put(items, b"b")
    stats = items.stats()
    assert (stats["evictions"], stats["evicted_unfetched"]) == (1, 0)


def test_dead_items_met_by_eviction_are_reclaimed():
    items, clock = make(memory_limit=2 * size_of(b"a"))
    put(items, b"a", exptime=items.expiry(5))
    put(items, b"b")
    later(items, clock, 10)
    put(items, b"c")
    stats = items.stats()
    assert (stats["reclaimed"], stats["expired_unfetched"], stats["evictions"]) == (1, 1, 0)
    assert stats["get_expired"] == 0  # never looked up


def test_fits_says_why_and_counts():
    items, _ = make(memory_limit=500, item_size_max=1000)
    assert items.fits(500) is None
    assert items.fits(501) == NO_MEMORY
    assert items.fits(1001) == TOO_LARGE
    stats = items.stats()
    assert (stats["store_no_memory"], stats["store_too_large"]) == (1, 1)


def test_a_lower_memory_limit_evicts_oldest_first():
    one = size_of(b"a")
    items, _ = make(memory_limit=4 * one)
    for key in (b"a", b"b", b"c", b"d"):
        put(items, key)
    items.set_memory_limit(2 * one)
    assert [k for k in (b"a", b"b", b"c", b"d") if items.lookup(k)] == [b"c", b"d"]
    assert (items.memory_limit, items.stats()["limit_maxbytes"]) == (2 * one, 2 * one)
    items.set_memory_limit(8 * one)
    assert len(items) == 2


# -- time --------------------------------------------------------------------------


def test_store_time_starts_in_the_past_and_follows_the_clock():
    items, clock = make()
    assert items.now == CLOCK_OFFSET
    later(items, clock, 0.4)
    assert items.now == CLOCK_OFFSET  # whole seconds
    later(items, clock, 0.2)
    assert items.now == CLOCK_OFFSET + 1


@pytest.mark.parametrize(("exptime", "expect"), [
    (0, 0),
    (10, CLOCK_OFFSET + 10),
    (REALTIME_MAXDELTA, CLOCK_OFFSET + REALTIME_MAXDELTA),
    (START + 100, CLOCK_OFFSET + 100),        # absolute unix time
    (REALTIME_MAXDELTA + 1, 1),               # absolute, before the start
    (-1, 1),                                  # negative: already past
])
def test_expiry_reads_relative_and_absolute_times(exptime, expect):
    items, _ = make()
    assert items.expiry(exptime) == expect


def test_lookup_drops_expired_items_and_counts_them():
    items, clock = make()
    put(items, b"k", exptime=items.expiry(2))
    later(items, clock, 1)
    assert items.lookup(b"k") is not None
    later(items, clock, 1)
    assert items.lookup(b"k") is None
    stats = items.stats()
    assert (stats["get_expired"], stats["curr_items"], stats["bytes"]) == (1, 0, 0)


def test_flush_now_kills_items_of_this_second_by_cas():
    items, clock = make()
    put(items, b"old")
    items.flush(0)
    put(items, b"new")
    assert items.lookup(b"old") is None
    assert items.lookup(b"new") is not None
    assert items.stats()["get_flushed"] == 1
    later(items, clock, 5)
    assert items.lookup(b"new") is not None


def test_flush_with_a_delay_takes_effect_one_second_early():
    items, clock = make()
    put(items, b"k")
    items.flush(3)
    later(items, clock, 1)
    assert items.lookup(b"k") is not None
    later(items, clock, 1)
    assert items.lookup(b"k") is None
    put(items, b"k")  # written in the flush's second: dies too
    later(items, clock, 1)
    assert items.lookup(b"k") is None
    put(items, b"k")
    assert items.lookup(b"k") is not None
    assert items.stats()["get_flushed"] == 2


# -- marks, cas, classes -------------------------------------------------------------


def test_bump_marks_fetched_then_active_and_moves_to_the_front():
    items, clock = make(memory_limit=2 * size_of(b"a"))
    a = put(items, b"a")
    put(items, b"b")
    later(items, clock, 3)
    items.bump(b"a", a)
    assert (a.bits, a.time) == (FETCHED, CLOCK_OFFSET)
    items.bump(b"a", a)
    assert (a.bits, a.time) == (FETCHED | ACTIVE, CLOCK_OFFSET + 3)
    put(items, b"c")
    assert items.lookup(b"b") is None and items.lookup(b"a") is a


def test_refresh_sets_the_access_time_without_marks():
    items, clock = make()
    it = put(items, b"k")
    later(items, clock, 7)
    items.refresh(b"k", it)
    assert (it.time, it.bits) == (CLOCK_OFFSET + 7, 0)


def test_every_link_and_next_cas_take_a_fresh_cas():
    items, _ = make()
    assert [put(items, k).cas for k in (b"a", b"b", b"a")] == [1, 2, 3]
    assert items.next_cas() == 4


def test_slab_classes_match_memcached_defaults():
    classes = slab_classes(2**19)
    assert classes[:8] == [96, 120, 152, 192, 240, 304, 384, 480]
    assert (len(classes), classes[-2], classes[-1]) == (39, 394840, 524288)


def test_slab_classes_cap_at_the_chunk_size():
    items, _ = make()
    assert items.slab_class(1) == 1
    assert items.slab_class(96) == 1
    assert items.slab_class(97) == 2
    assert items.slab_class(SLAB_CHUNK_MAX) == items.slab_class(2**20)


# -- store (do_store_item) -------------------------------------------------------------


def test_add_refuses_an_existing_item_and_refreshes_it():
    items, clock = make()
    it = put(items, b"k")
    later(items, clock, 4)
    assert items.store(b"k", Item(b"k", b"x\r\n", 0, 0), CMD_ADD, False) == (NOT_STORED, 0)
    assert it.time == CLOCK_OFFSET + 4 and items.lookup(b"k") is it


def test_replace_and_cas_need_an_item():
    items, _ = make()
    assert items.store(b"k", Item(b"k", b"x\r\n", 0, 0), CMD_REPLACE, False) == (NOT_STORED, 0)
    assert items.store(b"k", Item(b"k", b"x\r\n", 0, 0, cas=1), CMD_CAS, False) == (NOT_FOUND, 0)
    assert items.stats()["cas_misses"] == 1 and len(items) == 0


def test_cas_compares_and_counts():
    items, _ = make()
    it = put(items, b"k")
    wrong = Item(b"k", b"x\r\n", 0, 0, cas=it.cas + 1)
    assert items.store(b"k", wrong, CMD_CAS, False) == (EXISTS, 0)
    right = Item(b"k", b"y\r\n", 0, 0, cas=it.cas)
    assert items.store(b"k", right, CMD_CAS, False) == (STORED, it.cas + 1)
    stats = items.stats()
    assert (stats["cas_badval"], stats["cas_hits"]) == (1, 1)
    assert items.lookup(b"k").value == b"y\r\n"


def test_an_older_cas_wins_as_stale_with_cas_stale():
    items, _ = make()
    put(items, b"k")
    it = put(items, b"k", exptime=items.expiry(99))
    it.bits |= TOKEN_SENT
    stale = Item(b"k", b"s\r\n", 0, 0, cas=it.cas - 1)
    assert items.store(b"k", stale, CMD_CAS, True)[0] == STORED
    assert (stale.bits, stale.exptime) == (STALE | TOKEN_SENT, CLOCK_OFFSET + 99)
    newer = Item(b"k", b"n\r\n", 0, 0, cas=stale.cas + 1)
    assert items.store(b"k", newer, CMD_CAS, True) == (EXISTS, 0)


def test_append_and_prepend_keep_the_old_flags_and_expiry():
    items, _ = make()
    put(items, b"k", b"mid", exptime=items.expiry(50), flags=3)
    assert items.store(b"k", Item(b"k", b"<\r\n", 9, 0), CMD_PREPEND, False)[0] == STORED
    assert items.store(b"k", Item(b"k", b">\r\n", 9, 0), CMD_APPEND, False)[0] == STORED
    it = items.lookup(b"k")
    assert (it.value, it.flags, it.exptime) == (b"<mid>\r\n", 3, CLOCK_OFFSET + 50)
    assert items.stats()["bytes"] == size_of(b"k", b"<mid>", 3)
    bad = Item(b"k", b"x\r\n", 0, 0, cas=it.cas + 1)
    assert items.store(b"k", bad, CMD_APPEND, False) == (EXISTS, 0)


def test_append_past_the_size_limit_is_not_stored():
    items, _ = make(item_size_max=size_of(b"k", b"12345"))
    put(items, b"k", b"1234")
    assert items.store(b"k", Item(b"k", b"5\r\n", 0, 0), CMD_APPEND, False) == (STORED, 2)
    assert items.store(b"k", Item(b"k", b"6\r\n", 0, 0), CMD_APPEND, False) == (NOT_STORED, 0)
    assert items.lookup(b"k").value == b"12345\r\n"


# -- add_delta (incr/decr) ----------------------------------------------------------------


def test_delta_in_place_pads_with_spaces():
    items, _ = make()
    it = put(items, b"n", b"100")
    assert items.add_delta(b"n", False, 95, 0) == (DELTA_OK, b"5", it)
    assert it.value == b"5  \r\n" and it.cas == 2
    assert items.stats()["decr_hits"] == 1


def test_delta_that_grows_the_number_replaces_the_item():
    items, _ = make()
    old = put(items, b"n", b"9")
    result, number, it = items.add_delta(b"n", True, 1, 0)
    assert (result, number, it) == (DELTA_OK, b"10", old)
    new = items.lookup(b"n")
    assert new is not old and new.value == b"10\r\n" and old.cas == new.cas
    assert items.stats()["bytes"] == size_of(b"n", b"10")


def test_delta_wraps_and_floors_as_memcached():
    items, _ = make()
    put(items, b"n", b"18446744073709551615")
    assert items.add_delta(b"n", True, 2, 0)[1] == b"1"
    assert items.add_delta(b"n", False, 5, 0)[1] == b"0"


@pytest.mark.parametrize("value", [b"", b"abc", b"-1"])
def test_delta_on_something_else_than_a_number(value):
    items, _ = make()
    put(items, b"n", value)
    assert items.add_delta(b"n", True, 1, 0) == (DELTA_NON_NUMERIC, b"", None)


def test_delta_misses_cas_and_chunked_items():
    items, _ = make(item_size_max=2**21)
    assert items.add_delta(b"n", True, 1, 0) == (DELTA_NOT_FOUND, b"", None)
    it = put(items, b"n", b"1")
    assert items.add_delta(b"n", True, 1, it.cas + 1) == (DELTA_CAS_MISMATCH, b"", None)
    put(items, b"big", b"1" + b" " * SLAB_CHUNK_MAX)
    assert items.add_delta(b"big", True, 1, 0)[0] == DELTA_NON_NUMERIC
