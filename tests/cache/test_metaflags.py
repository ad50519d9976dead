"""Unit tests for reading meta flags (preparse) and base64 keys, alone.

test_store.py checks the replies these errors become; here the order of
errors and what each flag sets are checked on the flags themselves.
"""

from __future__ import annotations

import pytest

from mcproxy.cache import replies
from mcproxy.cache.metaflags import MetaFlags, b64decode_key, key_token, preparse


def read(line: bytes, start: int = 2) -> tuple[MetaFlags, bytes | None]:
    tokens = line.split()
    of = MetaFlags(tokens[1])
    return of, preparse(tokens, start, of, lambda exptime: exptime + 1000)


def test_b64decode_key_follows_memcached():
    assert b64decode_key(b"Zm9v") == b"foo"
    assert b64decode_key(b"Zm8=") == b"fo"
    assert b64decode_key(b"Zg==") == b"f"
    assert b64decode_key(b"Z!m9v") == b"foo"  # junk is skipped
    assert b64decode_key(b"YQ==YQ==") == b"a"  # stops after padding
    for bad in (b"Zm9", b"Z===", b"====", b"", b"!!!!"):
        assert b64decode_key(bad) is None


def test_key_token_encodes_binary_keys():
    assert key_token(b"foo", False) == b" kfoo"
    assert key_token(b"\x00\xff", True) == b" kAP8= b"


def test_no_flags_reads_the_defaults():
    of, error = read(b"mg key")
    assert error is None
    assert (of.key, of.quiet, of.value, of.locked, of.mode, of.delta) == (
        b"key", False, False, False, None, 1)


def test_each_flag_sets_what_it_changes():
    of, error = read(b"mg a v q u I T10 N20 R30 F7 C99 MA J5 D3")
    assert error is None
    assert (of.value, of.quiet, of.no_update, of.set_stale) == (True,) * 4
    assert (of.locked, of.vivify, of.new_ttl, of.has_cas) == (True,) * 4
    assert (of.exptime, of.autoviv_exptime, of.recache_time) == (1010, 1020, 1030)
    assert (of.client_flags, of.req_cas, of.mode, of.initial, of.delta) == (7, 99, 65, 5, 3)


@pytest.mark.parametrize("flag", [b"l", b"h"])
def test_reading_access_fields_locks_the_item(flag):
    assert read(b"mg a " + flag)[0].locked


def test_b_decodes_the_key():
    of, error = read(b"mg Zm9v b")
    assert (error, of.key, of.binary) == (None, b"foo", True)
    of, error = read(b"mg !!! b")
    assert (error, of.key, of.binary) == (replies.KEY_DECODE_ERROR, b"!!!", True)


def test_flags_only_echoed_are_accepted():
    assert read(b"mg a O123 P L k s t c f")[1] is None


@pytest.mark.parametrize(("line", "error"), [
    (b"mg a v v", replies.DUPLICATE_FLAG),
    (b"mg a \x7f", replies.DUPLICATE_FLAG),           # not a flag byte at all
    (b"mg a Z", replies.INVALID_FLAG),
    (b"mg a Tx", replies.BAD_TOKEN),
    (b"mg a Cx", replies.BAD_TOKEN),
    (b"mg a MAB", replies.BAD_M_TOKEN),
    (b"mg a Jx", replies.INVALID_INITIAL),
    (b"mg a Dx", replies.INVALID_DELTA),
    (b"mg a Fx", replies.BAD_FORMAT),
])
def test_each_error(line, error):
    assert read(line)[1] == error


def test_an_unknown_or_repeated_flag_stops_at_once():
    # Z comes before the second v: the invalid flag wins, and the bad T
    # value read before it is not reported.
    assert read(b"mg a Tx Z v v")[1] == replies.INVALID_FLAG
    assert read(b"mg a Tx v v Z")[1] == replies.DUPLICATE_FLAG


def test_a_bad_value_is_reported_after_all_flags_the_last_one_winning():
    assert read(b"mg a Tx Jx")[1] == replies.INVALID_INITIAL
    assert read(b"mg a Jx Tx")[1] == replies.BAD_TOKEN


def test_a_bad_f_value_loses_to_any_other_bad_value():
    assert read(b"mg a Fx Tx")[1] == replies.BAD_TOKEN
    assert read(b"mg a Tx Fx")[1] == replies.BAD_TOKEN
    assert read(b"mg a F1 Fx")[1] == replies.DUPLICATE_FLAG


def test_flags_are_read_from_start():
    of, error = read(b"ms a 5 T1", start=3)
    assert (error, of.exptime) == (None, 1001)
