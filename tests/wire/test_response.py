"""Backend reply parsing (mcp-api.md 3.4) and what clients receive (2.7, 2.8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import parse_request
from mcproxy.wire.response import (
    BACKEND_FAILURE,
    FAIL_MISSINGEND,
    FAIL_PARSING,
    FAIL_UNHANDLEDRES,
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
    MCMC_CODE_VERSION,
    MCMC_CODES,
    MCMC_RESP_END,
    MCMC_RESP_ERRMSG,
    MCMC_RESP_GENERIC,
    MCMC_RESP_GET,
    MCMC_RESP_META,
    MCMC_RESP_NUMERIC,
    BackendProtocolError,
    Response,
    client_bytes,
    every_key,
    key_reply,
    parse_response,
)

#: every test with the compiled framing loops and with pure Python alone
pytestmark = pytest.mark.usefixtures("framing")

# wire bytes, code, type, hit, value
TABLE = [
    (b"2\r\n", MCMC_CODE_OK, MCMC_RESP_NUMERIC, True, None),
    (b"18446744073709551615\r\n", MCMC_CODE_OK, MCMC_RESP_NUMERIC, True, None),
    (b"EN\r\n", MCMC_CODE_END, MCMC_RESP_META, False, None),
    (b"HD\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, None),
    (b"HD c123 t-1\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, None),
    (b"NF\r\n", MCMC_CODE_NOT_FOUND, MCMC_RESP_META, True, None),
    (b"NS\r\n", MCMC_CODE_NOT_STORED, MCMC_RESP_META, True, None),
    (b"EX\r\n", MCMC_CODE_EXISTS, MCMC_RESP_META, True, None),
    (b"MN\r\n", MCMC_CODE_NOP, MCMC_RESP_META, True, None),
    (b"ME k exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n",
     MCMC_CODE_OK, MCMC_RESP_META, True, None),
    (b"VA 2 t-1\r\nhi\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, b"hi\r\n"),
    (b"VA 0\r\n\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, b"\r\n"),
    (b"VA 4 f5\r\na\r\nb\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, b"a\r\nb\r\n"),
    (b"OK\r\n", MCMC_CODE_OK, MCMC_RESP_GENERIC, True, None),
    (b"ZZ flag\r\n", MCMC_CODE_OK, MCMC_RESP_META, True, None),
    (b"END\r\n", MCMC_CODE_END, MCMC_RESP_END, False, None),
    (b"STORED\r\n", MCMC_CODE_STORED, MCMC_RESP_GENERIC, True, None),
    (b"EXISTS\r\n", MCMC_CODE_EXISTS, MCMC_RESP_GENERIC, True, None),
    (b"DELETED\r\n", MCMC_CODE_DELETED, MCMC_RESP_GENERIC, True, None),
    (b"TOUCHED\r\n", MCMC_CODE_TOUCHED, MCMC_RESP_GENERIC, True, None),
    (b"NOT_FOUND\r\n", MCMC_CODE_NOT_FOUND, MCMC_RESP_GENERIC, True, None),
    (b"NOT_STORED\r\n", MCMC_CODE_NOT_STORED, MCMC_RESP_GENERIC, True, None),
    (b"ERROR\r\n", MCMC_CODE_ERROR, MCMC_RESP_ERRMSG, True, None),
    (b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
     MCMC_CODE_CLIENT_ERROR, MCMC_RESP_ERRMSG, True, None),
    (b"SERVER_ERROR out of memory storing object\r\n",
     MCMC_CODE_SERVER_ERROR, MCMC_RESP_ERRMSG, True, None),
]

GETS = [
    (b"VALUE /foo/num 0 1\r\n", b"1\r\n"),
    (b"VALUE k 4294967295 5 1234567\r\n", b"he\r\no\r\n"),
    (b"VALUE k 0 0\r\n", b"\r\n"),
    (b"VALUE k 0 000000002\r\n", b"ab\r\n"),
    (b"VALUE k 0 0000000000002\r\n", b"ab\r\n"),
]


def test_code_numbers_are_mcmcs():
    assert MCMC_CODES == {
        "MCMC_CODE_STORED": 8, "MCMC_CODE_EXISTS": 9, "MCMC_CODE_DELETED": 10,
        "MCMC_CODE_TOUCHED": 11, "MCMC_CODE_VERSION": 12,
        "MCMC_CODE_NOT_FOUND": 13, "MCMC_CODE_NOT_STORED": 14,
        "MCMC_CODE_OK": 15, "MCMC_CODE_NOP": 16, "MCMC_CODE_END": 17,
        "MCMC_CODE_ERROR": 21, "MCMC_CODE_CLIENT_ERROR": 22,
        "MCMC_CODE_SERVER_ERROR": 23, "MCMC_ERR": -1,
    }


@pytest.mark.parametrize(("wire", "code", "rtype", "hit", "value"), TABLE)
def test_single_replies(wire, code, rtype, hit, value):
    res, end = parse_response(wire)
    assert end == len(wire)
    assert (res.ok, res.code, res.type, res.hit, res.value) == (True, code, rtype,
                                                                 hit, value)
    assert res.line == (wire if value is None else wire[:-len(value)])
    assert res.vlen == (0 if value is None else len(value) - 2)


@pytest.mark.parametrize(("line", "value"), GETS)
def test_value_then_end(line, value):
    wire = line + value + b"END\r\n"
    res, end = parse_response(wire)
    assert end == len(wire)
    assert (res.code, res.type, res.hit) == (MCMC_CODE_OK, MCMC_RESP_GET, True)
    assert (res.line, res.value) == (line, value)


def test_parses_from_offset_and_stops_at_reply_end():
    wire = b"STORED\r\nVALUE k 0 1\r\na\r\nEND\r\nEN\r\n"
    first, pos = parse_response(wire)
    second, pos = parse_response(wire, pos)
    third, pos = parse_response(wire, pos)
    assert [first.line, second.line, third.line] == [
        b"STORED\r\n", b"VALUE k 0 1\r\n", b"EN\r\n"]
    assert pos == len(wire)
    assert parse_response(wire, pos) is None


def test_version_only_when_asked():
    with pytest.raises(BackendProtocolError) as e:
        parse_response(b"VERSION 1.6.18\r\n")
    assert e.value.reason == FAIL_UNHANDLEDRES
    res, _ = parse_response(b"VERSION 1.6.18\r\n", version=True)
    assert res.code == MCMC_CODE_VERSION
    assert res.line == b"VERSION 1.6.18\r\n"


def test_bytearray_gives_bytes():
    res, _ = parse_response(bytearray(b"VA 1\r\nx\r\n"))
    assert type(res.line) is bytes and type(res.value) is bytes


@pytest.mark.parametrize("wire", [w for w, *_ in TABLE]
                         + [line + value + b"END\r\n" for line, value in GETS])
def test_every_prefix_is_incomplete(wire):
    for cut in range(len(wire)):
        assert parse_response(wire[:cut]) is None


@pytest.mark.parametrize(("wire", "reason"), [
    (b"STAT pid 1\r\n", FAIL_UNHANDLEDRES),
    (b"VERSION 1.6.18\r\n", FAIL_UNHANDLEDRES),
    (b"\r\n", FAIL_PARSING),
    (b"X\r\n", FAIL_PARSING),
    (b"STORED\n", FAIL_PARSING),
    (b"\n", FAIL_PARSING),
    (b"BOGUS\r\n", FAIL_PARSING),
    (b" STORED\r\n", FAIL_PARSING),
    (b"VA\r\n", FAIL_PARSING),
    (b"VA x\r\n", FAIL_PARSING),
    (b"VA -1\r\n", FAIL_PARSING),
    (b"VA 2\r\nhiXX", FAIL_PARSING),
    (b"VALUE\r\n", FAIL_PARSING),
    (b"VALUE k 0\r\n", FAIL_PARSING),
    (b"VALUE k x 1\r\n", FAIL_PARSING),
    (b"VALUE k 0 +1\r\n", FAIL_PARSING),
    (b"VALUE k 0 1 2 3\r\n", FAIL_PARSING),
    (b"VALUE k 0 1 x\r\n", FAIL_PARSING),
    # Sizes no request could ask for: nine digits are taken as they are,
    # longer ones checked against MAX_VALUE_LENGTH.
    (b"VALUE k 0 2147483646\r\n", FAIL_PARSING),
    (b"VALUE k 0 9999999999\r\n", FAIL_PARSING),
    (b"VALUE k 0 00000000002147483646\r\n", FAIL_PARSING),
    (b"VALUE k 0 1\r\nabEND\r\n", FAIL_PARSING),
    (b"VALUE k 0 1\r\na\r\nVALUE j 0 1\r\nb\r\nEND\r\n", FAIL_MISSINGEND),
    (b"VALUE k 0 1\r\na\r\nSTORED\r\n", FAIL_MISSINGEND),
    (b"VALUE k 0 1\r\na\r\nX", FAIL_MISSINGEND),
    pytest.param(b"x" * (MAX_LINE + 1), FAIL_PARSING, id="line-too-long"),
])
def test_garbage(wire, reason):
    with pytest.raises(BackendProtocolError) as e:
        parse_response(wire)
    assert e.value.reason == reason
    reader = ResponseReader()
    with pytest.raises(BackendProtocolError):
        for byte in range(len(wire)):
            if reader.feed(wire[byte:byte + 1]):
                while reader.read() is not None:
                    pass


STREAM = (b"".join(w for w, *_ in TABLE)
          + b"".join(line + value + b"END\r\n" for line, value in GETS))


def read_all(reader: ResponseReader) -> list[tuple]:
    out = []
    while (res := reader.read()) is not None:
        out.append((res.code, res.type, res.line, res.value))
    return out


def parse_in_chunks(chunks) -> list[tuple]:
    reader = ResponseReader()
    out = []
    for chunk in chunks:
        if reader.feed(chunk):
            out.extend(read_all(reader))
    assert reader.buffered == 0
    return out


def test_byte_at_a_time_equals_one_piece():
    whole = parse_in_chunks([STREAM])
    assert len(whole) == len(TABLE) + len(GETS)
    assert parse_in_chunks([STREAM[i:i + 1] for i in range(len(STREAM))]) == whole


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split_equals_one_piece(cuts):
    cuts = sorted(set(cuts))
    bounds = [0, *cuts, len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert parse_in_chunks(chunks) == parse_in_chunks([STREAM])


def test_reader_buffered_counts_unreturned_bytes():
    reader = ResponseReader()
    reader.feed(b"STORED\r\nVALUE k 0 3\r\nab")
    assert reader.buffered == 23
    assert reader.read().code == MCMC_CODE_STORED
    assert reader.read() is None
    assert reader.buffered == 15
    assert not reader.feed(b"c")
    assert reader.feed(b"\r\nEND\r\nEN")
    assert reader.read().value == b"abc\r\n"
    assert reader.read() is None
    assert reader.buffered == 2


MB = 1 << 20


@pytest.mark.parametrize("meta", [False, True])
def test_one_megabyte_value(meta):
    value = bytes(range(256)) * (MB // 256) + b"\r\n"
    line = b"VA %d t-1\r\n" % MB if meta else b"VALUE big 0 %d\r\n" % MB
    wire = line + value + (b"" if meta else b"END\r\n") + b"HD\r\n"
    res, end = parse_response(wire)
    assert (res.line, res.value, res.vlen) == (line, value, MB)
    assert parse_response(wire, end)[0].line == b"HD\r\n"

    reader = ResponseReader()
    fed = 0
    step = 65536
    for pos in range(0, len(wire), step):
        ready = reader.feed(wire[pos:pos + step])
        fed += 1
        # Only the chunk that completes the value needs parsing.
        if pos + step < len(line) + len(value):
            assert not ready or fed == 1
        if ready:
            got = reader.read()
            if got is not None:
                assert got.value == value
                assert reader.read().line == b"HD\r\n"
    assert reader.buffered == 0


def test_one_megabyte_value_byte_at_a_time_is_linear():
    value = b"v" * MB + b"\r\n"
    wire = b"VALUE big 0 %d\r\n" % MB + value + b"END\r\n"
    reader = ResponseReader()
    results = []
    for i in range(len(wire)):
        if reader.feed(wire[i:i + 1]):
            while (res := reader.read()) is not None:
                results.append(res)
    assert [r.value for r in results] == [value]


# client_bytes


def request(line: bytes, multiget: bool = False):
    req = parse_request(line)
    req.multiget = multiget
    return req


def reply(wire: bytes, version: bool = False) -> Response:
    return parse_response(wire, version=version)[0]


GET = request(b"get k\r\n")
SUBGET = request(b"get k\r\n", multiget=True)
SET_NOREPLY = request(b"set k 0 0 1 noreply\r\n")
DELETE_NOREPLY = request(b"delete k noreply\r\n")
MG_QUIET = request(b"mg k v q\r\n")
MS_QUIET = request(b"ms k 2 q\r\n")
MD_QUIET = request(b"md k q\r\n")
MA_QUIET = request(b"ma k q v\r\n")
MG = request(b"mg k v\r\n")


def test_failure_response():
    res = Response.failure("timeout")
    assert (res.ok, res.hit, res.reason, res.code) == (False, False, "timeout",
                                                       MCMC_CODE_SERVER_ERROR)


@pytest.mark.parametrize("req", [GET, SUBGET, SET_NOREPLY, MG_QUIET, MS_QUIET, MG])
def test_failure_always_reaches_client(req):
    assert client_bytes(Response.failure("disconnected"), req) == BACKEND_FAILURE
    assert BACKEND_FAILURE == b"SERVER_ERROR backend failure\r\n"


def test_value_hit_gets_end_unless_multiget():
    res = reply(b"VALUE k 0 2 77\r\nhi\r\nEND\r\n")
    assert client_bytes(res, GET) == b"VALUE k 0 2 77\r\nhi\r\nEND\r\n"
    assert client_bytes(res, SUBGET) == b"VALUE k 0 2 77\r\nhi\r\n"


def test_miss_is_end_or_nothing_in_multiget():
    res = reply(b"END\r\n")
    assert client_bytes(res, GET) == b"END\r\n"
    assert client_bytes(res, SUBGET) == b""


@pytest.mark.parametrize("wire", [b"STORED\r\n", b"NOT_STORED\r\n",
                                  b"CLIENT_ERROR bad\r\n", b"SERVER_ERROR x\r\n",
                                  b"DELETED\r\n", b"NOT_FOUND\r\n"])
def test_noreply_suppresses_every_backend_reply(wire):
    assert client_bytes(reply(wire), SET_NOREPLY) == b""
    assert client_bytes(reply(wire), DELETE_NOREPLY) == b""


@pytest.mark.parametrize(("wire", "req", "sent"), [
    (b"EN\r\n", MG_QUIET, b""),
    (b"HD\r\n", MS_QUIET, b""),
    # an mg hit is sent in quiet mode (memcached 1.6.18, and 1.6.45's proxy)
    (b"HD c5\r\n", MG_QUIET, b"HD c5\r\n"),
    (b"HD\r\n", MD_QUIET, b""),
    (b"NF\r\n", MD_QUIET, b"NF\r\n"),
    (b"EX\r\n", MD_QUIET, b"EX\r\n"),
    # every success of ma, its number too; its miss is sent
    (b"HD\r\n", MA_QUIET, b""),
    (b"VA 1\r\n7\r\n", MA_QUIET, b""),
    (b"NF\r\n", MA_QUIET, b"NF\r\n"),
    (b"NS\r\n", MS_QUIET, b"NS\r\n"),
    (b"NF\r\n", MS_QUIET, b"NF\r\n"),
    (b"EX\r\n", MS_QUIET, b"EX\r\n"),
    (b"SERVER_ERROR out of memory\r\n", MS_QUIET, b"SERVER_ERROR out of memory\r\n"),
    (b"CLIENT_ERROR bad\r\n", MS_QUIET, b"CLIENT_ERROR bad\r\n"),
    (b"VA 2 f1\r\nhi\r\n", MG_QUIET, b"VA 2 f1\r\nhi\r\n"),
    (b"EN\r\n", MG, b"EN\r\n"),
    (b"HD\r\n", MG, b"HD\r\n"),
])
def test_meta_quiet(wire, req, sent):
    assert client_bytes(reply(wire), req) == sent


@pytest.mark.parametrize("wire", [w for w, *_ in TABLE if w not in (b"END\r\n",)])
def test_other_replies_pass_through(wire):
    assert client_bytes(reply(wire), MG) == wire


# key_reply, every_key: what a key of a client multiget gets


@pytest.mark.parametrize(("res", "sent"), [
    (reply(b"VALUE k 0 2 77\r\nhi\r\nEND\r\n"), b"VALUE k 0 2 77\r\nhi\r\n"),
    (reply(b"END\r\n"), b""),
    (reply(b"EN\r\n"), b"EN\r\n"),
    (reply(b"SERVER_ERROR out of memory\r\n"), b"SERVER_ERROR out of memory\r\n"),
    (Response.failure("timeout"), BACKEND_FAILURE),
])
def test_key_reply_is_what_client_bytes_gives_a_key_of_a_multiget(res, sent):
    assert key_reply(res) == sent == client_bytes(res, SUBGET)


def test_every_key_gives_each_key_the_line_then_end():
    assert every_key(BACKEND_FAILURE, 3) == BACKEND_FAILURE * 3 + b"END\r\n"
    assert every_key(b"ERROR\r\n", 1) == b"ERROR\r\nEND\r\n"


#: A multi-key get's reply: values the fast loop takes (with and without
#: cas, empty, leading zeros, a CR inside) and ones it leaves to read().
MULTI_VALUES = (b"VALUE a 0 3\r\nabc\r\nVALUE b 5 0 99\r\n\r\n"
                b"VALUE c 0 002\r\nx\r\r\nVALUE d 0 000000000001\r\n1\r\n"
                b"VALUE " + b"k" * 250 + b" 4294967295 2\r\nzz\r\n")


def read_multi_item_by_item(reader):
    values = []
    while True:
        res = reader.read(multi=True)
        if res is None or res.type != MCMC_RESP_GET:
            return values, res
        values.append(res)


#: the keys of MULTI_VALUES's get, with misses before, among and after them
MULTI_KEYS = [b"m", b"a", b"b", b"m", b"c", b"d", b"d", b"k" * 250, b"m"]


@pytest.mark.parametrize("end", [b"END\r\n", b"SERVER_ERROR out of memory\r\n"])
def test_read_aligned_equals_reading_item_by_item(end):
    """Arriving in any pieces, the fast loop gives what read() gives: each
    key's item, or None for a miss, in the keys' order."""
    stream = MULTI_VALUES + end + b"STORED\r\n"
    for size in (1, 7, len(stream)):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        for fast in (True, False):
            reader = ResponseReader()
            parts, res, fed = [], None, 0
            for chunk in chunks:
                fed += 1
                if reader.feed(chunk):
                    if fast:
                        res = reader.read_aligned(MULTI_KEYS, parts)
                    else:
                        got, res = read_multi_item_by_item(reader)
                        parts += [v.line + v.value for v in got]
                if res is not None:
                    break
            items = [(Response.of_item(p).line, Response.of_item(p).value)
                     for p in parts if p is not None]
            assert items == [
                (b"VALUE a 0 3\r\n", b"abc\r\n"), (b"VALUE b 5 0 99\r\n", b"\r\n"),
                (b"VALUE c 0 002\r\n", b"x\r\r\n"),
                (b"VALUE d 0 000000000001\r\n", b"1\r\n"),
                (b"VALUE " + b"k" * 250 + b" 4294967295 2\r\n", b"zz\r\n"),
            ], (size, fast)
            if fast:
                hits = [False, True, True, False, True, True, False, True]
                if end == b"END\r\n":  # the misses after the last value too
                    hits.append(False)
                assert [p is not None for p in parts] == hits, size
            assert res.line == end
            for chunk in chunks[fed:]:  # and the reader is at the next reply
                reader.feed(chunk)
            assert reader.read().line == b"STORED\r\n", (size, fast)


@pytest.mark.parametrize("wire", [b"VALUE x 0 1\r\na\r\nEND\r\n",
                                  b"VALUE b 0 1\r\nb\r\nVALUE a 0 1\r\na\r\nEND\r\n",
                                  b"VALUE a 0 1\r\na\r\nVALUE a 0 1\r\na\r\nEND\r\n",
                                  b"VALUE a 0 2 9\r\nab\r\nVALUE x 0 2 9\r\nab\r\nEND\r\n"])
def test_read_aligned_refuses_keys_out_of_order(wire):
    """A value of a key not asked for, asked for once but answered twice,
    or out of order, is another request's reply."""
    reader = ResponseReader()
    reader.feed(wire)
    with pytest.raises(BackendProtocolError):
        reader.read_aligned([b"a", b"b"], [])


@pytest.mark.parametrize("wire", [b"VALUE a 0 2\r\nabc\r\nEND\r\n", b"VALUE a 0 x\r\n",
                                  b"VALUE a 0 1\r\n" + b"x" * (MAX_LINE + 10)])
def test_read_aligned_refuses_what_read_refuses(wire):
    reader = ResponseReader()
    reader.feed(wire)
    with pytest.raises(BackendProtocolError):
        reader.read_aligned([b"a"], [])
