"""Unit tests for the embedded store: every command, flag and error.

Time comes from a fake clock, so expiry is tested without sleeping.
tests/e2e/test_store_vs_memcached.py checks the same replies against a real
memcached; these tests pin the behaviour down where that is impractical
(time, memory, eviction) and document where the store differs.
"""

from __future__ import annotations

import pytest

from mcproxy.cache.items import STAT_NAMES, item_size
from mcproxy.cache.replies import BAD_DATA_CHUNK, BAD_FORMAT, ERROR
from mcproxy.cache.store import Store
from mcproxy.wire.request import (
    CMD_STATS,
    COMMANDS,
    ParseError,
    Request,
    parse_request,
)

START = 1_700_000_000


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START + 0.5) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(line: bytes, value: bytes | None = None) -> Request:
    """A request as the proxy would hand it over (value incl. CRLF)."""
    if not line.endswith(b"\r\n"):
        line += b"\r\n"
    try:
        req = parse_request(line)
    except ParseError:
        # Lines the proxy itself rejects still get memcached's answer.
        name = line[:-2].split(b" ", 1)[0]
        req = Request(COMMANDS[name], line, line[:-2].split(b" "), b"")
    if value is not None:
        req.value = value + b"\r\n"
    return req


class Harness:
    """A store on a fake clock, driven by request lines."""

    def __init__(self, **kwargs) -> None:
        self.clock = FakeClock()
        self.store = Store(clock=self.clock, **kwargs)

    def __call__(self, line: bytes | str, value: bytes | str | None = None
                 ) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        if isinstance(value, str):
            value = value.encode()
        return self.store.execute(make(line, value))

    def stats(self) -> dict[str, int]:
        return self.store.stats()


@pytest.fixture
def mc() -> Harness:
    return Harness()


# -- retrieval -----------------------------------------------------------


def test_get_miss_and_hit(mc):
    assert mc("get foo") == b"END\r\n"
    assert mc("set foo 5 0 3", "bar") == b"STORED\r\n"
    assert mc("get foo") == b"VALUE foo 5 3\r\nbar\r\nEND\r\n"
    assert mc("gets foo") == b"VALUE foo 5 3 1\r\nbar\r\nEND\r\n"


def test_multiget_has_one_end_and_keeps_order(mc):
    mc("set a 1 0 1", "A")
    mc("set b 2 0 1", "B")
    assert mc("get b nope a b") == (b"VALUE b 2 1\r\nB\r\nVALUE a 1 1\r\nA\r\n"
                                    b"VALUE b 2 1\r\nB\r\nEND\r\n")
    assert mc("gets  a   b ") == (b"VALUE a 1 1 1\r\nA\r\n"
                                  b"VALUE b 2 1 2\r\nB\r\nEND\r\n")


def test_multiget_beyond_token_cap(mc):
    mc("set k40 0 0 1", "x")
    keys = " ".join(f"k{i}" for i in range(41))
    assert mc(f"get {keys}") == b"VALUE k40 0 1\r\nx\r\nEND\r\n"


def test_get_without_key_is_error(mc):
    assert mc("get") == ERROR
    assert mc("gets") == ERROR


def test_get_long_key_drops_everything_before_it(mc):
    mc("set a 0 0 1", "A")
    assert mc("get a " + "x" * 251) == BAD_FORMAT
    assert mc("get " + "x" * 250) == b"END\r\n"
    # The keys before the long one were still fetched.
    assert mc.stats()["get_hits"] == 1


def test_get_noreply_is_a_key(mc):
    mc("set noreply 0 0 1", "n")
    assert mc("get noreply") == b"VALUE noreply 0 1\r\nn\r\nEND\r\n"


def test_gat_updates_ttl_and_counts_as_touch(mc):
    mc("set k 0 100 2", "hi")
    assert mc("gat 0 k nope") == b"VALUE k 0 2\r\nhi\r\nEND\r\n"
    assert mc("mg k t") == b"HD t-1\r\n"
    assert mc("gats 50 k") == b"VALUE k 0 2 1\r\nhi\r\nEND\r\n"
    assert mc("mg k t") == b"HD t50\r\n"
    stats = mc.stats()
    assert (stats["cmd_touch"], stats["touch_hits"], stats["touch_misses"]) == (3, 2, 1)
    assert stats["cmd_get"] == 2  # only the two mg


def test_gat_errors(mc):
    assert mc("gat x k") == b"CLIENT_ERROR invalid exptime argument\r\n"
    assert mc("gat 10") == b"END\r\n"
    assert mc("gat -1 k") == b"END\r\n"
    mc("set k 0 0 1", "x")
    assert mc("gat -1 k") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    assert mc("get k") == b"END\r\n"


# -- storage -------------------------------------------------------------


def test_add_replace_append_prepend(mc):
    assert mc("add k 1 0 1", "a") == b"STORED\r\n"
    assert mc("add k 2 0 1", "b") == b"NOT_STORED\r\n"
    assert mc("replace nope 0 0 1", "x") == b"NOT_STORED\r\n"
    assert mc("replace k 3 0 2", "cc") == b"STORED\r\n"
    assert mc("append k 9 0 3", "ddd") == b"STORED\r\n"
    assert mc("prepend k 9 0 2", "ee") == b"STORED\r\n"
    # append/prepend keep the old flags
    assert mc("get k") == b"VALUE k 3 7\r\neeccddd\r\nEND\r\n"
    assert mc("append nope 0 0 1", "x") == b"NOT_STORED\r\n"
    assert mc("prepend nope 0 0 1", "x") == b"NOT_STORED\r\n"


def test_append_keeps_expiry(mc):
    mc("set k 0 10 1", "a")
    mc("append k 0 1000 1", "b")
    assert mc("mg k t v") == b"VA 2 t10\r\nab\r\n"


def test_flags_are_32_bit_as_strtoul_reads_them(mc):
    mc("set f 4294967295 0 1", "x")
    assert mc("get f") == b"VALUE f 4294967295 1\r\nx\r\nEND\r\n"
    mc("set f 4294967297 0 1", "x")
    assert mc("get f") == b"VALUE f 1 1\r\nx\r\nEND\r\n"
    assert mc("set f -0 0 1", "x") == b"STORED\r\n"
    assert mc("set f +7 0 1", "x") == b"STORED\r\n"
    assert mc("get f") == b"VALUE f 7 1\r\nx\r\nEND\r\n"


def test_storage_line_errors(mc):
    # memcached would then read the payload as a command; the proxy has
    # already consumed it, so only the error line is answered.
    assert mc("set k -1 0 1", "x") == BAD_FORMAT
    assert mc("set k 0 x 1", "x") == BAD_FORMAT
    assert mc("set k 0 9223372036854775808 1", "x") == BAD_FORMAT
    assert mc("set " + "k" * 251 + " 0 0 1", "x") == BAD_FORMAT
    assert mc("cas k 0 0 1 -1", "x") == BAD_FORMAT
    assert mc("set k 0 0 1 a b", "x") == ERROR
    assert mc("cas k 0 0 1", "x") == ERROR
    assert mc("set k 0 0 1 noreply extra", "x") == ERROR
    assert mc("set k x 0 1 noreply", "x") == b""
    assert mc("get k") == b"END\r\n"


def test_bad_data_chunk(mc):
    assert mc.store.execute(make(b"set k 0 0 1\r\n", b"xx")) == BAD_DATA_CHUNK
    req = make(b"set k 0 0 2\r\n")
    req.value = b"xy\n\n"
    assert mc.store.execute(req) == BAD_DATA_CHUNK
    assert mc.store.execute(make(b"set k 0 0 1\r\n")) == BAD_DATA_CHUNK
    req = make(b"set k 0 0 2 noreply\r\n")
    req.value = b"xyzz"
    assert mc.store.execute(req) == b""
    req = make(b"ms k 2 q\r\n")
    req.value = b"xyzz"
    assert mc.store.execute(req) == BAD_DATA_CHUNK
    assert mc("get k") == b"END\r\n"
    assert mc.stats()["cmd_set"] == 5


def test_noreply_storage(mc):
    for line in ("set k 0 0 1 noreply", "add k 0 0 1 noreply",
                 "replace k 0 0 1 noreply", "append k 0 0 1 noreply",
                 "prepend k 0 0 1 noreply", "cas k 0 0 1 99 noreply"):
        assert mc(line, "z") == b""
    assert mc("get k") == b"VALUE k 0 3\r\nzzz\r\nEND\r\n"
    # only the exact token counts
    assert mc("set k 0 0 1 noreplyx", "a") == b"STORED\r\n"


def test_value_with_crlf_inside(mc):
    mc("set k 0 0 4", b"a\r\nb")
    assert mc("get k") == b"VALUE k 0 4\r\na\r\nb\r\nEND\r\n"


# -- cas -----------------------------------------------------------------


def test_cas_flow(mc):
    assert mc("cas k 0 0 1 1", "x") == b"NOT_FOUND\r\n"
    mc("set k 0 0 1", "a")
    assert mc("gets k") == b"VALUE k 0 1 1\r\na\r\nEND\r\n"
    assert mc("cas k 0 0 1 999", "b") == b"EXISTS\r\n"
    assert mc("cas k 0 0 1 0", "b") == b"EXISTS\r\n"
    assert mc("cas k 7 0 1 1", "c") == b"STORED\r\n"
    assert mc("gets k") == b"VALUE k 7 1 2\r\nc\r\nEND\r\n"
    assert mc("cas k 0 0 1 1", "d") == b"EXISTS\r\n"
    stats = mc.stats()
    assert (stats["cas_misses"], stats["cas_hits"], stats["cas_badval"]) == (1, 1, 3)


def test_cas_ids_advance_on_every_change(mc):
    mc("set a 0 0 1", "1")
    mc("set b 0 0 1", "1")
    mc("incr a 1")
    mc("touch b 10")  # touch keeps the cas
    assert mc("gets a b") == (b"VALUE a 0 1 3\r\n2\r\nVALUE b 0 1 2\r\n1\r\n"
                              b"END\r\n")
    mc("flush_all")  # consumes one id
    mc("set c 0 0 1", "1")
    assert mc("gets c") == b"VALUE c 0 1 5\r\n1\r\nEND\r\n"


def test_cas_on_expired_item_is_not_found(mc):
    mc("set k 0 1 1", "a")
    mc.clock.advance(1)
    assert mc("cas k 0 0 1 1", "b") == b"NOT_FOUND\r\n"


def test_append_with_cas_via_meta(mc):
    mc("set k 0 0 1", "a")
    assert mc("ms k 1 MA C9", "b") == b"EX\r\n"
    assert mc("ms k 1 MA C1 c", "b") == b"HD c2\r\n"
    assert mc("get k") == b"VALUE k 0 2\r\nab\r\nEND\r\n"


# -- incr / decr ---------------------------------------------------------


def test_incr_decr(mc):
    assert mc("incr n 1") == b"NOT_FOUND\r\n"
    mc("set n 5 0 3", "100")
    assert mc("decr n 1") == b"99\r\n"
    # shorter results are padded in place, as memcached does
    assert mc("gets n") == b"VALUE n 5 3 2\r\n99 \r\nEND\r\n"
    assert mc("incr n 18446744073709551615") == b"98\r\n"  # wraps at 2**64
    assert mc("decr n 1000") == b"0\r\n"  # floors at 0
    assert mc("get n") == b"VALUE n 5 3\r\n0  \r\nEND\r\n"
    assert mc("incr n 12345") == b"12345\r\n"  # longer: a new item
    assert mc("gets n") == b"VALUE n 5 5 5\r\n12345\r\nEND\r\n"


def test_incr_parsing(mc):
    mc("set s 0 0 2", " 5")
    assert mc("incr s 1") == b"6\r\n"
    mc("set s 0 0 5", "12 ab")
    assert mc("incr s 1") == b"13\r\n"
    assert mc("get s") == b"VALUE s 0 5\r\n13   \r\nEND\r\n"
    for value in ("5a", "", "-1", "18446744073709551616", "x"):
        mc(f"set s 0 0 {len(value)}", value)
        assert mc("incr s 1") == (b"CLIENT_ERROR cannot increment or "
                                  b"decrement non-numeric value\r\n")
    mc("set s 0 0 2", "-0")
    assert mc("decr s 1") == b"0\r\n"


def test_incr_delta_errors(mc):
    mc("set n 0 0 1", "1")
    bad_delta = b"CLIENT_ERROR invalid numeric delta argument\r\n"
    for delta in ("-1", "x", "1x", "18446744073709551616"):
        assert mc(f"incr n {delta}") == bad_delta
    assert mc("incr n +1") == b"2\r\n"
    assert mc("incr n") == ERROR
    assert mc("incr n 1 2 3") == ERROR
    assert mc("incr " + "n" * 251 + " 1") == BAD_FORMAT
    assert mc("incr n 1 noreply") == b""
    assert mc("decr n x noreply") == b""
    assert mc("get n") == b"VALUE n 0 1\r\n3\r\nEND\r\n"


def test_incr_stats(mc):
    mc("set n 0 0 1", "1")
    mc("incr n 1")
    mc("incr x 1")
    mc("decr n 1")
    mc("decr x 1")
    mc("decr x 1")
    stats = mc.stats()
    assert (stats["incr_hits"], stats["incr_misses"]) == (1, 1)
    assert (stats["decr_hits"], stats["decr_misses"]) == (1, 2)


# -- touch / delete / flush_all / verbosity ------------------------------


def test_touch(mc):
    assert mc("touch k 10") == b"NOT_FOUND\r\n"
    mc("set k 0 0 1", "x")
    assert mc("touch k 10") == b"TOUCHED\r\n"
    mc.clock.advance(9)
    assert mc("get k") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    mc.clock.advance(1)
    assert mc("get k") == b"END\r\n"
    assert mc("touch k x") == b"CLIENT_ERROR invalid exptime argument\r\n"
    assert mc("touch k") == ERROR
    assert mc("touch k 1 noreply") == b""
    assert mc("touch k x noreply") == b""
    assert mc("touch " + "k" * 251 + " 1") == BAD_FORMAT


def test_delete_forms(mc):
    usage = (b"CLIENT_ERROR bad command line format.  "
             b"Usage: delete <key> [noreply]\r\n")
    assert mc("delete k") == b"NOT_FOUND\r\n"
    mc("set k 0 0 1", "a")
    assert mc("delete k 0") == b"DELETED\r\n"
    assert mc("delete k 1") == usage
    assert mc("delete k 0 0") == usage
    assert mc("delete k a b c") == ERROR
    assert mc("delete " + "k" * 251) == BAD_FORMAT
    mc("set k 0 0 1", "a")
    assert mc("delete k 1 noreply") == b""  # invalid: not deleted
    assert mc("get k") == b"VALUE k 0 1\r\na\r\nEND\r\n"
    assert mc("delete k 0 noreply") == b""
    assert mc("get k") == b"END\r\n"
    stats = mc.stats()
    assert (stats["delete_hits"], stats["delete_misses"]) == (2, 1)


def test_flush_all_immediate(mc):
    mc("set a 0 0 1", "a")
    assert mc("flush_all") == b"OK\r\n"
    mc("set b 0 0 1", "b")  # stored after the flush: survives
    assert mc("get a b") == b"VALUE b 0 1\r\nb\r\nEND\r\n"
    assert mc.stats()["get_flushed"] == 1
    assert mc.stats()["cmd_flush"] == 1


def test_flush_all_delayed(mc):
    mc("set a 0 0 1", "a")
    assert mc("flush_all 10") == b"OK\r\n"
    mc.clock.advance(8)
    mc("set b 0 0 1", "b")
    assert mc("get a b") == b"VALUE a 0 1\r\na\r\nVALUE b 0 1\r\nb\r\nEND\r\n"
    # memcached's flush takes effect one second before the delay ends,
    # for every item last written at or before that second
    mc.clock.advance(1)
    mc("set c 0 0 1", "c")
    assert mc("get a b c") == b"END\r\n"
    mc.clock.advance(1)
    mc("set d 0 0 1", "d")
    assert mc("get d") == b"VALUE d 0 1\r\nd\r\nEND\r\n"


def test_flush_all_one_second_kills_this_second(mc):
    mc("flush_all 1")
    mc("set a 0 0 1", "a")
    assert mc("get a") == b"END\r\n"
    mc.clock.advance(1)
    mc("set a 0 0 1", "a")
    assert mc("get a") == b"VALUE a 0 1\r\na\r\nEND\r\n"


def test_flush_all_arguments(mc):
    mc("set a 0 0 1", "a")
    assert mc("flush_all 2592001") == b"OK\r\n"  # absolute, in the past
    assert mc("get a") == b"VALUE a 0 1\r\na\r\nEND\r\n"
    assert mc("flush_all -5") == b"OK\r\n"  # like 0
    assert mc("get a") == b"END\r\n"
    assert mc("flush_all x") == b"CLIENT_ERROR invalid exptime argument\r\n"
    assert mc("flush_all x noreply") == b""
    assert mc("flush_all noreply") == b""
    assert mc("flush_all 0 noreply") == b""
    assert mc("flush_all 0 x") == b"OK\r\n"
    assert mc("flush_all 1 2 3") == ERROR


def test_verbosity(mc):
    assert mc("verbosity 1") == b"OK\r\n"
    assert mc("verbosity x") == BAD_FORMAT
    assert mc("verbosity 1 2") == b"OK\r\n"
    assert mc("verbosity 1 noreply") == b""
    assert mc("verbosity") == ERROR
    assert mc("verbosity 1 2 3") == ERROR


# -- expiry --------------------------------------------------------------


def test_relative_expiry(mc):
    mc("set k 0 10 1", "x")
    mc.clock.advance(9)
    assert mc("mg k t") == b"HD t1\r\n"
    mc.clock.advance(1)
    assert mc("get k") == b"END\r\n"
    stats = mc.stats()
    assert (stats["get_expired"], stats["curr_items"]) == (1, 0)


def test_expiry_counts_whole_seconds(mc):
    mc.clock.now = START + 0.999
    mc("set k 0 1 1", "x")
    mc.clock.now = START + 1.0
    assert mc("get k") == b"END\r\n"


def test_thirty_day_boundary(mc):
    mc("set rel 0 2592000 1", "x")
    assert mc("mg rel t") == b"HD t2592000\r\n"
    mc("set abs 0 2592001 1", "x")  # an absolute time in 1970
    assert mc("get abs") == b"END\r\n"


def test_absolute_expiry(mc):
    mc(f"set k 0 {START + 100} 1", "x")
    assert mc("mg k t") == b"HD t100\r\n"
    mc.clock.advance(99)
    assert mc("get k") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    mc.clock.advance(1)
    assert mc("get k") == b"END\r\n"
    mc(f"set k 0 {START - 1} 1", "x")
    assert mc("get k") == b"END\r\n"


def test_negative_and_zero_expiry(mc):
    mc("set k 0 -1 1", "x")
    assert mc("get k") == b"END\r\n"
    mc("set k 0 0 1", "x")
    mc.clock.advance(10 * 365 * 86400)
    assert mc("get k") == b"VALUE k 0 1\r\nx\r\nEND\r\n"


def test_exptime_is_truncated_to_int32(mc):
    mc("set k 0 4294967297 1", "x")  # reads as 1
    assert mc("mg k t") == b"HD t1\r\n"
    mc("set k 0 2147483648 1", "x")  # reads as -2**31: already expired
    assert mc("get k") == b"END\r\n"


# -- meta: mg --------------------------------------------------------------


def test_mg_hit_and_miss(mc):
    assert mc("mg k") == b"EN\r\n"
    assert mc("mg k v k O1") == b"EN kk O1\r\n"
    mc("set k 7 0 2", "hi")
    assert mc("mg k") == b"HD\r\n"
    assert mc("mg k v") == b"VA 2\r\nhi\r\n"
    assert mc("mg k s v f t c k Oabc") == b"VA 2 s2 f7 t-1 c1 kk Oabc\r\nhi\r\n"


def test_mg_quiet_only_hides_misses(mc):
    assert mc("mg k q k O1") == b""
    mc("set k 0 0 1", "x")
    assert mc("mg k q") == b"HD\r\n"
    assert mc("mg k q v") == b"VA 1\r\nx\r\n"


def test_mg_hit_flags_and_last_access(mc):
    mc("set k 0 0 1", "x")
    assert mc("mg k h l") == b"HD h0 l0\r\n"
    mc.clock.advance(5)
    assert mc("mg k h l") == b"HD h1 l5\r\n"  # second fetch refreshes
    mc.clock.advance(3)
    assert mc("mg k h l") == b"HD h1 l3\r\n"
    assert mc("mg k u h") == b"HD h1\r\n"


def test_mg_no_update(mc):
    mc("set k 0 0 1", "x")
    assert mc("mg k u") == b"HD\r\n"
    assert mc("mg k h") == b"HD h0\r\n"


def test_mg_ttl_flags_in_order(mc):
    mc("set k 0 100 1", "x")
    assert mc("mg k t T30") == b"HD t100\r\n"
    assert mc("mg k T40 t") == b"HD t40\r\n"
    stats = mc.stats()
    assert (stats["cmd_touch"], stats["touch_hits"], stats["cmd_get"]) == (2, 2, 0)
    assert mc("mg k T-1") == b"HD\r\n"
    assert mc("mg k") == b"EN\r\n"


def test_mg_vivify(mc):
    assert mc("mg k N30 t c v") == b"VA 0 t30 c1 W\r\n\r\n"
    assert mc("mg k N30 v") == b"VA 0 Z\r\n\r\n"
    assert mc("mg k s") == b"HD s0 Z\r\n"


def test_mg_recache(mc):
    mc("set k 0 100 1", "x")
    assert mc("mg k R30") == b"HD\r\n"
    assert mc("mg k R200") == b"HD W\r\n"
    assert mc("mg k R200") == b"HD Z\r\n"
    mc("set k 0 0 1", "x")
    assert mc("mg k R200") == b"HD\r\n"  # no TTL, no recache


def test_mg_flags_accepted_and_ignored(mc):
    mc("set k 0 0 1", "x")
    assert mc("mg k P L F5 C1 MS J1 D1 I") == b"HD\r\n"


@pytest.mark.parametrize("line, reply", [
    ("mg k v v", b"CLIENT_ERROR duplicate flag\r\n"),
    ("mg k Z", b"CLIENT_ERROR invalid flag\r\n"),
    ("mg k E5", b"CLIENT_ERROR invalid flag\r\n"),
    ("mg k x", b"CLIENT_ERROR invalid flag\r\n"),
    ("mg k T", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k Tx", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k N1x", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k R-", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k C-1", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k Fx", BAD_FORMAT),
    ("mg k Tx Fx", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k Fx Tx", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("mg k M", b"CLIENT_ERROR incorrect length for M token\r\n"),
    ("mg k MEE", b"CLIENT_ERROR incorrect length for M token\r\n"),
    ("mg k Jx", b"CLIENT_ERROR invalid numeric initial value\r\n"),
    ("mg k Dx", b"CLIENT_ERROR invalid numeric delta value\r\n"),
    ("mg k Jx Dx", b"CLIENT_ERROR invalid numeric delta value\r\n"),
    ("mg k Tx v v", b"CLIENT_ERROR duplicate flag\r\n"),
    ("mg k b", b"CLIENT_ERROR error decoding key\r\n"),
    ("mg k O" + "x" * 32, b"CLIENT_ERROR opaque token too long\r\n"),
    ("mg k q O" + "x" * 32, b"CLIENT_ERROR opaque token too long\r\n"),
    ("mg " + "k" * 251, BAD_FORMAT),
    ("mg", ERROR),
    ("mg k " + " ".join(["v"] * 17), b"CLIENT_ERROR duplicate flag\r\n"),
    ("mg k " + " ".join(["v"] * 18), b"CLIENT_ERROR options flags are too long\r\n"),
])
def test_mg_errors(mc, line, reply):
    assert mc(line) == reply


def test_mg_opaque_at_the_limit(mc):
    opaque = "O" + "x" * 31
    assert mc(f"mg k {opaque}") == f"EN {opaque}\r\n".encode()


# -- meta: base64 keys ----------------------------------------------------


def test_binary_keys(mc):
    assert mc("ms Zm9v 3 b", "bar") == b"HD\r\n"
    assert mc("get foo") == b"VALUE foo 0 3\r\nbar\r\nEND\r\n"
    assert mc("mg Zm9v b k v") == b"VA 3 kZm9v b\r\nbar\r\n"
    # the item remembers its key was binary
    assert mc("mg foo k") == b"HD kZm9v b\r\n"
    assert mc("me foo").startswith(b"ME Zm9v exp=-1 ")
    assert mc("mg YWJj b k") == b"EN kYWJj b\r\n"
    assert mc("md Zm9v b q") == b""
    assert mc("get foo") == b"END\r\n"


# -- meta: ms ----------------------------------------------------------------


def test_ms_basic_and_flags(mc):
    assert mc("ms k 2", "hi") == b"HD\r\n"
    assert mc("mg k v f t") == b"VA 2 f0 t-1\r\nhi\r\n"
    assert mc("ms k 2 F5 T100", "hi") == b"HD\r\n"
    assert mc("mg k v f t") == b"VA 2 f5 t100\r\nhi\r\n"
    assert mc("ms k 2 c k Oab", "hi") == b"HD c3 kk Oab\r\n"
    assert mc("ms k 2 Oab k c", "hi") == b"HD Oab kk c4\r\n"
    assert mc("ms k 2 q c", "hi") == b""
    assert mc("ms k 1 T-1", "x") == b"HD\r\n"
    assert mc("mg k") == b"EN\r\n"


def test_ms_modes(mc):
    assert mc("ms k 1 ME", "a") == b"HD\r\n"
    assert mc("ms k 1 ME c k O9", "b") == b"NS c0 kk O9\r\n"
    assert mc("ms k 1 ME q", "b") == b"NS\r\n"
    assert mc("ms k 1 MA", "c") == b"HD\r\n"
    assert mc("ms k 1 MP", "d") == b"HD\r\n"
    assert mc("ms k 1 MR", "e") == b"HD\r\n"
    assert mc("mg k v") == b"VA 1\r\ne\r\n"
    assert mc("ms z 1 MA", "a") == b"NS\r\n"
    assert mc("ms z 1 MP", "a") == b"NS\r\n"
    assert mc("ms z 1 MR", "a") == b"NS\r\n"
    assert mc("ms z 1 MS", "a") == b"HD\r\n"


def test_ms_cas(mc):
    assert mc("ms k 1 C1", "a") == b"NF\r\n"
    assert mc("ms k 1 c", "a") == b"HD c1\r\n"
    assert mc("ms k 1 C2 c", "b") == b"EX c0\r\n"
    assert mc("ms k 1 C0", "b") == b"EX\r\n"
    assert mc("ms k 1 C1 MR c", "c") == b"HD c2\r\n"
    assert mc("ms k 1 C9 ME", "d") == b"NS\r\n"
    assert mc("ms n 1 C9 ME c", "d") == b"HD c3\r\n"
    assert mc("ms nope 1 C5 MR", "x") == b"NF\r\n"
    assert mc("ms nope 1 C5 MA", "x") == b"NS\r\n"


def test_ms_invalidate_and_stale(mc):
    mc("set k 0 0 1", "a")
    assert mc("md k I T30") == b"HD\r\n"  # stale, new cas 2, TTL 30
    assert mc("mg k v c t") == b"VA 1 c2 t30 X W\r\na\r\n"
    assert mc("mg k c") == b"HD c2 Z X\r\n"
    # a lower cas may still replace a stale item, which stays stale
    assert mc("ms k 1 I C1", "b") == b"HD\r\n"
    assert mc("mg k v c t") == b"VA 1 c3 t30 Z X\r\nb\r\n"
    assert mc("ms k 1 I C99", "c") == b"EX\r\n"
    assert mc("ms k 1 C3", "d") == b"HD\r\n"
    assert mc("mg k v c") == b"VA 1 c4\r\nd\r\n"


@pytest.mark.parametrize("line, reply", [
    ("ms k 1 MX", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    ("ms k 1 M", b"CLIENT_ERROR incorrect length for M token\r\n"),
    ("ms k 1 S1", b"CLIENT_ERROR invalid flag\r\n"),
    ("ms k 1 v v", b"CLIENT_ERROR duplicate flag\r\n"),
    ("ms k 1 Fx", BAD_FORMAT),
    ("ms k 1 F-1", BAD_FORMAT),
    ("ms k 1 T1x Fx", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("ms k 1 Cx", b"CLIENT_ERROR bad token in command line format\r\n"),
    ("ms k 1 b", b"CLIENT_ERROR error decoding key\r\n"),
    ("ms k 1 O" + "x" * 32, b"CLIENT_ERROR opaque token too long\r\n"),
    ("ms k 1 O" + "x" * 32 + " MX",
     b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    ("ms k 1 q Tx", b"CLIENT_ERROR bad token in command line format\r\n"),
    # memcached would read these payloads as commands (see module doc)
    ("ms k x", BAD_FORMAT),
    ("ms " + "k" * 251 + " 1", BAD_FORMAT),
    ("ms k 1 " + " ".join(f"O{i}" for i in range(17)),
     b"CLIENT_ERROR options flags too long\r\n"),
])
def test_ms_errors(mc, line, reply):
    assert mc(line, "x") == reply
    assert mc("mg k") == b"EN\r\n"


def test_ms_without_length_or_key():
    mc = Harness()
    req = Request(2, b"ms k\r\n", [b"ms", b"k"], b"k")
    assert mc.store.execute(req) == BAD_FORMAT
    req = Request(2, b"ms\r\n", [b"ms"], b"")
    assert mc.store.execute(req) == ERROR


def test_ms_flags_are_32_bit(mc):
    mc("ms k 1 F4294967297", "x")
    assert mc("mg k f") == b"HD f1\r\n"


# -- meta: md ----------------------------------------------------------------


def test_md(mc):
    assert mc("md k") == b"NF\r\n"
    assert mc("md k q") == b"NF\r\n"  # q hides only HD
    assert mc("md k k O1") == b"NF kk O1\r\n"
    mc("set k 0 0 1", "a")
    assert mc("md k q") == b""
    mc("set k 0 0 1", "a")
    assert mc("md k C999") == b"EX\r\n"
    assert mc("md k C2 k Ox") == b"HD kk Ox\r\n"
    assert mc("mg k") == b"EN\r\n"
    stats = mc.stats()
    assert (stats["delete_hits"], stats["delete_misses"]) == (2, 4)


def test_md_ttl_only_with_invalidate(mc):
    mc("set k 0 0 1", "a")
    assert mc("md k T30") == b"HD\r\n"
    assert mc("mg k") == b"EN\r\n"
    mc("set k 0 0 1", "a")
    assert mc("md k I") == b"HD\r\n"
    assert mc("mg k t") == b"HD t-1 X W\r\n"


@pytest.mark.parametrize("line, reply", [
    ("md k x", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("md k v v", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("md k Tx", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("md k b", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("md k O" + "x" * 32, b"CLIENT_ERROR opaque token too long\r\n"),
    ("md " + "k" * 251, BAD_FORMAT),
    ("md k " + " ".join(f"O{i}" for i in range(18)),
     b"CLIENT_ERROR options flags too long\r\n"),
])
def test_md_errors(mc, line, reply):
    mc("set k 0 0 1", "a")
    assert mc(line) == reply
    assert mc("mg k") == b"HD\r\n"


# -- meta: ma ----------------------------------------------------------------


def test_ma(mc):
    assert mc("ma n") == b"NF\r\n"
    assert mc("ma n q k O1") == b"NF kn O1\r\n"
    assert mc("ma n N0 J5 v") == b"VA 1\r\n5\r\n"
    assert mc("ma n v") == b"VA 1\r\n6\r\n"
    assert mc("ma n q v") == b""
    assert mc("ma n") == b"HD\r\n"
    assert mc("ma n v c t k O1 MD D3") == b"VA 1 c5 t-1 kn O1\r\n5\r\n"
    assert mc("ma n MD D100 v") == b"VA 1\r\n0\r\n"
    assert mc("ma n M+ D10 v") == b"VA 2\r\n10\r\n"
    assert mc("ma n M- v") == b"VA 1\r\n9\r\n"
    assert mc("ma n MI v") == b"VA 2\r\n10\r\n"
    assert mc("mg n v") == b"VA 2\r\n10\r\n"


def test_ma_cas_and_ttl(mc):
    mc("set n 0 0 2", "10")
    assert mc("ma n C9 v") == b"EX\r\n"
    assert mc("ma n C1 c") == b"HD c2\r\n"
    assert mc("ma n C0 v") == b"VA 2\r\n12\r\n"  # C0: no check
    assert mc("ma n T30 t") == b"HD t30\r\n"
    assert mc("ma n t T60 t") == b"CLIENT_ERROR invalid or duplicate flag\r\n"
    assert mc("ma n t T60") == b"HD t30\r\n"
    assert mc("mg n t") == b"HD t60\r\n"
    # a result that outgrows the item makes a new item: T is then lost
    mc("set n 0 0 1", "9")
    assert mc("ma n T30 t v") == b"VA 2 t30\r\n10\r\n"
    assert mc("mg n t") == b"HD t-1\r\n"


def test_ma_vivify(mc):
    assert mc("ma m N30 J99 T60 t v c") == b"VA 2 t60 c1\r\n99\r\n"
    assert mc("ma m2 N0 t v") == b"VA 1 t-1\r\n0\r\n"
    assert mc("ma m3 N-1 q") == b"HD\r\n"  # vivified replies are not quiet
    assert mc("mg m3") == b"EN\r\n"
    assert mc("ma m4 J7 v") == b"NF\r\n"
    stats = mc.stats()
    assert (stats["incr_hits"], stats["incr_misses"]) == (0, 1)


@pytest.mark.parametrize("line, reply", [
    ("ma n MX", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    ("ma n O" + "x" * 32 + " MX", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    ("ma n MIX", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("ma n D-1", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("ma n J-1", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("ma n Dx", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("ma n x", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    ("ma " + "n" * 251, BAD_FORMAT),
    ("ma", ERROR),
    ("ma s", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("ma s q", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("ma e", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
])
def test_ma_errors(mc, line, reply):
    mc("set n 0 0 1", "1")
    mc("set s 0 0 1", "a")
    mc("set e 0 0 0", "")
    assert mc(line) == reply
    assert mc("mg n v") == b"VA 1\r\n1\r\n"


def test_ma_opaque_error_comes_after_the_change(mc):
    mc("set n 0 0 1", "1")
    assert mc("ma n O" + "x" * 32) == b"CLIENT_ERROR opaque token too long\r\n"
    assert mc("mg n v") == b"VA 1\r\n2\r\n"


def test_ma_delta_wraps(mc):
    mc("set n 0 0 2", "11")
    assert mc("ma n D18446744073709551615 v") == b"VA 2\r\n10\r\n"


# -- meta: mn / me -----------------------------------------------------------


def test_mn(mc):
    assert mc("mn") == b"MN\r\n"
    assert mc("mn extra") == b"MN\r\n"


def test_me(mc):
    assert mc("me k") == b"EN\r\n"
    assert mc("me") == BAD_FORMAT
    assert mc("me " + "k" * 251) == BAD_FORMAT
    assert mc("me k b") == BAD_FORMAT  # not base64
    mc("set kk 0 100 1", "x")
    assert mc("me kk") == b"ME kk exp=-100 la=0 cas=1 fetch=no cls=1 size=62\r\n"
    mc.clock.advance(7)
    mc("get kk")
    assert mc("me kk") == b"ME kk exp=-93 la=7 cas=1 fetch=yes cls=1 size=62\r\n"
    mc("set kk 1 0 1000", "x" * 1000)
    assert mc("me kk") == b"ME kk exp=-1 la=0 cas=2 fetch=no cls=12 size=1065\r\n"
    mc("set kk 0 0 600000", "x" * 600000)
    assert mc("me kk").endswith(b" cls=39 size=600061\r\n")
    assert mc.stats()["cmd_meta"] == 5  # errors do not count


# -- sizes and memory -----------------------------------------------------------


BIG = 2**20 - item_size(3, 0, 2)  # largest value for a 3-byte key


def test_largest_value_fits_exactly(mc):
    assert mc(f"set big 0 0 {BIG}", b"v" * BIG) == b"STORED\r\n"
    assert mc("mg big s") == b"HD s%d\r\n" % BIG
    assert mc(f"set big 0 0 {BIG + 1}", b"v" * (BIG + 1)) == (
        b"SERVER_ERROR object too large for cache\r\n")
    # a failed set removes the old value; other modes leave it
    assert mc("mg big") == b"EN\r\n"
    mc(f"set big 1 0 {BIG - 4}", b"v" * (BIG - 4))  # flags take 4 bytes
    assert mc(f"add big 0 0 {BIG + 1}", b"v" * (BIG + 1)).startswith(b"SERVER_ERROR")
    assert mc(f"replace big 0 0 {BIG + 1} noreply", b"v" * (BIG + 1)) == b""
    assert mc("mg big s") == b"HD s%d\r\n" % (BIG - 4)
    assert mc("append big 0 0 1", "a") == b"NOT_STORED\r\n"
    assert mc("ms big 1 MA", "a") == b"NS\r\n"
    assert mc(f"ms big {BIG + 1} MR", b"v" * (BIG + 1)).startswith(b"SERVER_ERROR")
    assert mc("mg big") == b"EN\r\n"
    assert mc.stats()["store_too_large"] == 4


def test_big_values_are_not_numbers(mc):
    value = b"1" + b" " * 600000
    mc(f"set n 0 0 {len(value)}", value)
    assert mc("incr n 1").startswith(b"CLIENT_ERROR cannot increment")


def test_item_size_max_is_configurable():
    mc = Harness(item_size_max=1000)
    size = 1000 - item_size(1, 0, 2)
    assert mc(f"set k 0 0 {size}", b"x" * size) == b"STORED\r\n"
    assert mc(f"set k 0 0 {size + 1}", b"x" * (size + 1)).startswith(b"SERVER_ERROR")


def test_item_bigger_than_memory(mc):
    mc = Harness(memory_limit=500)
    assert mc("set k 0 0 1000", b"x" * 1000) == (
        b"SERVER_ERROR out of memory storing object\r\n")
    assert mc("set k 0 0 1000 noreply", b"x" * 1000) == b""
    assert mc("mg k N0") == b"HD W\r\n"
    assert mc.stats()["store_no_memory"] == 2


def test_lru_evicts_least_recently_used():
    size = item_size(2, 0, 102)
    mc = Harness(memory_limit=3 * size)
    for key in ("k1", "k2", "k3"):
        mc(f"set {key} 0 0 100", b"x" * 100)
    mc("get k1")  # k2 is now the least recently used
    mc("set k4 0 0 100", b"x" * 100)
    assert mc("mg k2") == b"EN\r\n"
    assert [mc(f"mg {k}") for k in ("k1", "k3", "k4")] == [b"HD\r\n"] * 3
    stats = mc.stats()
    assert (stats["evictions"], stats["evicted_unfetched"]) == (1, 1)
    assert stats["bytes"] == 3 * size


def test_memory_stays_under_limit_when_filling_past_it():
    limit = 100_000
    mc = Harness(memory_limit=limit)
    for i in range(2000):
        mc(f"set key{i} 0 0 {i % 300}", b"v" * (i % 300))
        assert mc.stats()["bytes"] <= limit
    stats = mc.stats()
    assert stats["evictions"] > 0
    assert stats["curr_items"] == len(mc.store)
    assert stats["total_items"] == 2000
    # the newest items survived
    assert mc("mg key1999 s") == b"HD s%d\r\n" % (1999 % 300)


def test_expired_items_are_reclaimed_first_in_lru_order():
    size = item_size(2, 0, 12)
    mc = Harness(memory_limit=2 * size)
    mc("set k1 0 5 10", b"x" * 10)
    mc("set k2 0 0 10", b"x" * 10)
    mc.clock.advance(5)
    mc("set k3 0 0 10", b"x" * 10)
    stats = mc.stats()
    assert (stats["reclaimed"], stats["expired_unfetched"], stats["evictions"]) == (1, 1, 0)
    assert mc("mg k2") == b"HD\r\n"


def test_stats_shape(mc):
    mc("set k 0 0 1", "x")
    stats = mc.stats()
    assert list(stats) == list(STAT_NAMES)
    assert stats["limit_maxbytes"] == 64 * 2**20
    assert (stats["curr_items"], stats["total_items"]) == (1, 1)
    assert stats["bytes"] == item_size(1, 0, 3)
    assert stats["cmd_set"] == 1


# -- the interface ---------------------------------------------------------------


def test_unserved_command_raises(mc):
    with pytest.raises(ValueError):
        mc.store.execute(Request(CMD_STATS, b"stats\r\n", [b"stats"], b""))


#: What the client protocol answers itself, before the cache.
PROTOCOL_LOCAL = {b"quit", b"stats", b"watch", b"version"}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - PROTOCOL_LOCAL))
def test_every_other_command_is_served(mc, name):
    """Whatever the parser lets through to the cache gets a reply (the
    client protocol calls execute for every command it does not answer)."""
    assert isinstance(mc(name + b" k 0"), bytes)


def test_line_with_nul_stops_there(mc):
    mc("set k 0 0 1", "x")
    assert mc(b"get k\0junk") == b"VALUE k 0 1\r\nx\r\nEND\r\n"


def test_bare_newline_line(mc):
    mc("set k 0 0 1", "x")
    req = Request(7, b"get k\n", [b"get", b"k"], b"k")
    assert mc.store.execute(req) == b"VALUE k 0 1\r\nx\r\nEND\r\n"
