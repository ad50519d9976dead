"""The units of keys whose routes run in Lua (mcproxy.units KeyFetch and
ReplyRun, engine._LuaKeys): what they write, what each key gets, how they
fail, and what they drop for a client that is gone."""

from __future__ import annotations

import pytest

from mcproxy.units import KeyFetch, ReplyRun, Unit
from mcproxy.wire.errors import BACKEND_FAILURE, END
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.response import MCMC_CODE_END, BackendProtocolError
from tests.units.test_units import Got, Sink, answer, written


def value(key: bytes, data: bytes) -> bytes:
    return b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(data), data)


def test_both_kinds_have_the_unit_shape():
    for unit in (KeyFetch(b"get", [b"a"], Got()), ReplyRun([b"a"], Got())):
        unit.sent = 1.0
        assert isinstance(unit, Unit), unit


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_key_fetch_gives_each_key_its_answer(chunk):
    fetch = KeyFetch(b"gets", [b"a", b"b", b"a", b"c"], Got())
    assert written([fetch]) == [b"gets a b a c\r\n"]
    assert answer([fetch], value(b"a", b"1") * 2 + value(b"c", b"3") + END, chunk) == []
    assert fetch.done == [fetch]
    assert fetch.flags() == bytes([2, 1, 2, 2])
    assert fetch.parts == [value(b"a", b"1"), b"", value(b"a", b"1"), value(b"c", b"3")]
    hit, miss = fetch.response(0), fetch.response(1)
    assert (hit.ok, hit.hit, hit.line, hit.value, hit.elapsed) == (
        True, True, b"VALUE a 0 1\r\n", b"1\r\n", 7)
    assert (miss.ok, miss.hit, miss.code) == (True, False, MCMC_CODE_END)
    assert fetch.response(0) is hit  # made once
    assert fetch.value_bytes() == 3 * len(value(b"a", b"1"))


def test_key_fetch_error_line_and_failure_answer_every_key():
    fetch = KeyFetch(b"get", [b"a", b"b"], Got())
    answer([fetch], b"SERVER_ERROR out of memory\r\n")
    assert fetch.flags() == bytes([2, 2])
    assert fetch.parts == [b"SERVER_ERROR out of memory\r\n"] * 2
    failed = KeyFetch(b"get", [b"a", b"b"], Got())
    failed.fail("timeout", 9)
    assert failed.done == [failed] and failed.flags() == bytes([0, 0])
    assert failed.parts == [BACKEND_FAILURE] * 2
    assert failed.response(1).reason == "timeout" and failed.response(1).elapsed == 9


def test_key_fetch_refuses_a_key_out_of_order():
    fetch = KeyFetch(b"get", [b"a", b"b"], Got())
    with pytest.raises(BackendProtocolError):
        answer([fetch], value(b"b", b"2") + value(b"a", b"1") + END)
    assert fetch.done == []


def test_key_fetch_for_a_client_gone_drops_values_but_checks_keys():
    sink = Sink(limit=0)
    sink.arriving(1)
    fetch = KeyFetch(b"get", [b"a", b"b"], Got(), sink)
    answer([fetch], value(b"a", b"1") + END)
    assert fetch.flags() == bytes([1, 1]) and fetch.parts == [b"", b""]
    with pytest.raises(BackendProtocolError):
        answer([KeyFetch(b"get", [b"a"], Got(), sink)], value(b"z", b"1") + END)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_get_run_writes_and_reads_each_get_as_alone(chunk):
    run = ReplyRun([b"a", b"b", b"a"], Got())
    assert written([run]) == [b"get a\r\nget b\r\nget a\r\n"]
    assert answer([run], value(b"a", b"1") + END + END + b"SERVER_ERROR busy\r\n", chunk) == []
    assert run.done == [run] and run.flags() == bytes([2, 1, 2])
    assert [run.reply(i) for i in range(3)] == [value(b"a", b"1") + END, END,
                                                 b"SERVER_ERROR busy\r\n"]
    assert [run.response(i).line for i in range(3)] == [b"VALUE a 0 1\r\n", END,
                                                         b"SERVER_ERROR busy\r\n"]
    hit = run.response(0)
    assert (hit.ok, hit.hit, hit.value, hit.elapsed) == (True, True, b"1\r\n", 7)
    assert run.response(0) is hit  # made once
    assert run.parts == [value(b"a", b"1"), b"", b"SERVER_ERROR busy\r\n"]
    assert run.value_bytes() == len(value(b"a", b"1") + END + END + b"SERVER_ERROR busy\r\n")


def test_get_run_reads_the_replies_the_fast_framing_leaves_to_the_parser():
    # a VALUE with a cas, a reply split before its END: framed by _parse
    run = ReplyRun([b"a", b"b"], Got())
    answer([run], b"VALUE a 0 1 5\r\n1\r\nEND\r\nCLIENT_ERROR bad\r\n", 3)
    assert run.flags() == bytes([2, 2])
    assert run.reply(0) == b"VALUE a 0 1 5\r\n1\r\nEND\r\n"
    assert run.response(1).line == b"CLIENT_ERROR bad\r\n"


def test_get_run_counts_what_is_left_while_read_and_fails_only_that():
    run = ReplyRun([b"a", b"b", b"c"], Got())
    reader = ResponseReader()
    reader.feed(END + value(b"b", b"2"))
    assert not run.read(reader)
    assert run.size == 2  # b's reply is not whole: what a reset now fails
    run.fail("disconnected", 3)
    assert run.flags() == bytes([1, 0, 0])
    assert [run.reply(i) for i in range(3)] == [END, BACKEND_FAILURE, BACKEND_FAILURE]
    assert [run.response(i).ok for i in range(3)] == [True, False, False]
    assert run.response(2).reason == "disconnected" and run.response(2).elapsed == 3
    done = ReplyRun([b"a"], Got())
    answer([done], END)
    assert done.size == 1  # once read: each request a latency sample


@pytest.mark.parametrize("reply", [
    END + value(b"a", b"1") + END,        # b's reply is a's value
    b"STORED\r\n",                        # a set's reply
    b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n",   # no END after the value
])
def test_get_run_refuses_a_reply_that_is_not_its_requests(reply):
    run = ReplyRun([b"a", b"b"], Got())
    with pytest.raises(BackendProtocolError):
        answer([run], reply + END * 3)


def test_get_run_for_a_client_gone_drops_values():
    sink = Sink(limit=0)
    sink.arriving(1)
    run = ReplyRun([b"a"], Got(), sink)
    answer([run], value(b"a", b"1") + END)
    assert run.flags() == bytes([1]) and run.reply(0) == END


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_joined_run_reads_a_multigets_reply_as_one(chunk):
    """A ReplyRun with multi-key gets (the direct path's joined
    requests): each one's reply as its client gets it, whatever the reads'
    boundaries; an error line answers each of its keys."""
    data = b"get a b a\r\nget b\r\nget c d\r\nget a b\r\n"
    run = ReplyRun([b"a b a", b"b", b"c d", b"a b"], Got(), None, data, None, {0: 3, 2: 2, 3: 2})
    assert run.requests == run.size == 8
    assert written([run]) == [data]
    first = value(b"a", b"1") + value(b"a", b"1") + END
    assert answer([run], first + END + b"SERVER_ERROR busy\r\n" + value(b"b", b"2") + END,
                  chunk) == []
    assert run.done == [run] and run.size == 8
    assert [run.reply(i) for i in range(4)] == [
        first, END, b"SERVER_ERROR busy\r\n" * 2 + END, value(b"b", b"2") + END]


def test_joined_run_fails_each_multiget_left_for_every_key():
    run = ReplyRun([b"a", b"b c", b"d e f"], Got(), None,
                   b"get a\r\nget b c\r\nget d e f\r\n", None, {1: 2, 2: 3})
    reader = ResponseReader()
    reader.feed(END + value(b"b", b"2"))
    assert not run.read(reader)
    assert run.size == 5  # b c's reply is not whole: it and d e f's keys
    run.fail("disconnected", 3)
    assert [run.reply(i) for i in range(3)] == [
        END, BACKEND_FAILURE * 2 + END, BACKEND_FAILURE * 3 + END]
    with pytest.raises(BackendProtocolError):  # another request's reply
        answer([ReplyRun([b"a b"], Got(), None, b"get a b\r\n", None, {0: 2})],
               value(b"z", b"1") + END)
