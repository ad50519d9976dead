"""Property tests for the request parser, the reply parser and client framing.

Hypothesis generates valid requests and replies to check that parsing what
was rendered gives back what was generated, arbitrary bytes to check that
only the documented errors escape, and random chunkings to check that where
a stream is split never changes what is parsed, routed or written. Bugs the
properties (and the atheris fuzzer in ``fuzz/``) found have plain
regression tests at the end of the file.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from fuzz.checks import (
    check_output,
    check_reply_chunks,
    check_request_line,
    check_wire,
    chunked,
    read_chunks,
    read_one_piece,
    read_raw_chunks,
    reply_fields,
    run_protocol,
)
from mcproxy.backends.pool import BackendRegistry
from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import (
    MAX_UNTERMINATED,
    MAX_VALUE_LENGTH,
    ParseError,
    Request,
    multiget_prefix,
    parse_request,
    split_multiget,
)
from mcproxy.wire.response import (
    FAIL_PARSING,
    MAX_LINE,
    MCMC_CODE_CLIENT_ERROR,
    MCMC_CODE_DELETED,
    MCMC_CODE_END,
    MCMC_CODE_ERROR,
    MCMC_CODE_EXISTS,
    MCMC_CODE_NOP,
    MCMC_CODE_NOT_FOUND,
    MCMC_CODE_NOT_STORED,
    MCMC_CODE_OK,
    MCMC_CODE_SERVER_ERROR,
    MCMC_CODE_STORED,
    MCMC_CODE_TOUCHED,
    MCMC_RESP_END,
    MCMC_RESP_ERRMSG,
    MCMC_RESP_GENERIC,
    MCMC_RESP_GET,
    MCMC_RESP_META,
    MCMC_RESP_NUMERIC,
    BackendProtocolError,
    Response,
    client_bytes,
    parse_response,
)
from mcproxy.writes import batch
from tests.server.memorycore import MemoryCore

#: Multiplies the example counts for a deeper run (the default takes ~20 s).
SCALE = int(os.environ.get("MCPROXY_PROPERTY_SCALE", "1"))
FAST = settings(max_examples=300 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=120 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# -- strategies: requests ------------------------------------------------------

#: Bytes a key or token may hold: no whitespace, no control characters.
TOKEN_BYTES = [b for b in range(0x21, 0x100) if b != 0x7F]

_plain_keys = st.lists(st.sampled_from(TOKEN_BYTES), min_size=1, max_size=250).map(bytes)
#: Keys, sometimes starting like a keyword the parser looks for.
keys = st.one_of(
    _plain_keys,
    st.builds(bytes.__add__, st.sampled_from([b"noreply", b"q", b"get", b"END"]),
              _plain_keys),
    st.sampled_from([b"noreply", b"q", b"0"]),
)
words = st.lists(st.sampled_from(TOKEN_BYTES), min_size=1, max_size=12).map(bytes)
meta_flags = st.builds(lambda first, rest: bytes([first]) + rest,
                       st.integers(65, 122),
                       st.lists(st.sampled_from(TOKEN_BYTES), max_size=8).map(bytes))
lengths = st.one_of(st.integers(0, 100), st.integers(0, MAX_VALUE_LENGTH - 2))
numbers = st.integers(0, 2**64 - 1).map(b"%d".__mod__)
exptimes = st.integers(-1, 2**31).map(b"%d".__mod__)

STORAGE = [b"set", b"add", b"replace", b"append", b"prepend", b"cas"]


@st.composite
def requests(draw) -> tuple[list[bytes], dict]:
    """A valid request as its tokens, and what parsing it must give."""
    kind = draw(st.sampled_from([
        b"get", b"gets", b"gat", b"gats", *STORAGE, b"incr", b"decr", b"touch",
        b"delete", b"mg", b"md", b"ma", b"me", b"ms", b"version", b"quit", b"mn",
        b"stats", b"watch"]))
    expect = {"command": rq.COMMANDS[kind], "vlen": 0, "noreply": False,
              "quiet": False, "keys": None}
    noreply = [b"noreply"] if draw(st.booleans()) else []
    if kind in (b"get", b"gets", b"gat", b"gats"):
        ks = draw(st.lists(keys, min_size=1, max_size=5))
        head = [kind, draw(exptimes)] if kind[:2] == b"ga" else [kind]
        tokens = [*head, b" ".join(ks)]
        expect.update(key=ks[0], keys=ks if len(ks) > 1 else None)
    elif kind in STORAGE:
        key, length = draw(keys), draw(lengths)
        cas = [draw(numbers)] if kind == b"cas" else []
        tokens = [kind, key, draw(numbers), draw(exptimes), b"%d" % length, *cas,
                  *noreply]
        expect.update(key=key, vlen=length + 2, noreply=bool(noreply))
    elif kind in (b"incr", b"decr", b"touch", b"delete"):
        key = draw(keys)
        if kind == b"delete":
            middle = [b"0"] if draw(st.booleans()) else []
        else:
            middle = [draw(numbers if kind != b"touch" else exptimes)]
        tokens = [kind, key, *middle, *noreply]
        expect.update(key=key, noreply=bool(noreply))
    elif kind[:1] == b"m" and kind != b"mn":
        key = draw(keys)
        flags = draw(st.lists(meta_flags, max_size=10))
        head = [kind, key]
        if kind == b"ms":
            length = draw(lengths)
            head.append(b"%d" % length)
            expect["vlen"] = length + 2
        tokens = head + flags
        # (me has no quiet mode)
        expect.update(key=key, quiet=kind != b"me" and any(f[:1] == b"q" for f in flags))
    else:
        args = draw(st.lists(words, max_size=3)) if kind in (b"stats", b"watch") else []
        tokens = [kind, *args]
        expect["key"] = b""
    expect["tokens"] = tokens
    return tokens, expect


def render(tokens: list[bytes]) -> bytes:
    return b" ".join(tokens) + b"\r\n"


#: Lines the parser must survive: random bytes, and random bytes after a
#: real command name (which gets past the first check).
any_lines = st.one_of(
    st.binary(max_size=64).map(lambda b: b + b"\r\n"),
    st.binary(max_size=64),
    st.builds(lambda name, rest, end: name + rest + end,
              st.sampled_from(sorted(rq.COMMANDS)),
              st.lists(st.sampled_from([b" ", b"  ", b"noreply", b"q", b"v", b"0", b"5",
                                        b"-1", b"k", b"\r", b"\n", b"\t", b"\x00",
                                        b"\xff", b"9" * 12]), max_size=12).map(b"".join),
              st.sampled_from([b"\r\n", b"\n", b""])),
)


# -- properties: requests ------------------------------------------------------


@FAST
@given(requests())
def test_request_roundtrip(generated):
    tokens, expect = generated
    line = render(tokens)
    req = parse_request(line)
    assert req.line == line
    assert {"command": req.command, "key": req.key, "vlen": req.vlen,
            "noreply": req.noreply, "quiet": req.quiet, "tokens": req.tokens,
            "keys": split_multiget(req) if req.command in rq.GET_COMMANDS else None,
            } == expect
    if expect["keys"]:
        assert multiget_prefix(req) + tokens[-1] + b"\r\n" == line
    check_wire(req)


@FAST
@given(requests(), st.data())
def test_request_spacing_does_not_matter(generated, data):
    """Runs of spaces between tokens, and trailing spaces, change nothing
    (except that a trailing space makes a get a one-key multiget)."""
    tokens, expect = generated
    gaps = data.draw(st.lists(st.integers(1, 3), min_size=len(tokens),
                              max_size=len(tokens)))
    gaps[-1] -= 1
    line = b"".join(t + b" " * g for t, g in zip(tokens, gaps, strict=True)) + b"\r\n"
    req = parse_request(line)
    assert (req.command, req.key, req.vlen, req.noreply, req.quiet) == (
        expect["command"], expect["key"], expect["vlen"], expect["noreply"],
        expect["quiet"])
    if req.command in rq.GET_COMMANDS:
        assert (split_multiget(req) or [req.key]) == (expect["keys"] or [req.key])
    elif req.command not in (rq.CMD_QUIT, rq.CMD_MN):
        # A capped last token runs to the end of the line, spaces and all.
        assert [*req.tokens[:-1], req.tokens[-1].rstrip(b" ")] == expect["tokens"]
    check_wire(req)


@FAST
@given(any_lines)
def test_any_line_parses_or_raises_parse_error(line):
    check_request_line(line)


def _parsed(parse, line: bytes):
    """Everything a parse of ``line`` decides, or the ParseError."""
    try:
        req = parse(line)
    except ParseError:
        return ParseError
    return tuple(getattr(req, name) for name in Request.__slots__)


_digits = st.sampled_from([b"", b"0", b"00", b"1", b"9" * 9, b"9" * 10, b"1" * 18,
                           b"9" * 19, b"1" * 20, b"9" * 20, b"0" * 25 + b"7",
                           b"-0", b"+1", b"-1", b"1a", b"\xd9\xa3"])
_fast_keys = st.sampled_from([b"k", b"key:000123", b"", b"a b", b"a\rb", b"a\nb",
                              b"\xff\x80", b"k" * 250, b"k" * 251, b"noreply"])
#: Lines shaped like the parser's fast paths, and near misses of them.
near_fast_lines = st.builds(
    lambda head, key, numbers, sep, end: head + sep.join([key, *numbers]) + end,
    st.sampled_from([b"get ", b"set ", b"get  ", b"set  ", b"gets ", b"sets ", b"GET "]),
    _fast_keys, st.lists(_digits, min_size=3, max_size=3) | st.lists(_digits, max_size=5),
    st.sampled_from([b" ", b"  "]), st.sampled_from([b"\r\n", b"\n", b" \r\n", b""]))


@FAST
@given(st.one_of(near_fast_lines, any_lines))
def test_fast_paths_parse_as_the_general_parser(line):
    assert _parsed(parse_request, line) == _parsed(rq._parse_general, line)


def test_fast_paths_parse_the_fuzz_corpus_as_the_general_parser():
    corpus = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                          "fuzz", "corpus", "request")
    lines = [b"get k\r\n", b"set k 0 0 5\r\n", b"set k 4294967296 -1 5\r\n",
             b"set k 0 0 5 noreply\r\n", b"set k 18446744073709551616 0 1\r\n",
             b"set k 0 0 9999999999\r\n", b"set k 0 0 2147483646\r\n",
             b"set k 0 9999999999999999999 1\r\n", b"set k 0 -1 1\r\n",
             b"set k 99999999999999999999 0 1\r\n", b"set k 0 0 000000000001\r\n",
             b"get k k\r\n", b"get \r\n", b"get  k\r\n", b"set %s 0 0 1\r\n" % (b"k" * 251)]
    for name in os.listdir(corpus):
        with open(os.path.join(corpus, name), "rb") as f:
            lines += [line + b"\n" for line in f.read().split(b"\n")]
    for line in lines:
        assert _parsed(parse_request, line) == _parsed(rq._parse_general, line), line


# -- strategies: replies -------------------------------------------------------

_text = st.lists(st.integers(0, 255).filter(lambda b: b != 10), max_size=30).map(bytes)
_data = st.binary(max_size=40) | st.sampled_from([b"END\r\n", b"\r\n", b"VALUE k 0 1\r\n"])

SIMPLE = {
    b"END": (MCMC_CODE_END, MCMC_RESP_END), b"EN": (MCMC_CODE_END, MCMC_RESP_META),
    b"HD": (MCMC_CODE_OK, MCMC_RESP_META), b"NF": (MCMC_CODE_NOT_FOUND, MCMC_RESP_META),
    b"NS": (MCMC_CODE_NOT_STORED, MCMC_RESP_META),
    b"EX": (MCMC_CODE_EXISTS, MCMC_RESP_META), b"MN": (MCMC_CODE_NOP, MCMC_RESP_META),
    b"ME": (MCMC_CODE_OK, MCMC_RESP_META), b"OK": (MCMC_CODE_OK, MCMC_RESP_GENERIC),
    b"STORED": (MCMC_CODE_STORED, MCMC_RESP_GENERIC),
    b"EXISTS": (MCMC_CODE_EXISTS, MCMC_RESP_GENERIC),
    b"DELETED": (MCMC_CODE_DELETED, MCMC_RESP_GENERIC),
    b"TOUCHED": (MCMC_CODE_TOUCHED, MCMC_RESP_GENERIC),
    b"NOT_FOUND": (MCMC_CODE_NOT_FOUND, MCMC_RESP_GENERIC),
    b"NOT_STORED": (MCMC_CODE_NOT_STORED, MCMC_RESP_GENERIC),
    b"ERROR": (MCMC_CODE_ERROR, MCMC_RESP_ERRMSG),
    b"CLIENT_ERROR": (MCMC_CODE_CLIENT_ERROR, MCMC_RESP_ERRMSG),
    b"SERVER_ERROR": (MCMC_CODE_SERVER_ERROR, MCMC_RESP_ERRMSG),
}
_UNKNOWN_META = [bytes((a, b)) for a in range(65, 91) for b in range(65, 91)
                 if bytes((a, b)) not in SIMPLE and bytes((a, b)) != b"VA"]


@st.composite
def replies(draw) -> tuple[bytes, tuple]:
    """A valid backend reply and (code, type, line, value) it must parse to."""
    kind = draw(st.sampled_from(["simple", "flags", "number", "unknown", "VA", "VALUE"]))
    if kind == "simple":
        token = draw(st.sampled_from(sorted(SIMPLE)))
        line = token + b"\r\n"
        return line, (*SIMPLE[token], line, None)
    if kind == "flags":
        token = draw(st.sampled_from([b"HD", b"NF", b"NS", b"EX", b"EN", b"MN", b"ME",
                                      b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"]))
        line = token + b" " + draw(_text) + b"\r\n"
        return line, (*SIMPLE[token], line, None)
    if kind == "number":
        line = draw(numbers) + b"\r\n"
        return line, (MCMC_CODE_OK, MCMC_RESP_NUMERIC, line, None)
    if kind == "unknown":
        line = draw(st.sampled_from(_UNKNOWN_META)) + draw(
            st.sampled_from([b"", b" ", b" x"])) + b"\r\n"
        return line, (MCMC_CODE_OK, MCMC_RESP_META, line, None)
    value = draw(_data) + b"\r\n"
    if kind == "VA":
        flags = draw(st.lists(words, max_size=4))
        line = b" ".join([b"VA", b"%d" % (len(value) - 2), *flags]) + b"\r\n"
        return line + value, (MCMC_CODE_OK, MCMC_RESP_META, line, value)
    cas = [draw(numbers)] if draw(st.booleans()) else []
    line = b" ".join([b"VALUE", draw(_plain_keys), draw(numbers),
                      b"%d" % (len(value) - 2), *cas]) + b"\r\n"
    return line + value + b"END\r\n", (MCMC_CODE_OK, MCMC_RESP_GET, line, value)


# -- properties: replies -------------------------------------------------------


@FAST
@given(replies())
def test_reply_roundtrip(generated):
    wire, expect = generated
    res, end = parse_response(wire)
    assert end == len(wire) and res.ok
    assert reply_fields(res) == expect
    assert parse_response(bytearray(wire))[1] == end
    for cut in range(len(wire)):
        assert parse_response(wire[:cut]) is None


@FAST
@given(st.lists(replies(), max_size=8), st.lists(st.integers(0, 10**6), max_size=12))
def test_reply_stream_split_anywhere(generated, cuts):
    stream = b"".join(wire for wire, _ in generated)
    expect = [e for _, e in generated]
    assert read_one_piece(stream) == (expect, None)
    assert read_chunks(chunked(stream, cuts)) == (expect, None, 0)


#: Byte streams that are mostly replies with garbage mixed in.
_noisy_streams = st.lists(
    st.one_of(replies().map(lambda g: g[0]), st.binary(max_size=12),
              st.sampled_from([b"\r\n", b"\n", b"VA ", b"VALUE ", b"END", b" 1 "])),
    max_size=10).map(b"".join)


@FAST
@given(st.one_of(st.binary(max_size=200), _noisy_streams),
       st.lists(st.integers(0, 10**6), max_size=12), st.booleans())
def test_any_bytes_read_the_same_in_any_chunks(data, cuts, multi):
    """Only BackendProtocolError escapes, and the replies before it, the
    error itself and what stays buffered do not depend on the chunking
    (nor, for single replies, on using the reader or parse_response)."""
    check_reply_chunks(data, chunked(data, cuts), multi)


_SET_REPLIES = (b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n")


def plain_request_for(reply: Response) -> tuple[bytes, bool] | None:
    """A plain get (key, False) or set (key, True) that ``reply`` can
    answer; None if neither can (it answers no request of a run)."""
    if reply.type == MCMC_RESP_GET:
        return reply.line[6:reply.line.index(b" ", 6)], False
    if reply.type in (MCMC_RESP_ERRMSG, MCMC_RESP_END):
        return b"k", False
    if reply.line in _SET_REPLIES:
        return b"k", True
    return None


#: Reply streams a backend may send (plain replies, noise, any bytes), the
#: cuts they arrive in, and how many replies a reader asks for in turn.
_reply_streams = st.one_of(st.lists(replies(), max_size=8).map(lambda g: b"".join(w for w, _ in g)),
                           _noisy_streams, st.binary(max_size=100))
_cuts = st.lists(st.integers(0, 10**6), max_size=12)
_read_counts = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@pytest.mark.usefixtures("framing")
@FAST
@given(_reply_streams, _cuts, _read_counts)
def test_raw_replies_are_the_replies_as_they_came(data, cuts, counts):
    """read_raw frames the replies parse_response finds, as the very bytes
    that came, each checked against the plain get or set it answers, and
    stops with the same error, however the bytes arrive; a reply that
    answers neither is a mismatch."""
    _, error = read_one_piece(data)
    keys, sets, end, mismatch = plain_requests_answered(data)
    assert read_raw_chunks(chunked(data, cuts), counts, None, keys + [b"k"] * 8,
                           sets) == (data[:end], len(keys), "mismatch" if mismatch else error)


def plain_requests_answered(data: bytes) -> tuple[list[bytes], frozenset[int], int, bool]:
    """The plain gets and sets whose replies ``data`` starts with, as
    parse_response finds them: their keys, the indexes of the sets, where
    their replies end, and whether a reply after them answers neither."""
    keys, sets, end = [], set(), 0
    try:
        while (got := parse_response(data, end)) is not None:
            request = plain_request_for(got[0])
            if request is None:
                return keys, frozenset(sets), end, True
            if request[1]:
                sets.add(len(keys))
            keys.append(request[0])
            end = got[1]
    except BackendProtocolError:
        pass
    return keys, frozenset(sets), end, False


def read_each_chunks(chunks: list[bytes], counts: list[int], keys: list[bytes],
                     sets: frozenset[int]) -> tuple[list[bytes], str | None]:
    """The replies ResponseReader.read_each reads from ``chunks``, asked
    for ``counts`` at a time in turn, and the error that stopped it."""
    reader, replies, turn = ResponseReader(), [], 0
    try:
        for chunk in chunks:
            if reader.feed(chunk):
                while reader.read_each(counts[turn % len(counts)], replies, keys, sets):
                    turn += 1
    except BackendProtocolError as e:
        return replies, e.reason
    return replies, None


@pytest.mark.usefixtures("framing")
@FAST
@given(_reply_streams, _cuts, _read_counts)
def test_replies_read_each_are_those_read_raw_frames(data, cuts, counts):
    """read_each gives, one by one, the replies read_raw frames in one
    piece, and stops with the same error, however the bytes arrive."""
    keys, sets, _, _ = plain_requests_answered(data)
    keys += [b"k"] * 8
    framed, count, error = read_raw_chunks([data], [64], None, keys, sets)
    replies, each_error = read_each_chunks(chunked(data, cuts), counts, keys, sets)
    assert (b"".join(replies), len(replies), each_error) == (framed, count, error)
    assert all(parse_response(reply, 0)[1] == len(reply) for reply in replies)


@pytest.mark.usefixtures("framing")
@FAST
@given(st.lists(st.integers(0, 10**6), max_size=6))
def test_raw_reply_of_another_request_is_a_mismatch(cuts):
    """A VALUE of another key, END to a set, STORED to a get: raised after
    the replies before, which answered their own requests."""
    keys, sets = [b"a", b"b", b"c"], frozenset([1])
    for wrong in (b"VALUE x 0 1\r\n1\r\nEND\r\n", b"STORED\r\n", b"HD\r\n"):
        wire = b"END\r\nSTORED\r\n" + wrong
        assert read_raw_chunks(chunked(wire, cuts), [1, 3], None, keys, sets) \
            == (b"END\r\nSTORED\r\n", 2, "mismatch")
    wire = b"END\r\nEND\r\n"
    assert read_raw_chunks(chunked(wire, cuts), [2], None, keys, sets) \
        == (b"END\r\n", 1, "mismatch")


@st.composite
def multiget_replies(draw) -> tuple[bytes, list[tuple]]:
    """memcached's reply to ``get k1 k2 ...``: the hits, then one END."""
    items, expect = [], []
    for _ in range(draw(st.integers(0, 5))):
        value = draw(_data) + b"\r\n"
        line = b" ".join([b"VALUE", draw(_plain_keys), draw(numbers),
                          b"%d" % (len(value) - 2)]) + b"\r\n"
        items.append(line + value)
        expect.append((MCMC_CODE_OK, MCMC_RESP_GET, line, value))
    expect.append((MCMC_CODE_END, MCMC_RESP_END, errors.END, None))
    return b"".join(items) + errors.END, expect


@FAST
@given(st.lists(multiget_replies(), max_size=4), st.lists(st.integers(0, 10**6), max_size=12))
def test_multi_key_replies_split_anywhere(generated, cuts):
    stream = b"".join(wire for wire, _ in generated)
    expect = [item for _, items in generated for item in items]
    assert read_chunks(chunked(stream, cuts), multi=True) == (expect, None, 0)


_GET_ERRORS = st.sampled_from([b"SERVER_ERROR out of memory\r\n", b"ERROR\r\n",
                               b"CLIENT_ERROR bad data chunk\r\n"])


@st.composite
def run_replies(draw) -> tuple[bytes, bytes, int, dict[int, int], list[bytes], frozenset[int]]:
    """The replies to a run of single requests and multi-key gets (by
    ``widths``), what its client gets, and the requests' keys and sets: the
    same bytes, except that an error line answering a multi-key get (after
    any values) is that line for each key and END, as for keys routed
    together."""
    wire, expect, widths, keys, sets = [], [], {}, [], set()
    for index in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            reply, request = draw(replies().map(
                lambda g: (g[0], plain_request_for(parse_response(g[0])[0]))).filter(
                lambda g: g[1] is not None))
            wire.append(reply)
            expect.append(reply)
            keys.append(request[0])
            if request[1]:
                sets.add(index)
            continue
        reply, items = draw(multiget_replies())
        width = widths[index] = draw(st.integers(max(2, len(items) - 1), 6))
        found = [line[6:line.index(b" ", 6)] for _, _, line, _ in items[:-1]]
        keys.append(b" ".join(found + [b"-"] * (width - len(found))))
        if kind == 1:
            wire.append(reply)
            expect.append(reply)
        else:
            line = draw(_GET_ERRORS)
            wire.append(reply[:-len(errors.END)] + line)
            expect.append(line * widths[index] + errors.END)
    return (b"".join(wire), b"".join(expect), len(wire), widths, keys, frozenset(sets))


@pytest.mark.usefixtures("framing")
@FAST
@given(run_replies(), st.lists(st.integers(0, 10**6), max_size=12),
       st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_raw_multi_key_replies_in_any_chunks(generated, cuts, counts):
    wire, expect, count, widths, keys, sets = generated
    assert read_raw_chunks(chunked(wire, cuts), counts, widths, keys, sets) \
        == (expect, count, None)


@pytest.mark.usefixtures("framing")
@FAST
@given(st.lists(st.integers(0, 10**6), max_size=6))
def test_raw_multi_key_reply_with_more_values_than_keys(cuts):
    """More values than keys, or a key not asked for, or out of order: a
    mismatch, raised after the replies before."""
    value = b"VALUE a 0 1\r\n1\r\n"
    for keys, values in (([b"x", b"a a"], value * 3), ([b"x", b"a b"], value + value),
                         ([b"x", b"b a"], value + b"VALUE b 0 1\r\n1\r\n"),
                         ([b"x", b"a b"], b"VALUE c 0 1\r\n1\r\n")):
        wire = b"STORED\r\n" + values + errors.END
        assert read_raw_chunks(chunked(wire, cuts), [1, 2], {1: 2}, keys, frozenset([0])) \
            == (b"STORED\r\n", 1, "mismatch")


@FAST
@given(replies(), requests(), st.booleans())
def test_client_bytes_is_the_reply_or_nothing(generated, req_generated, multiget):
    wire, _ = generated
    res, _ = parse_response(wire)
    req = parse_request(render(req_generated[0]))
    req.multiget = multiget
    sent = client_bytes(res, req)
    whole = res.line + (res.value or b"")
    assert sent in (b"", whole, whole + errors.END)
    if req.noreply:
        assert sent == b""


# -- the client protocol -------------------------------------------------------


hooked_sets = st.sampled_from([frozenset(rq.COMMANDS.values()), frozenset(),
                               frozenset((rq.CMD_GET, rq.CMD_GAT, rq.CMD_MG, rq.CMD_MS)),
                               frozenset((rq.CMD_SET, rq.CMD_GETS, rq.CMD_DELETE))])


@st.composite
def client_streams(draw) -> bytes:
    """Requests a client may pipeline: valid ones with payloads, bad lines,
    bad payloads; no line longer than the 1024-byte no-newline limit."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        choice = draw(st.integers(0, 5))
        if choice <= 2:
            tokens, expect = draw(requests())
            if expect["vlen"] > 200:
                continue
            parts.append(render(tokens))
            if expect["vlen"]:
                value = draw(st.binary(min_size=expect["vlen"] - 2,
                                       max_size=expect["vlen"] - 2))
                parts.append(value + draw(st.sampled_from([b"\r\n", b"\r\n", b"xx"])))
        elif choice == 3:
            parts.append(draw(any_lines))
        elif choice == 4:
            parts.append(draw(st.binary(max_size=30)))
        else:
            parts.append(draw(st.sampled_from([b"\r\n", b"\n", b"quit\r\n", b"mn\r\n",
                                               b"get a b c \r\n", b"set k 0 0 1\r\n",
                                               b"get k\r\n", b"set k 1 2 2\r\nab\r\n"])))
    stream = b"".join(parts)
    if any(len(line) > MAX_UNTERMINATED for line in stream.split(b"\n")):
        stream = stream[:MAX_UNTERMINATED]
    return stream


@SLOW
@given(client_streams(), st.lists(st.integers(0, 10**6), max_size=12), hooked_sets)
def test_client_stream_split_anywhere(stream, cuts, hooked):
    """Chunking and answer order change nothing that is routed or written."""
    whole = run_protocol([stream], hooked)
    split = run_protocol(chunked(stream, cuts), hooked, later=True)
    assert whole[:3] == split[:3]
    check_output(stream, *whole[:2], whole[3])


@st.composite
def plain_streams(draw) -> bytes:
    """Mostly plain get/set requests and near misses of them (odd keys,
    numbers, payloads of the wrong length or ending), with other requests
    between."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            parts.append(b"get " + draw(_fast_keys) + draw(st.sampled_from([b"\r\n", b"\n"])))
        elif choice <= 2:
            numbers = draw(st.lists(_digits, min_size=3, max_size=3))
            size = draw(st.integers(0, 12))
            line = b"set %s %s\r\n" % (draw(_fast_keys), b" ".join(numbers[:2] + [b"%d" % size]))
            value = draw(st.binary(min_size=size, max_size=size))
            parts.append(line + value + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"xx"])))
        elif choice == 3:
            parts.append(draw(client_streams()))
        elif choice == 4:
            parts.append(b"get k%d\r\n" % draw(st.integers(0, 9)))
        else:
            keys = draw(st.lists(_fast_keys, min_size=2, max_size=4))
            parts.append(b"get " + b" ".join(keys) + draw(st.sampled_from([b"\r\n", b"\n"])))
    stream = b"".join(parts)
    if any(len(line) > MAX_UNTERMINATED for line in stream.split(b"\n")):
        stream = stream[:MAX_UNTERMINATED]
    return stream


@pytest.mark.usefixtures("framing")
@SLOW
@given(plain_streams(), st.lists(st.integers(0, 10**6), max_size=12),
       st.lists(st.integers(0, 10**6), max_size=12), st.sampled_from(
           [frozenset(rq.COMMANDS.values()), frozenset((rq.CMD_GET, rq.CMD_SET))]),
       st.booleans())
def test_plain_runs_route_and_answer_as_one_by_one(stream, cuts, run_cuts, hooked, multigets):
    """Runs of plain requests (request.scan_plain, RouteEngine.route_run)
    route the same requests in the same order, and answer the same bytes,
    as routing one by one, however the stream is cut."""
    one_by_one = run_protocol(chunked(stream, cuts), hooked, later=True)
    runs = run_protocol(chunked(stream, run_cuts), hooked, later=True, runs=True,
                        multigets=multigets)
    assert runs[:3] == one_by_one[:3]
    assert run_protocol([stream], hooked, runs=True, multigets=multigets)[:3] \
        == one_by_one[:3]
    gets = run_protocol(chunked(stream, run_cuts), hooked, later=True, runs="gets")
    assert gets[:3] == one_by_one[:3]  # runs of gets only, as for gets routed in Lua
    # and a get alone gathered, what is read after it in the same turn held
    held = run_protocol(chunked(stream, run_cuts), hooked, later=True, runs="gets", per_turn=3)
    assert held[:3] == one_by_one[:3]
    refused = run_protocol([stream], hooked, later=True, runs="refuse")
    assert refused[:3] == one_by_one[:3]
    assert refused[3].engine.refused <= 1  # then the rest of the chunk goes line by line


@SLOW
@given(st.one_of(st.binary(max_size=300), client_streams()),
       st.lists(st.integers(0, 10**6), max_size=12), hooked_sets)
def test_client_any_bytes(data, cuts, hooked):
    """Arbitrary bytes never raise out of dataReceived and produce only
    replies to requests that were made."""
    routed, output, _, service = run_protocol(chunked(data, cuts), hooked, later=True)
    check_output(data, routed, output, service)


# -- the direct path answers as the routes' Lua bodies -----------------------------

#: Route configs whose routes the engine runs on its direct path (``%s``
#: is the pool's backends as "host:port" strings): written by hand, made by
#: the route library, and declarative.
DIRECT_CONFIGS = {
    "hand-written": """
function mcp_config_pools()
    local list = {}
    for i, address in ipairs({ %s }) do
        local host, port = address:match("^(.+):(%%d+)$")
        list[i] = mcp.backend(address, host, port)
    end
    return mcp.pool(list)
end
function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
""",
    **{name: """
local routes = require("mcproxy.routes")
mcp_config_pools, mcp_config_routes = routes.config{
    pools = { main = { backends = { %s } } },
    introspect = INTROSPECT,
    routes = ROUTES,
}
""".replace("ROUTES", route).replace("INTROSPECT", introspect)
       for name, route, introspect in [
           ("routes.direct", 'routes.direct("main")', "false"),
           ("routes.as_route", 'function(pools) return routes.as_route(pools.main) end', "false"),
           ("config of a pool", '"main"', "true"),
           ("config of a command map", '{ reads = "main", writes = "main" }', "true"),
           ("config of a failover", 'routes.failover{ "main" }', "true"),
           ("failover of a route", 'routes.failover({ routes.direct("main") }, '
                                   '{ miss = true, count = 1 })', "false"),
       ]},
}

#: Commands the generated streams use, all routed directly by those configs.
DIRECT_COMMANDS = frozenset((rq.CMD_GET, rq.CMD_GETS, rq.CMD_GAT, rq.CMD_SET, rq.CMD_ADD,
                             rq.CMD_CAS, rq.CMD_APPEND, rq.CMD_INCR, rq.CMD_TOUCH,
                             rq.CMD_DELETE, rq.CMD_MG, rq.CMD_MS, rq.CMD_MD, rq.CMD_MA))
INTROSPECTION = b"__mcproxy__.route("


class PipeTransport(StringTransport):
    """A StringTransport with the TCP option setters a backend calls."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


def serve(store, data: bytes) -> bytes:
    """What a memcached holding ``store`` answers to the requests ``data``
    (as the proxy forwards them: no noreply, no quiet flags)."""
    out, pos = [], 0
    while pos < len(data):
        newline = data.index(b"\n", pos) + 1
        req = parse_request(data[pos:newline])
        pos = newline
        if req.vlen:
            req.value = data[pos:pos + req.vlen]
            pos += req.vlen
        out.append(store.execute(req))
    return b"".join(out)


class EngineProxy:
    """The proxy's client side over the real route engine, in-process: its
    backends' connections on transports, answered by an embedded-cache
    Store each (fresh for every client, see :meth:`exchange`), with writes
    batched per turn as under the reactor."""

    def __init__(self, path: str, direct: bool) -> None:
        clock = MemoryReactorClock()
        self.stats = ProxyStats()
        self.store = None
        # the reference (direct off) runs each request's Lua on its own
        self.engine = RouteEngine(self.stats, BackendRegistry(self.stats, reactor=clock),
                                  Tunables(), UserStats(), direct=direct, batch_keys=direct)
        self.routes = self.engine.load(path)
        self.started = 0
        start = self.routes.start

        def counted(*args):
            self.started += 1
            return start(*args)

        self.routes.start = counted
        self.connections = []
        for backend in self.engine.registry.live:
            backend.connect()
            connection = clock.tcpClients[-1][2].buildProtocol(None)
            connection.makeConnection(PipeTransport())
            connection.dataReceived(b"VERSION 1.6.18\r\n")
            connection.transport.clear()
            self.connections.append(connection)

    def exchange(self, chunks: list[bytes]) -> bytes:
        """A new client's chunks, each read in a turn of its own, against
        empty backends; what the client got back."""
        stores = [Store(clock=lambda: 1_700_000_000.0) for _ in self.connections]
        pending: list = []
        saved, batch.schedule = batch.schedule, pending.append
        try:
            client = ProxyServerProtocol(MemoryCore(self.engine, stats=self.stats))
            client.makeConnection(StringTransport())
            for chunk in chunks:
                client.dataReceived(chunk)
                busy = True
                while busy:
                    while pending:
                        pending.pop(0)()
                    busy = False
                    for connection, store in zip(self.connections, stores, strict=True):
                        sent = connection.transport.value()
                        if sent:
                            busy = True
                            connection.transport.clear()
                            connection.dataReceived(serve(store, sent))
        finally:
            batch.schedule = saved
        assert self.stats.req_active == 0
        return client.transport.value()


_engine_proxies: dict[tuple[str, int, bool], EngineProxy] = {}


def engine_proxy(tmp_path_factory, name: str, backends: int, direct: bool) -> EngineProxy:
    """The EngineProxy of a DIRECT_CONFIGS config over ``backends`` backends
    (made once per test session)."""
    key = (name, backends, direct)
    if key not in _engine_proxies:
        addresses = ", ".join(f'"127.0.0.1:{port}"' for port in range(1, backends + 1))
        path = tmp_path_factory.mktemp("direct") / "route.lua"
        path.write_text(DIRECT_CONFIGS[name] % addresses)
        _engine_proxies[key] = EngineProxy(str(path), direct)
    return _engine_proxies[key]


_direct_keys = st.sampled_from([b"a", b"b", b"c", b"n", b"key:000123", b"x" * 250])


@st.composite
def direct_requests(draw) -> bytes:
    """A well-formed request of DIRECT_COMMANDS, some of them plain gets and
    sets (runs), multi-key gets, and gets of introspection keys."""
    key = draw(_direct_keys)
    kind = draw(st.integers(0, 13))
    value = draw(st.sampled_from([b"", b"1", b"value", b"12345678901234567890"]))
    if kind <= 2:
        return b"get %s\r\n" % key
    if kind == 3:
        keys = draw(st.lists(_direct_keys | st.just(INTROSPECTION + b"get,a)"),
                             min_size=2, max_size=5))
        return draw(st.sampled_from([b"get ", b"gets "])) + b" ".join(keys) + b"\r\n"
    if kind <= 5:
        return b"set %s 5 0 %d\r\n%s\r\n" % (key, len(value), value)
    if kind == 6:
        command = draw(st.sampled_from([b"add", b"append", b"cas"]))
        cas = b" %d" % draw(st.integers(1, 4)) if command == b"cas" else b""
        return b"%s %s 0 0 %d%s\r\n%s\r\n" % (command, key, len(value), cas, value)
    if kind == 7:
        return b"incr %s %d\r\n" % (key, draw(st.integers(0, 2**64 - 1)))
    if kind == 8:
        return draw(st.sampled_from([b"delete %s\r\n", b"touch %s 10\r\n", b"gat 10 %s\r\n",
                                     b"gets %s\r\n"])) % key
    if kind == 9:
        return b"mg %s %s\r\n" % (key, draw(st.sampled_from([b"v", b"s t v c", b"k O1 q"])))
    if kind == 10:
        return b"ms %s %d T0 F3\r\n%s\r\n" % (key, len(value), value)
    if kind == 11:
        return draw(st.sampled_from([b"md %s q\r\n", b"ma %s N0 J5\r\n"])) % key
    if kind == 12:
        return b"get %s%s,%s)\r\n" % (INTROSPECTION, draw(st.sampled_from([b"get", b"set"])),
                                       draw(st.sampled_from([b"a", b"key:000123"])))
    return b"mn\r\n"


def introspection_gets(stream: bytes) -> int:
    """How many keys of ``get`` requests in ``stream`` ask for introspection."""
    return sum(token.startswith(INTROSPECTION)
               for line in stream.split(b"\r\n") if line.startswith(b"get ")
               for token in line.split(b" ")[1:])


@SLOW
@given(st.sampled_from(sorted(DIRECT_CONFIGS)), st.sampled_from([1, 3]),
       st.lists(direct_requests(), max_size=14).map(b"".join),
       st.lists(st.integers(0, 10**6), max_size=6))
def test_direct_routes_answer_as_their_lua_bodies(tmp_path_factory, name, backends, stream,
                                                  cuts):
    """The route library's routes, and a hand-written ``return pool(r)``,
    take the direct path (plain runs, multigets routed together, requests
    without Lua), and answer every client the same bytes as their Lua
    bodies run by the engine; only introspection enters Lua."""
    direct = engine_proxy(tmp_path_factory, name, backends, True)
    lua = engine_proxy(tmp_path_factory, name, backends, False)
    assert DIRECT_COMMANDS <= set(direct.routes.direct.pools)
    assert direct.engine.plain_runs is True and lua.engine.plain_runs is None
    chunks = chunked(stream, cuts)
    started = direct.started
    assert direct.exchange(chunks) == lua.exchange(chunks)
    expected = introspection_gets(stream) if "config" in name else 0
    assert direct.started - started == expected


# -- regression tests for what the properties and the fuzzer found --------------


@pytest.mark.parametrize("line", [b"mg foo \r\n", b"ms foo 2 \r\n", b"md foo q \r\n"])
def test_meta_with_trailing_space(line):
    """A trailing space made an empty flag token: IndexError, not a request."""
    req = parse_request(line)
    assert req.key == b"foo"
    check_wire(req)


@pytest.mark.parametrize("line", [b"delete k noreply \r\n", b"set k 0 0 1 noreply \r\n",
                                  b"incr k 1 noreply \r\n"])
def test_noreply_with_trailing_space_is_still_noreply(line):
    """memcached ignores the trailing space and does not answer; the proxy
    must see the noreply too, or it waits for a reply that never comes."""
    req = parse_request(line)
    assert req.noreply
    assert b"noreply" not in req.wire_line()


def test_gat_without_key_after_trailing_space():
    with pytest.raises(ParseError):
        parse_request(b"gat 10 \r\n")


@pytest.mark.parametrize("line", [b"delete noreply\r\n", b"delete noreplyfoo\r\n",
                                  b"incr noreply_k 1\r\n", b"touch noreply 10\r\n"])
def test_key_that_starts_with_noreply_is_a_key(line):
    """The key was taken for the noreply token and dropped from the wire."""
    req = parse_request(line)
    assert not req.noreply
    assert req.wire_line() == line


def test_noreply_twice_leaves_no_noreply_on_the_wire():
    req = parse_request(b"delete k noreply noreply\r\n")
    assert req.noreply
    check_wire(req)


@pytest.mark.parametrize("digits", [b"1" * 5000, b"0" * 5000 + b"5", b"9" * 11],
                         ids=["5000-digits", "leading-zeros", "11-digits"])
def test_huge_data_length_is_a_parse_error(digits):
    """int() of 4300+ digits raised ValueError out of the parser."""
    line = b"set k 0 0 " + digits + b"\r\n"
    if digits.lstrip(b"0") == b"5":
        assert parse_request(line).vlen == 7
    else:
        with pytest.raises(ParseError):
            parse_request(line)


@pytest.mark.parametrize("wire", [b"VALUE k 0 " + b"1" * 5000 + b"\r\n",
                                  b"VA " + b"1" * 5000 + b"\r\n",
                                  b"VALUE k 0 %d\r\n" % (MAX_VALUE_LENGTH + 1),
                                  b"VA 99999999999999999999\r\n"],
                         ids=["VALUE-5000-digits", "VA-5000-digits", "VALUE-over-max",
                              "VA-20-digits"])
def test_huge_reply_length_is_a_protocol_error(wire):
    with pytest.raises(BackendProtocolError) as e:
        parse_response(wire)
    assert e.value.reason == FAIL_PARSING


def test_reply_with_leading_zeros_in_length():
    res, end = parse_response(b"VA " + b"0" * 5000 + b"1\r\nx\r\n")
    assert res.value == b"x\r\n"


@pytest.mark.parametrize("line", [b"get a\nget b\r\n", b"mg a\nmg b v\r\n",
                                  b"set k 0 0 1\n\r\n"])
def test_line_with_a_newline_inside_is_a_parse_error(line):
    """Never from a client (lines end at ``\\n``), but mcp.request and route
    edits could make one: a backend would see two requests."""
    with pytest.raises(ParseError):
        parse_request(line)


def test_ms_past_the_token_cap_is_refused():
    """Found by the fuzzer: the flags past memcached's 24-token cap of an
    ``ms`` were never checked, and memcached refuses such a line before
    reading its payload (two replies for one request): it is not forwarded."""
    with pytest.raises(ParseError):
        parse_request(b"ms k 2 " + b"q " * 20 + b"v x 2`\r\n")


@pytest.mark.parametrize("line", [b"mg k q q\r\n", b"mg k q v q!\r\n", b"ms k 1 q q\r\n",
                                  b"mg k " + b"q " * 21 + b"v q\r\n"])
def test_a_repeated_quiet_flag_reaches_the_backend(line):
    """Found by the cache check: memcached answers a meta line that repeats
    ``q`` with ``CLIENT_ERROR duplicate flag`` (or, past its flag limit,
    ``options flags are too long``) and stores nothing (1.6.18); dropping
    every ``q`` sent it a line it obeyed. Such a line goes as it came: the
    error is never silenced, so it still gets one reply. (The last case is
    the fuzzer's: a ``q`` inside the capped last token once reached the
    backend, which then sent nothing for a miss.)"""
    req = parse_request(line)
    assert req.quiet and req.wire_line() == line
    check_wire(req)


@pytest.mark.parametrize("size", [MAX_LINE - 2, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1])
def test_long_reply_line_same_in_one_piece_and_byte_by_byte(size):
    """A line longer than MAX_LINE was accepted in one piece but refused
    when it arrived in small chunks."""
    wire = b"SERVER_ERROR " + b"x" * (size - len(b"SERVER_ERROR ")) + b"\r\n"
    one = read_one_piece(wire)
    assert read_chunks([wire[i:i + 1] for i in range(len(wire))])[:2] == one
    assert (one[1] is None) == (size + 1 <= MAX_LINE)


def test_client_meta_with_trailing_space_is_routed():
    routed, output, closed, _ = run_protocol([b"mg a \r\nmg b v \r\n"],
                                             frozenset((rq.CMD_MG,)))
    assert [line for line, _, _ in routed] == [b"mg a \r\n", b"mg b v \r\n"]
    assert output == b"<1>\r\n<2>\r\n" and not closed


def test_client_huge_length_is_a_parse_error():
    routed, output, closed, _ = run_protocol(
        [b"set k 0 0 " + b"1" * 5000 + b"\r\nget k\r\n"], frozenset((rq.CMD_GET,)))
    assert output == errors.PARSING_REQUEST + b"<1>\r\n" and not closed
