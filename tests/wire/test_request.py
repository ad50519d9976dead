"""The pure request parser (mcp-api.md section 2.1)."""

from __future__ import annotations

import pytest

from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.request import ParseError, parse_request


@pytest.mark.parametrize("line, command, key, vlen", [
    (b"get foo\r\n", rq.CMD_GET, b"foo", 0),
    (b"gets foo\r\n", rq.CMD_GETS, b"foo", 0),
    (b"gat 10 foo\r\n", rq.CMD_GAT, b"foo", 0),
    (b"gats 10 foo\r\n", rq.CMD_GATS, b"foo", 0),
    (b"set foo 1 2 3\r\n", rq.CMD_SET, b"foo", 5),
    (b"add foo 1 2 0\r\n", rq.CMD_ADD, b"foo", 2),
    (b"cas foo 1 2 3 99\r\n", rq.CMD_CAS, b"foo", 5),
    (b"append foo 0 0 1\r\n", rq.CMD_APPEND, b"foo", 3),
    (b"prepend foo 0 0 1\r\n", rq.CMD_PREPEND, b"foo", 3),
    (b"replace foo 0 0 1\r\n", rq.CMD_REPLACE, b"foo", 3),
    (b"incr foo 1\r\n", rq.CMD_INCR, b"foo", 0),
    (b"decr foo 1\r\n", rq.CMD_DECR, b"foo", 0),
    (b"touch foo 10\r\n", rq.CMD_TOUCH, b"foo", 0),
    (b"delete foo\r\n", rq.CMD_DELETE, b"foo", 0),
    (b"mg foo v t\r\n", rq.CMD_MG, b"foo", 0),
    (b"ms foo 2 T10\r\n", rq.CMD_MS, b"foo", 4),
    (b"md foo q\r\n", rq.CMD_MD, b"foo", 0),
    (b"ma foo D5\r\n", rq.CMD_MA, b"foo", 0),
    (b"me foo\r\n", rq.CMD_ME, b"foo", 0),
    (b"mn\r\n", rq.CMD_MN, b"", 0),
    (b"version\r\n", rq.CMD_VERSION, b"", 0),
    (b"stats proxy\r\n", rq.CMD_STATS, b"", 0),
    (b"quit\r\n", rq.CMD_QUIT, b"", 0),
    (b"watch proxyevents\r\n", rq.CMD_WATCH, b"", 0),
    (b"get a b c\r\n", rq.CMD_GET, b"a", 0),
    (b"set  spaced   0 0 1\r\n", rq.CMD_SET, b"spaced", 3),
    (b"get \x80\xff\xfe\r\n", rq.CMD_GET, b"\x80\xff\xfe", 0),
])
def test_commands(line, command, key, vlen):
    req = parse_request(line)
    assert (req.command, req.key, req.vlen) == (command, key, vlen)
    assert req.line == line


@pytest.mark.parametrize("line", [
    b"", b"\r\n", b"ge\r\n", b"GET foo\r\n", b"flurb foo\r\n", b"version\n",
    b"get foo\n", b"get foo", b"set foo 0 0\r\n", b"set foo 0 0 x\r\n",
    b"set foo 0 0 -1\r\n", b"set foo 0 0 99999999999\r\n", b"gat 10\r\n",
    b"ms foo\r\n", b"ms foo x\r\n", b"mg foo 1v\r\n", b"mg foo ~\r\n", b"mg\r\n",
    b"incr\r\n", b"slabs reassign\r\n", b"lru_crawler metadump\r\n",
    b"get\r\n", b"get \r\n", b"gets  \r\n",
])
def test_parse_errors(line):
    with pytest.raises(ParseError):
        parse_request(line)


@pytest.mark.parametrize("line", [
    b"set foo 0 0 12abc\r\n",
    b"set foo 0 0 -1\r\n",
    b"set foo 0 9223372036854775808 1\r\n",
    b"set foo 18446744073709551616 0 1\r\n",
    b"set foo 0 0 1 a b\r\n",
    b"set foo 0 0 1 noreply x\r\n",
    b"set foo x 0 1\r\n",
    b"set foo -1 0 1\r\n",
    b"set foo 0 x 1\r\n",
    b"set " + b"k" * 251 + b" 0 0 1\r\n",
    b"cas foo 0 0 1\r\n",
    b"cas foo 0 0 1 x\r\n",
    b"ms foo 2x\r\n",
    b"ms " + b"k" * 251 + b" 2\r\n",
    b"ms foo 2 " + b" ".join([b"T1"] * 30) + b"\r\n",
])
def test_storage_lines_memcached_would_refuse_are_not_forwarded(line):
    """memcached answers such a line with an error and then runs the payload
    as a command: two replies for one request, so the proxy refuses it."""
    with pytest.raises(ParseError):
        parse_request(line)


def test_storage_lines_memcached_accepts():
    assert parse_request(b"set foo 0 -1 0012\r\n").vlen == 14
    assert parse_request(b"set foo +7 +5 +12\r\n").vlen == 14
    assert parse_request(b"set foo -0 0 1\r\n").vlen == 3
    assert parse_request(b"set foo 4294967297 0 1 noreply\r\n").noreply
    assert parse_request(b"cas foo 0 0 1 99 noreply\r\n").vlen == 3


K251 = b"k" * 251


@pytest.mark.parametrize("line, reply, vlen", [
    # memcached reads up to a NUL: `set a` (ERROR), then the payload.
    (b"set a\x00b 0 0 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"ms a\x00b 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"get a\x00b\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"get a b\x00\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"mg a v O\x00\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"delete a\x00\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"stats \x00\r\n", errors.BAD_COMMAND_LINE, 0),
    # keys over 250 bytes, in every command
    (b"get " + K251 + b"\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"gets " + K251 + b"\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"gat 1 " + K251 + b"\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"set " + K251 + b" 0 0 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"ms " + K251 + b" 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"mg " + K251 + b" v\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"md " + K251 + b"\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"incr " + K251 + b" 1\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"touch " + K251 + b" 1\r\n", errors.BAD_COMMAND_LINE, 0),
    (b"delete " + K251 + b"\r\n", errors.BAD_COMMAND_LINE, 0),
    # ... in a line too long to route: memcached's proxy's answer
    (b"get " + b"k" * 500 + b"\r\n", errors.REQUEST_TOO_LONG, 0),
    (b"set " + b"k" * 500 + b" 0 0 1\r\n", errors.REQUEST_TOO_LONG, 0),
    # numbers safe_strto* refuse, token counts memcached refuses
    (b"set k 18446744073709551616 0 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"set k -1 0 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"set k 0 9223372036854775808 1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"cas k 0 0 1 -1\r\n", errors.BAD_COMMAND_LINE, 3),
    (b"set k 0 0 1 noreply foo\r\n", errors.ERROR, 3),
    (b"cas k 0 0 1\r\n", errors.ERROR, 3),
    (b"ms k 1 " + b" ".join([b"I"] * 17) + b"\r\n", errors.OPTIONS_TOO_LONG, 3),
    # lengths memcached's proxy cannot parse: its error, payload unknown
    (b"set k 0 0 -1\r\n", errors.PARSING_REQUEST, 0),
    (b"set k 0 0 1x\r\n", errors.PARSING_REQUEST, 0),
    (b"ms k 0x1\r\n", errors.PARSING_REQUEST, 0),
])
def test_refusals_carry_memcached_s_error_and_payload(line, reply, vlen):
    with pytest.raises(ParseError) as refused:
        parse_request(line)
    assert (refused.value.reply, refused.value.vlen) == (reply, vlen)


@pytest.mark.parametrize("line, reply", [
    (b"config get cluster\r\n", errors.ERROR),
    (b"frob\r\n", errors.ERROR),
    (b"GET k\r\n", errors.ERROR),
    (b"misbehave\r\n", errors.ERROR),
    (b"lru_crawler metadump all\r\n", errors.PARSING_REQUEST),
    (b"slabs reassign 1 2\r\n", errors.PARSING_REQUEST),
    (b"shutdown\r\n", errors.PARSING_REQUEST),
    (b"lru mode flat\r\n", errors.PARSING_REQUEST),
    (b"extstore x\r\n", errors.PARSING_REQUEST),
    (b"refresh_certs\r\n", errors.PARSING_REQUEST),
    (b"version\n", errors.PARSING_REQUEST),
])
def test_commands_not_served(line, reply):
    """A command nobody knows gets memcached's ``ERROR``; one memcached
    knows and the proxy does not serve gets memcached's proxy's answer.

    What the anchors answered: memcached 1.6.18 (the connection kept open)::

        config get cluster        ERROR
        frob                      ERROR
        GET k                     ERROR
        lru_crawler metadump all  END
        slabs reassign 1 2        NOSPARE source class has no spare pages
        shutdown                  ERROR: shutdown not enabled

    memcached's proxy 1.6.15 answers every one of them ``SERVER_ERROR
    parsing request`` (kept open); 1.6.45 closes the connection without a
    byte, whether or not a route is attached (``CMD_ANY`` too). A close
    drops what the client pipelined behind the line, so mcproxy keeps
    1.6.15's line. pylibmc's ElastiCache auto-discovery
    (``config get cluster``) falls back to plain gets on ``ERROR``.
    """
    with pytest.raises(ParseError) as refused:
        parse_request(line)
    assert (refused.value.reply, refused.value.vlen) == (reply, 0)


@pytest.mark.parametrize("line, vlen, noreply", [
    (b"set k 0 0 \t5\r\n", 7, False),       # strtol skips leading white space
    (b"set k 0 0 5\t\r\n", 7, False),       # and stops at trailing white space
    (b"set k 0 0 1 noreplyX\r\n", 3, False),  # noreply is the exact token
    (b"set k 0 0 1 foo\r\n", 3, False),       # memcached takes a sixth token
    (b"set k 18446744073709551615 0 1\r\n", 3, False),
    (b"set " + b"k" * 250 + b" 0 0 1\r\n", 3, False),
    (b"ms k 1 " + b" ".join([b"I"] * 16) + b"\r\n", 3, False),
])
def test_storage_lines_read_as_memcached_reads_them(line, vlen, noreply):
    req = parse_request(line)
    assert (req.vlen, req.noreply) == (vlen, noreply)


def test_noreply_is_exact_for_every_command():
    assert not parse_request(b"touch k 1 noreplyX\r\n").noreply
    assert not parse_request(b"incr k 1 noreply extra\r\n").noreply
    assert parse_request(b"delete k noreply\r\n").noreply


def test_token_caps():
    assert parse_request(b"get a b c\r\n").tokens == [b"get", b"a b c"]
    assert parse_request(b"gat 1 a b\r\n").tokens == [b"gat", b"1", b"a b"]
    assert parse_request(b"delete a 0 noreply x\r\n").tokens == [
        b"delete", b"a", b"0", b"noreply x"]


def test_noreply_is_removed_on_the_wire():
    req = parse_request(b"set k 0 0 1 noreply\r\n")
    req.value = b"x\r\n"
    assert req.noreply
    assert req.wire() == b"set k 0 0 1\r\nx\r\n"
    req = parse_request(b"delete k noreply\r\n")
    assert req.noreply and req.wire_line() == b"delete k\r\n"


def test_get_never_noreply():
    assert not parse_request(b"get noreply\r\n").noreply


def test_meta_quiet_flags_are_removed_on_the_wire():
    req = parse_request(b"mg qkey v q t\r\n")
    assert req.quiet
    assert req.wire_line() == b"mg qkey v t\r\n"
    req = parse_request(b"ms key 2 q T1\r\n")
    assert req.quiet and req.wire_line() == b"ms key 2 T1\r\n"


@pytest.mark.parametrize("line", [b"me a q b\r\n", b"me a q\r\n", b"me YQ== b q\r\n"])
def test_me_has_no_quiet_mode_and_goes_as_sent(line):
    """memcached's me reads only its first flag and answers also with q
    ("me a q b" looks "a" up, EN; "me a b" fails to decode it): a q is
    neither removed nor a reason to silence anything."""
    req = parse_request(line)
    assert not req.quiet and req.wire_line() == line


def test_unmodified_requests_are_forwarded_byte_for_byte():
    line = b"set  k   0 0 1\r\n"
    assert parse_request(line).wire_line() is not None
    assert parse_request(line).wire_line() == line


@pytest.mark.parametrize("line, keys, prefix", [
    (b"get a\r\n", None, b"get "),
    (b"get a b\r\n", [b"a", b"b"], b"get "),
    (b"get a \r\n", [b"a"], b"get "),
    (b"gets  a  b\r\n", [b"a", b"b"], b"gets  "),
    (b"gat 10 a b\r\n", [b"a", b"b"], b"gat 10 "),
])
def test_multiget(line, keys, prefix):
    req = parse_request(line)
    assert rq.split_multiget(req) == keys
    assert rq.multiget_prefix(req) == prefix


def test_command_constants_match_memcached():
    assert rq.COMMAND_CONSTANTS["CMD_MG"] == 1
    assert rq.COMMAND_CONSTANTS["CMD_PREPEND"] == 20
    assert rq.COMMAND_CONSTANTS["CMD_VERSION"] == 27
    assert rq.COMMAND_CONSTANTS["CMD_ANY"] == 36
    assert rq.COMMAND_CONSTANTS["CMD_ANY_STORAGE"] == 37


# -- runs of plain requests ------------------------------------------------------


def test_scan_plain_takes_plain_gets_and_sets_with_their_payloads():
    data = b"get a\r\nset b 1 2 3\r\nxyz\r\nget c\r\nmg d v\r\nget e\r\n"
    stop, keys, ends, sets, widths = rq.scan_plain(data, 0, True, 100)
    assert data[:stop] == b"get a\r\nset b 1 2 3\r\nxyz\r\nget c\r\n"
    assert keys == [b"a", b"b", b"c"] and sets == [1] and widths is None
    assert ends == [7, 25, 32]
    assert rq.scan_plain(data, stop, True, 100) == (stop, [], [], [], None)
    assert rq.scan_plain(data, 7, False, 100) == (7, [], [], [], None)


def test_scan_plain_takes_multigets_when_asked():
    data = b"get a\r\nget b c\r\nget d\r\nget e f g\r\nget h i \r\n"
    assert rq.scan_plain(data, 0, True, 100)[:2] == (7, [b"a"])
    stop, keys, ends, sets, widths = rq.scan_plain(data, 0, True, 100, multigets=3)
    assert data[stop:] == b"get h i \r\n"  # a trailing space: not plain
    assert keys == [b"a", b"b c", b"d", b"e f g"] and widths == {1: 2, 3: 3}
    assert ends == [7, 16, 23, 34] and sets == []
    assert rq.scan_plain(data, 0, True, 100, multigets=2)[1:] == ([b"a", b"b c", b"d"],
                                                                 [7, 16, 23], [], {1: 2})
    key = b"k" * rq.MAX_KEY_LENGTH
    assert rq.scan_plain(b"get %s %s\r\n" % (key, key), 0, True, 100,
                         multigets=2)[1] == [key + b" " + key]
    for line in (b"get a %sk\r\n" % key, b"get %sk a\r\n" % key, b"get a  b\r\n",
                 b"get a b\n", b"get a b", b"gets a b\r\n"):
        assert rq.scan_plain(line, 0, True, 100, multigets=2)[1] == [], line


@pytest.mark.parametrize("data", [
    b"get a b\r\n",  # a multiget
    b"get a\n",  # no CR
    b"get a",  # incomplete
    b"get \r\n",
    b"gets a\r\n",
    b"set a 0 0 3\r\nxy",  # payload incomplete
    b"set a 0 0 3\r\nxyzab",  # payload without CRLF
    b"set a 0 0 3 noreply\r\nxyz\r\n",
    b"set a 0 0 101\r\n" + b"x" * 101 + b"\r\n",  # over max_payload
    b"get " + b"k" * 495 + b"\r\n",  # 501 bytes: too long to route
    b"set " + b"k" * 251 + b" 0 0 1\r\nx\r\n",
])
def test_scan_plain_stops_before_anything_else(data):
    assert rq.scan_plain(b"get x\r\n" + data, 0, True, 100) == (7, [b"x"], [7], [], None)


def test_scan_plain_longest_line_and_limit():
    longest = b"get " + b"k" * 250 + b"\r\n"  # the longest key
    assert rq.scan_plain(longest, 0, True, 100)[1] == [b"k" * 250]
    assert rq.scan_plain(b"get k\r\nget " + K251 + b"\r\n", 0, True, 100)[1] == [b"k"]
    assert rq.scan_plain(b"get k\r\nget a\x00\r\n", 0, True, 100)[1] == [b"k"]
    assert rq.scan_plain(b"get k" + longest[4:], 0, True, 100)[1] == []
    stop, keys, _, _, _ = rq.scan_plain(b"get x\r\n" * 10, 0, True, 100, limit=4)
    assert stop == 28 and len(keys) == 4


@pytest.mark.parametrize(("line", "index", "token"), [
    (b"get k\r\n", 2, b"a b"),
    (b"gets k\r\n", 2, b"a b c"),
    (b"gat 10 k\r\n", 3, b"x y"),
    (b"gats 10 k\r\n", 3, b" x y"),
    (b"get k\r\n", 1, b"get a"),
])
def test_an_edit_that_makes_a_get_of_more_keys_is_refused(line, index, token):
    """memcached would answer every key of the edited line, where the proxy
    awaits the reply of the one it sent: the backend's replies would go out
    of step for every request behind it."""
    req = parse_request(line)
    with pytest.raises(rq.EditError, match="malformed after edit"):
        rq.set_token(req, index, token)
    assert req.line == line


@pytest.mark.parametrize(("line", "index", "token", "edited"), [
    (b"get k\r\n", 2, b"a", b"get a\r\n"),
    (b"get k\r\n", 1, b"gets", b"gets k\r\n"),
    (b"gat 10 k\r\n", 3, b"x", b"gat 10 x\r\n"),
    (b"get  k\r\n", 2, b"z", b"get z\r\n"),
    (b"get k\r\n", 2, b"a\tb", b"get a\tb\r\n"),  # memcached splits on spaces only
])
def test_an_edit_of_a_get_with_as_many_keys_goes_through(line, index, token, edited):
    req = parse_request(line)
    rq.set_token(req, index, token)
    assert req.line == edited


@pytest.mark.parametrize("sent, value", [
    (b"get foo\r\n", None),
    (b"set foo 5 0 3\r\nabc\r\n", b"abc\r\n"),
    (b"set foo 0 0 0\r\n\r\n", b"\r\n"),
])
def test_a_request_from_what_was_sent_is_its_parse(sent, value):
    """sent_request and KeyRequests made from what was sent give the Request
    parse_request gives for the line, with a set's payload."""
    line = sent[:sent.index(b"\n") + 1]
    want = parse_request(line)
    for req in (rq.sent_request(sent), rq.KeyRequests(rq.CMD_GET, [b"foo"], False, [0] if value
                                                      else None, [sent]).request(0)):
        assert (req.command, req.line, req.tokens, req.key, req.value) == (
            want.command, want.line, want.tokens, want.key, value)
