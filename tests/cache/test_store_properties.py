"""Property tests for the embedded cache, with the fuzz target's check.

Hypothesis generates client streams of cache commands on a few keys (with
noreply, quiet flags, expiry times and bad values mixed in), and
:func:`fuzz.checks.check_cache_stream` runs them on a small cache: no
request raises, noreply and quiet only silence replies, every reply to
one key is one whole reply as ``mcp.internal`` reads it, and memory stays
within its limit. The atheris target ``cache`` in ``fuzz/`` runs the
same check on arbitrary bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz.checks import cache_requests, check_cache_stream
from mcproxy.cache import text
from mcproxy.cache.items import Items

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_keys = st.sampled_from([b"a", b"b", b"n", b"Zm9v", b"k" * 250])
_numbers = st.sampled_from([b"0", b"1", b"2", b"10", b"-1", b"99", b"4294967296",
                            b"18446744073709551615", b"x", b"2592001"])
_meta_flags = st.lists(st.sampled_from(
    [b"v", b"t", b"c", b"f", b"s", b"k", b"h", b"l", b"q", b"u", b"b", b"I", b"O1",
     b"T1", b"T-1", b"N5", b"R30", b"C1", b"F3", b"MA", b"ME", b"MP", b"MR", b"MS",
     b"M+", b"MD", b"J7", b"D3", b"Tx", b"Z"]), max_size=5)
_noreply = st.sampled_from([b"", b"", b" noreply"])


@st.composite
def cache_line(draw) -> bytes:
    """One request of the cache (with its payload, right or wrong)."""
    kind = draw(st.integers(0, 9))
    key = draw(_keys)
    if kind <= 2:
        command = draw(st.sampled_from([b"set", b"add", b"replace", b"append",
                                        b"prepend", b"cas"]))
        value = draw(st.sampled_from([b"", b"1", b"10", b"abc", b"x" * 200, b"x" * 900]))
        numbers = [draw(_numbers), draw(_numbers), b"%d" % len(value)]
        if command == b"cas":
            numbers.append(draw(_numbers))
        end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"xx"]))
        return (b" ".join([command, key, *numbers]) + draw(_noreply) + b"\r\n"
                + value + end)
    if kind == 3:
        command = draw(st.sampled_from([b"get", b"gets", b"gat 1", b"gats -1"]))
        keys = draw(st.lists(_keys, min_size=1, max_size=3))
        return b" ".join([command, *keys]) + b"\r\n"
    if kind == 4:
        command = draw(st.sampled_from([b"incr", b"decr", b"touch"]))
        return b" ".join([command, key, draw(_numbers)]) + draw(_noreply) + b"\r\n"
    if kind == 5:
        return b"delete " + key + draw(st.sampled_from([b"", b" 0", b" 1"])) \
            + draw(_noreply) + b"\r\n"
    if kind == 6:
        command = draw(st.sampled_from([b"mg", b"md", b"ma", b"me"]))
        return b" ".join([command, key, *draw(_meta_flags)]) + b"\r\n"
    if kind == 7:
        value = draw(st.sampled_from([b"", b"12", b"x" * 300]))
        size = draw(st.sampled_from([b"%d" % len(value), b"x"]))
        return (b" ".join([b"ms", key, size, *draw(_meta_flags)]) + b"\r\n" + value
                + b"\r\n")
    if kind == 8:
        return draw(st.sampled_from([b"flush_all", b"flush_all 0", b"flush_all 2",
                                     b"verbosity 1", b"mn", b"cache_memlimit 8"])) \
            + draw(_noreply) + b"\r\n"
    return draw(st.binary(max_size=12)) + b"\r\n"


cache_streams = st.lists(cache_line(), max_size=40).map(b"".join)


@PROPERTY
@given(cache_streams, st.integers(0, 255))
@example(b"me a q b\r\n", 0)  # me has no quiet mode: its q stays on the wire
def test_cache_streams_keep_the_cache_consistent(stream, seed):
    check_cache_stream(stream, seed)


def test_requests_are_framed_as_the_client_protocol_frames_them():
    stream = (b"set a 0 0 2\r\nhi\r\nset a x 0 2\r\nno\r\nstats\r\n"
              b"get a b\r\nms a 2 T1\r\nhi\r\nbogus\r\n")
    framed = [(req.line, req.value) for req in cache_requests(stream)]
    assert framed == [(b"set a 0 0 2\r\n", b"hi\r\n"), (b"get a b\r\n", None),
                      (b"ms a 2 T1\r\n", b"hi\r\n")]


def test_the_check_sees_a_reply_that_is_not_one_whole_reply(monkeypatch):
    """A get answered with two END lines would break mcp.internal."""
    monkeypatch.setattr(text, "END", b"END\r\nEND\r\n")
    with pytest.raises(AssertionError):
        check_cache_stream(b"get a\r\n", 0)


def test_the_check_sees_memory_that_is_not_given_back(monkeypatch):
    monkeypatch.setattr(Items, "unlink", lambda self, key, it: self._table.pop(key))
    with pytest.raises(AssertionError):
        check_cache_stream(b"set a 0 0 1\r\nx\r\ndelete a\r\n", 0)
