"""The two wire behaviours as data, and the parser's mark on lines whose
command the proxy does not serve (what 1.6.45 closes on)."""

from __future__ import annotations

import pytest

from mcproxy.wire import errors
from mcproxy.wire.behaviour import BEHAVIOURS, WIRE_1_6_15, WIRE_1_6_45
from mcproxy.wire.request import ParseError, parse_request


def test_the_words_of_each_release():
    assert WIRE_1_6_15.reply(errors.PARSING_REQUEST) == b"SERVER_ERROR parsing request\r\n"
    assert WIRE_1_6_15.reply(errors.KEY_TOO_LONG) == b"SERVER_ERROR key too long\r\n"
    assert WIRE_1_6_45.reply(errors.PARSING_REQUEST) == b"CLIENT_ERROR parsing request\r\n"
    assert WIRE_1_6_45.reply(errors.KEY_TOO_LONG) == b"CLIENT_ERROR key too long\r\n"
    # memcached's own answers, which the proxy gives in its place, are the same in both
    for line in (errors.BAD_COMMAND_LINE, errors.OPTIONS_TOO_LONG, errors.ERROR,
                 errors.BAD_DATA_CHUNK, errors.OBJECT_TOO_LARGE):
        assert WIRE_1_6_15.reply(line) == WIRE_1_6_45.reply(line) == line


def test_what_each_release_accepts_and_closes_on():
    assert (WIRE_1_6_15.bare_lf, WIRE_1_6_15.close_refused) == (False, False)
    assert (WIRE_1_6_45.bare_lf, WIRE_1_6_45.close_refused) == (True, True)
    assert BEHAVIOURS == {"1.6.15": WIRE_1_6_15, "1.6.45": WIRE_1_6_45}


@pytest.mark.parametrize("line", [
    b"bogus\r\n", b"xy\r\n", b"GET k\r\n", b"g\x00et k\r\n", b" get k\r\n", b"get\tk\r\n",
    b"shutdown\r\n", b"slabs reassign 1 2\r\n",
])
def test_unknown_commands_are_marked(line):
    with pytest.raises(ParseError) as refused:
        parse_request(line)
    assert refused.value.unknown


@pytest.mark.parametrize("line", [
    b"x\r\n", b"\r\n", b"get\r\n", b"set k 0 0 -1\r\n", b"set k 0 0 1 noreply foo\r\n",
    b"get k\x00\r\n", b"get " + b"k" * 251 + b"\r\n", b"get k\n",
])
def test_other_refusals_are_not(line):
    with pytest.raises(ParseError) as refused:
        parse_request(line)
    assert not refused.value.unknown


@pytest.mark.parametrize("line", [b"incr k\r\n", b"decr k \r\n", b"touch k\r\n", b"incr  1\r\n"])
def test_lines_memcached_answers_and_1_6_45_cannot_parse(line):
    with pytest.raises(ParseError) as refused:
        parse_request(line)
    assert refused.value.reply == errors.ERROR and refused.value.strict
    assert WIRE_1_6_15.refusal(refused.value) == b"ERROR\r\n"
    assert WIRE_1_6_45.refusal(refused.value) == b"CLIENT_ERROR parsing request\r\n"


def test_delete_needs_only_its_key():
    assert parse_request(b"delete k\r\n").key == b"k"
