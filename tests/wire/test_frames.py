"""The compiled framing loops (mcproxy/wire/_frames.pyx) against the
pure-Python code they stand in for: on any bytes, each reply loop takes
exactly the replies that code takes as plain, and stops where that code
would judge (refuse, raise, wait for more) or where an error line is, which
the Python loop after it answers; the request scan gives Python's result.
The rest of the suite runs with them (and, through the ``framing`` fixture,
the wire tests also without them)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mcproxy.wire import reader, request
from mcproxy.wire.reader import _ANY, _PLAIN_ANSWERS, _multi_end, _plain_end
from mcproxy.wire.response import VALUE_LINE, BackendProtocolError

frames = pytest.importorskip("mcproxy.wire._frames",
                             reason="mcproxy.wire._frames is not built (no C compiler)")

#: mostly two short keys, so that many replies are the ones asked for
KEYS = [b"a", b"b"] * 4 + [b"ab", b"key:1", b"k" * 249, b"k" * 250, b"k" * 251, b"\x80\x00z"]

#: the keys of a multiget: those of the replies, and keys one byte off
NEAR_KEYS = [b"a", b"b"] * 4 + [b"ab", b"a\x00", b"", b"k" * 249, b"k" * 250]


@st.composite
def items(draw) -> tuple[bytes, bytes, bool]:
    """A reply a get or set may get, well formed or nearly, with the key of
    the request it answers and whether that is a set (mostly as it fits)."""
    key = draw(st.sampled_from(KEYS))
    kind = draw(st.integers(0, 9))
    if kind == 0:
        reply = draw(st.sampled_from([b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n",
                                      b"NOT_FOUND\r\n", b"ERROR\r\n", b"SERVER_ERROR x\r\n",
                                      b"HD\r\n", b"END\r\n", b"END\n"]))
        return reply, key, reply[-8:] != b"END\r\n" and draw(st.integers(0, 4)) > 0
    value = draw(st.binary(max_size=12) | st.sampled_from([b"x\r\nEND\r\n", b"0123456789ab"]))
    flags = draw(st.sampled_from([b"0"] * 6 + [b"1" * 20, b"1" * 21, b"", b"-1", b"9"]))
    size = str(len(value) + draw(st.sampled_from([0] * 8 + [1, -1]))).encode()
    # 9 digits at most: zeros up to 9, and to 10
    size = draw(st.sampled_from([size] * 5 + [b"0" * (9 - len(size)) + size,
                                              b"0" * (10 - len(size)) + size, b"1" * 10]))
    cas = draw(st.sampled_from([b""] * 4 + [b" 7", b" " + b"2" * 20, b" " + b"2" * 21, b" "]))
    line = b"VALUE " + key + b" " + flags + b" " + size + cas + b"\r\n"
    end = b"END\r\n" if kind < 8 else b""
    if draw(st.integers(0, 3)) == 0:  # maybe another request's, maybe nearly this one
        key = draw(st.sampled_from([*KEYS, key + b"b", key[:-1] or b"z", key[1:] or b"z"]))
    return line + value + b"\r\n" + end, key, draw(st.integers(0, 9)) == 0


def spoilt(draw, data: bytes) -> bytes:
    """``data``, maybe with one byte changed, maybe cut short."""
    if data and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    if data and draw(st.integers(0, 3)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@st.composite
def multi(draw) -> tuple[bytes, bytes, None]:
    """The reply to a multi-key get and its keys joined by spaces (mostly
    those of its values, in their order, with misses between)."""
    plain = st.tuples(st.sampled_from([b"a", b"b", b"ab"]), st.binary(max_size=4)).map(
        lambda kv: (b"VALUE %s 0 %d\r\n%s\r\n" % (kv[0], len(kv[1]), kv[1]), kv[0], False))
    values = draw(st.lists(plain | items().filter(lambda got: got[0].startswith(b"VALUE ")),
                           max_size=3))
    reply = b"".join(got[0][:-5] if got[0].endswith(b"END\r\n") else got[0]
                     for got in values) + draw(st.sampled_from([b"END\r\n"] * 5 + [b"ERROR\r\n"]))
    keys = []
    for _, key, _ in values:
        keys += draw(st.lists(st.sampled_from([b"a", b"b", b"ab", b"k" * 249]), max_size=1))
        if draw(st.integers(0, 4)):
            keys.append(key)
    keys = draw(st.permutations(keys)) if draw(st.integers(0, 5)) == 0 else keys
    return reply, b" ".join(keys + draw(st.lists(st.just(b"zz"), max_size=1))) or b"zz", None


@st.composite
def runs(draw) -> tuple[bytes, list[bytes], frozenset[int] | None, dict[int, int] | None]:
    """The replies to a run of plain requests: the bytes, each request's
    key (a multi-key get's joined), the indexes of the sets and the key
    counts of the multi-key gets."""
    got = draw(st.lists(items() | multi(), max_size=6))
    keys = [key for _, key, _ in got] + [b"a"] * 6
    sets = frozenset(i for i, (_, _, is_set) in enumerate(got) if is_set)
    widths = {i: key.count(b" ") + 1 for i, (_, key, is_set) in enumerate(got)
              if is_set is None}
    return (spoilt(draw, b"".join(reply for reply, _, _ in got)), keys, sets or None,
            widths or None)


@st.composite
def streams(draw) -> bytes:
    return spoilt(draw, b"".join(reply for reply, _, _ in draw(st.lists(items(), max_size=6))))


def reference_run(buf, pos, keys, first, count, sets, widths):
    """read_raw's plain framing in Python, stopping where the compiled loop
    must: at a reply _plain_end or _multi_end refuses or raises for, or an
    error line."""
    framed = 0
    while framed < count and pos < len(buf):
        index = first + framed
        multi = widths is not None and index in widths
        if not multi and _PLAIN_ANSWERS.get(buf[pos:buf.find(b"\n", pos) + 1]) is _ANY:
            break
        try:
            if multi:
                end = _multi_end(buf, pos, keys[index].split(b" "))
            else:
                end = _plain_end(buf, pos, keys[index], sets is not None and index in sets)
        except BackendProtocolError:
            break
        if not end:
            break
        pos = end
        framed += 1
    return pos, framed


def reference_aligned(buf, pos, keys, parts):
    """read_aligned's regex loop, stopping where it would read or raise."""
    index = len(parts)
    while (line := VALUE_LINE.match(buf, pos)) is not None:
        vend = line.end() + int(line[2]) + 2
        if not buf.startswith(b"\r\n", vend - 2) or line[1] not in keys[index:]:
            break
        found = keys.index(line[1], index)
        parts += [None] * (found - index)
        parts.append(buf[pos:vend])
        index = found + 1
        pos = vend
    return pos


@settings(max_examples=600, deadline=None)
@given(runs(), st.integers(1, 6), st.integers(0, 3))
@example((b"VALUE a 0 1\r\nx\r\nEND\r\nSTORED\r\n", [b"a", b"b"], frozenset([1]), None),
         2, 0)
@example((b"VALUE ab 0 1\r\nx\r\nEND\r\n", [b"a"], None, None), 1, 0)  # a key's prefix
@example((b"VALUE b 0 1\r\nx\r\nEND\r\nEND\r\n", [b"a b", b"c"], None, {0: 2}), 2, 0)
@example((b"VALUE a 0 1\r\nx\r\nEND\r\n", [b"ab a"], None, {0: 2}), 1, 0)
@example((b"VALUE b 0 1\r\nx\r\nVALUE a 0 0\r\n\r\nEND\r\n", [b"a b"], None, {0: 2}),
         1, 0)  # out of order
@example((b"VALUE a 0 1\r\nx\r\nEND\r\n", [b"ab b"], None, {0: 2}), 1, 0)  # not asked for
@example((b"VALUE a 0 1\r\nx\r\nVALUE a 0 1\r\nx\r\nEND\r\n", [b"a b"], None, {0: 2}),
         1, 0)  # twice
def test_plain_run_takes_what_plain_end_and_multi_end_take(run, count, pos):
    data, keys, sets, widths = run
    pos = min(pos, len(data))
    end, framed = reference_run(data, pos, keys, 0, count, sets, widths)
    assert frames.plain_run(data, pos, keys, 0, count, sets, widths) == (end, framed)
    each = [b"before"]
    assert frames.plain_run(data, pos, keys, 0, count, sets, widths, each) == (end, framed)
    assert len(each) == 1 + framed and b"".join(each[1:]) == data[pos:end]
    assert all(reference_run(reply, 0, keys[i:], 0, 1, None if sets is None else frozenset(
        j - i for j in sets), None if widths is None else {j - i: w for j, w in widths.items()})
        == (len(reply), 1) for i, reply in enumerate(each[1:]))


@settings(max_examples=600, deadline=None)
@given(streams(), st.lists(st.sampled_from(NEAR_KEYS), max_size=6), st.integers(0, 2))
@example(b"VALUE b 0 1\r\nx\r\nEND\r\n", [b"a", b"b"], 0)
def test_aligned_values_take_what_read_aligned_s_loop_takes(data, keys, held):
    held = min(held, len(keys))
    parts, expected = [b"held"] * held, [b"held"] * held
    assert frames.aligned_values(data, 0, keys, parts) \
        == reference_aligned(data, 0, keys, expected)
    assert parts == expected


def test_anything_but_bytes_is_left_to_python():
    for buf in (bytearray(b"END\r\n"), memoryview(b"END\r\n")):
        assert frames.plain_run(buf, 0, [b"a"], 0, 1, None, None) == (0, 0)
        assert frames.aligned_values(buf, 0, [], []) == 0


def test_the_wire_layer_uses_them():
    """Built, they are what ResponseReader and scan_plain call (else the
    fallback runs)."""
    assert request.scan_compiled is frames.scan_plain
    assert reader.plain_run is frames.plain_run
    assert reader.aligned_values is frames.aligned_values


#: keys of requests: plain, the longest, too long, and bytes the fast paths refuse
REQUEST_KEYS = [b"a", b"b", b"key:1", b"k" * 250, b"k" * 251, b"a\x00", b"a\rb", b"", b"\x80"]


@st.composite
def request_lines(draw) -> bytes:
    """A request a client may send: mostly plain, else nearly."""
    if draw(st.integers(0, 2)):
        key = draw(st.sampled_from([b"a", b"b", b"key:1", b"k" * 250]))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            return b"get " + key + b"\r\n"
        if kind == 1:
            return b"get " + b" ".join([key] * draw(st.integers(2, 5))) + b"\r\n"
        value = draw(st.binary(max_size=6))
        return b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return b"get " + draw(st.sampled_from(REQUEST_KEYS)) + draw(
            st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b" \r\n", b""]))
    if kind == 2:
        keys = draw(st.lists(st.sampled_from(REQUEST_KEYS[:5]), min_size=2, max_size=5))
        return b"get " + draw(st.sampled_from([b" ", b" ", b"  "])).join(keys) + draw(
            st.sampled_from([b"\r\n"] * 4 + [b" \r\n", b"\n"]))
    if kind <= 4:
        value = draw(st.binary(max_size=6))
        size = len(value) + draw(st.sampled_from([0] * 6 + [1, -1]))
        numbers = [draw(st.sampled_from([b"0"] * 4 + [b"9" * 19, b"9" * 20, b"-1", b""])),
                   draw(st.sampled_from([b"0"] * 4 + [b"9" * 18, b"9" * 19, b"-1"])),
                   draw(st.sampled_from([str(size).encode()] * 6 + [b"0" * 9 + b"1",
                                                                   b"0" * 8 + b"1"]))]
        return (b"set " + draw(st.sampled_from(REQUEST_KEYS)) + b" " + b" ".join(numbers)
                + b"\r\n" + value + draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"xx"])))
    return draw(st.sampled_from([b"gets a\r\n", b"delete a\r\n", b"get\r\n", b"set a\r\n",
                                 b"GET a\r\n", b"\r\n"]))


@st.composite
def request_streams(draw) -> bytes:
    return spoilt(draw, b"".join(draw(st.lists(request_lines(), max_size=8))))


def python_scan(*args):
    """request.scan_plain without its compiled twin."""
    compiled = request.scan_compiled
    request.scan_compiled = None
    try:
        return request.scan_plain(*args)
    finally:
        request.scan_compiled = compiled


@settings(max_examples=1500, deadline=None)
@given(request_streams(), st.integers(0, 3), st.booleans(), st.integers(0, 8),
       st.integers(1, 9), st.integers(0, 4))
@example(b"get a\r\nget b c\r\nset k 0 0 1\r\nx\r\n", 0, True, 8, 9, 2)
def test_scan_plain_is_python_s(data, pos, sets, max_payload, limit, multigets):
    pos = min(pos, len(data))
    args = (data, pos, sets, max_payload, limit, multigets)
    assert frames.scan_plain(*args) == python_scan(*args)
    assert request.scan_plain(*args) == python_scan(*args)
