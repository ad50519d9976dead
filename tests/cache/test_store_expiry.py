"""Expiry in the embedded store, beyond test_store.py: every command
that takes an expiry time, each form of it, on an injected clock.

memcached reads an exptime as relative seconds up to 30 days, as an
absolute unix time above that, and a negative one as "already expired";
``touch``, ``gat``, ``mg``/``ms``/``md``/``ma`` ``T`` and ``flush_all``
share those rules with ``set``.
"""

from __future__ import annotations

import pytest

from .test_store import START, Harness

DAY = 86400


@pytest.fixture
def mc() -> Harness:
    return Harness()


def test_touch_relative_absolute_negative(mc):
    mc("set k 0 0 1", "x")
    assert mc("touch k 10") == b"TOUCHED\r\n"
    mc.clock.advance(9)
    assert mc("mg k t") == b"HD t1\r\n"
    assert mc(f"touch k {START + 109}") == b"TOUCHED\r\n"
    assert mc("mg k t") == b"HD t100\r\n"
    mc.clock.advance(99)
    assert mc("get k") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    mc.clock.advance(1)
    assert mc("touch k 10") == b"NOT_FOUND\r\n"
    mc("set k 0 0 1", "x")
    assert mc("touch k -1") == b"TOUCHED\r\n"
    assert mc("get k") == b"END\r\n"
    stats = mc.stats()
    assert (stats["touch_hits"], stats["touch_misses"], stats["get_expired"]) == (3, 1, 2)


def test_touch_zero_makes_an_item_immortal(mc):
    mc("set k 0 5 1", "x")
    mc("touch k 0")
    mc.clock.advance(365 * DAY)
    assert mc("mg k t") == b"HD t-1\r\n"


def test_gat_relative_and_absolute(mc):
    mc("set a 0 0 1", "a")
    mc("set b 0 0 1", "b")
    assert mc("gat 10 a") == b"VALUE a 0 1\r\na\r\nEND\r\n"
    assert mc(f"gats {START + 20} b") == b"VALUE b 0 1 2\r\nb\r\nEND\r\n"
    mc.clock.advance(10)
    assert mc("get a b") == b"VALUE b 0 1\r\nb\r\nEND\r\n"
    mc.clock.advance(10)
    assert mc("get b") == b"END\r\n"


def test_absolute_time_now_or_before_start_is_already_expired(mc):
    mc(f"set now 0 {START} 1", "x")
    mc(f"set before_start 0 {START - 365 * DAY} 1", "x")
    mc(f"set next_second 0 {START + 1} 1", "x")
    assert mc("get now before_start next_second") == (
        b"VALUE next_second 0 1\r\nx\r\nEND\r\n")
    mc.clock.advance(1)
    assert mc("get next_second") == b"END\r\n"


def test_thirty_days_relative_then_absolute_in_the_future(mc):
    mc(f"set rel 0 {30 * DAY} 1", "x")
    mc(f"set abs 0 {START + 31 * DAY} 1", "x")
    assert mc("mg rel t") == b"HD t2592000\r\n"
    assert mc("mg abs t") == b"HD t2678400\r\n"
    mc.clock.advance(30 * DAY)
    assert mc("get rel abs") == b"VALUE abs 0 1\r\nx\r\nEND\r\n"


@pytest.mark.parametrize("line", ["set k 0 -1 1", "add k 0 -1 1", "replace k 0 -1 1",
                                  "cas k 0 -1 1 1", "set k 0 -2147483648 1"])
def test_negative_exptime_stores_a_dead_item(mc, line):
    if not line.startswith("add"):
        mc("set k 0 0 1", "x")
    assert mc(line, "y") == b"STORED\r\n"
    assert mc("get k") == b"END\r\n"
    assert mc.stats()["get_expired"] == 1


def test_expired_item_is_missing_for_every_storage_mode(mc):
    for key in ("add", "replace", "append", "prepend", "cas", "incr"):
        mc(f"set {key} 0 1 1", "1")
    mc.clock.advance(1)
    assert mc("add add 0 0 1", "2") == b"STORED\r\n"
    assert mc("replace replace 0 0 1", "2") == b"NOT_STORED\r\n"
    assert mc("append append 0 0 1", "2") == b"NOT_STORED\r\n"
    assert mc("prepend prepend 0 0 1", "2") == b"NOT_STORED\r\n"
    assert mc("cas cas 0 0 1 5", "2") == b"NOT_FOUND\r\n"
    assert mc("incr incr 1") == b"NOT_FOUND\r\n"
    assert mc("delete add") == b"DELETED\r\n"


def test_incr_keeps_the_expiry_also_when_the_number_grows(mc):
    mc("set n 0 10 1", "9")
    mc.clock.advance(4)
    assert mc("incr n 1") == b"10\r\n"  # longer: a new item, same expiry
    assert mc("decr n 1") == b"9\r\n"  # in place
    assert mc("mg n t") == b"HD t6\r\n"
    mc.clock.advance(6)
    assert mc("get n") == b"END\r\n"


def test_meta_ttls_relative_absolute_negative(mc):
    assert mc(f"ms k 1 T{START + 50}", "x") == b"HD\r\n"
    assert mc("mg k t") == b"HD t50\r\n"
    assert mc(f"mg k T{START + 60} t") == b"HD t60\r\n"
    assert mc("ma n N30 J1 t") == b"HD t30\r\n"
    assert mc(f"ma n T{START + 5} t") == b"HD t5\r\n"
    mc.clock.advance(5)
    assert mc("mg n") == b"EN\r\n"
    assert mc("md k I T-1") == b"HD\r\n"  # stale, and already expired
    assert mc("mg k") == b"EN\r\n"
    assert mc("ms k 1 T0", "x") == b"HD\r\n"
    assert mc("mg k T-1") == b"HD\r\n"
    assert mc("mg k") == b"EN\r\n"


def test_flush_all_at_an_absolute_time(mc):
    mc("set a 0 0 1", "a")
    assert mc(f"flush_all {START + 10}") == b"OK\r\n"
    mc.clock.advance(8)
    assert mc("get a") == b"VALUE a 0 1\r\na\r\nEND\r\n"
    mc.clock.advance(1)  # as with a delay, one second early
    assert mc("get a") == b"END\r\n"


def test_expiry_survives_a_long_uptime(mc):
    mc.clock.advance(400 * DAY)
    mc("set rel 0 100 1", "x")
    mc(f"set abs 0 {START + 400 * DAY + 100} 1", "x")
    assert [mc("mg rel t"), mc("mg abs t")] == [b"HD t100\r\n"] * 2
    mc.clock.advance(100)
    assert mc("get rel abs") == b"END\r\n"
