"""The in-flight units (mcproxy.units): bytes in, bytes out.

Each unit is written, fed its backend's reply in awkward chunks (as a
backend connection hands replies to the unit at the head of its queue), and
checked for what it delivers: its wire bytes, its result, the mismatches it
refuses, and what each of its requests gets when it fails.
"""

from __future__ import annotations

import pytest

from mcproxy.units import MAX_MERGED_KEYS, KeyBatch, PlainRun, Single, Unit
from mcproxy.wire.errors import BACKEND_FAILURE, END
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import parse_request, scan_plain
from mcproxy.wire.response import FAIL_MISMATCH, BackendProtocolError

#: every test with the compiled framing loops and with pure Python alone
pytestmark = pytest.mark.usefixtures("framing")


def req(line: bytes, value: bytes | None = None, multiget: bool = False):
    r = parse_request(line)
    r.value = value
    r.multiget = multiget
    return r


def key(name: bytes, command: bytes = b"get") -> Single:
    """A Single for one key of a client multiget (mergeable)."""
    return Single(req(command + b" " + name + b"\r\n", multiget=True), Got())


class Got(list):
    """A ``done`` that records each result."""

    def __call__(self, result) -> None:
        self.append(result)


def written(units: list) -> list[bytes]:
    """What a connection writes for ``units`` handed over in one turn."""
    out: list[bytes] = []
    index = 0
    while index < len(units):
        index = units[index].write(out, units, index + 1)
    return out


def answer(units: list, reply: bytes, chunk: int = 1) -> list:
    """Feed ``reply`` in chunks of ``chunk`` bytes to the unit at the head,
    as a connection does, delivering each unit once complete; the units
    left waiting."""
    reader = ResponseReader()
    queue = list(units)
    for start in range(0, len(reply), chunk):
        if not reader.feed(reply[start:start + chunk]):
            continue
        while queue and queue[0].read(reader):
            queue.pop(0).deliver(7)
    assert not reader.buffered
    return queue


def plain_run(data: bytes, sink=None) -> PlainRun:
    stop, keys, _, sets, widths = scan_plain(data, 0, True, 1 << 20, multigets=100)
    assert stop == len(data)
    run = PlainRun(data, keys, sets, widths, sink)
    run.done = Got()
    return run


def test_every_kind_has_the_unit_shape():
    units = [Single(req(b"get a\r\n"), Got()), KeyBatch(b"get", [b"a"], Got()),
             plain_run(b"get a\r\n")]
    for unit in units:
        unit.sent = 1.0  # set by the backend when it queues the unit
        assert isinstance(unit, Unit), unit
    assert [unit.size for unit in units] == [1, 1, 1]


# Single


def test_single_writes_its_wire_line_and_payload():
    units = [Single(req(b"set k 0 0 2 noreply\r\n", b"hi\r\n"), Got()),
             Single(req(b"mg k v q\r\n"), Got()), Single(req(b"get k\r\n"), Got())]
    assert written(units) == [b"set k 0 0 2\r\n", b"hi\r\n", b"mg k v\r\n", b"get k\r\n"]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_single_reads_its_reply_in_any_chunks(chunk):
    units = [Single(req(b"get k\r\n"), Got()), Single(req(b"set k 0 0 1\r\n", b"x\r\n"), Got())]
    assert answer(units, b"VALUE k 0 2\r\nhi\r\nEND\r\nSTORED\r\n", chunk) == []
    [hit], [stored] = units[0].done, units[1].done
    assert (hit.line, hit.value, hit.elapsed) == (b"VALUE k 0 2\r\n", b"hi\r\n", 7)
    assert stored.line == b"STORED\r\n"


@pytest.mark.parametrize(("line", "reply"), [
    (b"get a\r\n", b"VALUE b 0 1\r\nx\r\nEND\r\n"),
    (b"set a 0 0 1\r\n", b"END\r\n"),
    (b"mg a v O1\r\n", b"HD O2\r\n"),
])
def test_single_refuses_a_reply_of_another_request(line, reply):
    unit = Single(req(line), Got())
    with pytest.raises(BackendProtocolError) as e:
        answer([unit], reply)
    assert e.value.reason == FAIL_MISMATCH and unit.done == []


def test_single_fails_with_its_own_failure():
    unit = Single(req(b"get k\r\n"), Got())
    unit.fail("timeout", 1500)
    [res] = unit.done
    assert (res.ok, res.reason, res.elapsed, res.line) == (False, "timeout", 1500,
                                                            BACKEND_FAILURE)


# Consecutive keys of client multigets: merged into one get at write time


def test_keys_of_multigets_are_merged_when_written_together():
    batch = [key(b"a"), key(b"b"), key(b"a"), Single(req(b"get c\r\n"), Got()),
             key(b"d", b"gets"), key(b"e", b"gets"), key(b"f"),
             KeyBatch(b"get", [b"g"], Got()), key(b"h")]
    assert written(batch) == [b"get a b a\r\n", b"get c\r\n", b"gets d e\r\n",
                              b"get f\r\n", b"get g\r\n", b"get h\r\n"]
    assert batch[0].merged is batch[2].merged and batch[3].merged is None
    assert batch[6].merged is None and batch[8].merged is None


def test_at_most_max_merged_keys_share_a_get():
    batch = [key(b"k%d" % i) for i in range(MAX_MERGED_KEYS + 1)]
    out = written(batch)
    assert [line.count(b" ") for line in out] == [MAX_MERGED_KEYS, 1]


def test_edited_keys_are_not_merged():
    edited = key(b"b")
    edited.request.tokens = [b"get", b"other"]  # as an edit by a route leaves it
    assert written([key(b"a"), edited]) == [b"get a\r\n", b"get b\r\n"]


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_merged_reply_is_split_per_key(chunk):
    batch = [key(b"a"), key(b"b"), key(b"a"), key(b"c")]
    written(batch)
    reply = b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nVALUE c 0 2 9\r\n33\r\nEND\r\n"
    assert answer(batch, reply, chunk) == []
    got = [unit.done[0] for unit in batch]
    assert [(r.line, r.value) for r in got] == [
        (b"VALUE a 0 1\r\n", b"1\r\n"), (b"END\r\n", None), (b"VALUE a 0 1\r\n", b"1\r\n"),
        (b"VALUE c 0 2 9\r\n", b"33\r\n")]
    assert [r.hit for r in got] == [True, False, True, True]
    assert batch[0].merged is batch[1].merged and batch[0].merged.singles is None  # no cycle


def test_merged_reply_error_line_answers_every_key():
    batch = [key(b"a"), key(b"b")]
    written(batch)
    answer(batch, b"SERVER_ERROR out of memory\r\n")
    assert [unit.done[0].line for unit in batch] == [b"SERVER_ERROR out of memory\r\n"] * 2


@pytest.mark.parametrize("reply", [
    b"VALUE c 0 1\r\nx\r\nEND\r\n",                      # a key not asked for
    b"VALUE b 0 1\r\nx\r\nVALUE a 0 1\r\nx\r\nEND\r\n",  # out of order
    b"STORED\r\n",                                       # not a get's reply
])
def test_merged_reply_is_checked_against_its_keys(reply):
    batch = [key(b"a"), key(b"b")]
    written(batch)
    with pytest.raises(BackendProtocolError) as e:
        answer(batch, reply)
    assert e.value.reason == FAIL_MISMATCH
    for unit in batch:
        unit.fail("mismatch", 0)
    assert [unit.done[0].reason for unit in batch] == ["mismatch"] * 2
    assert batch[0].merged is None  # no cycle left


# KeyBatch


def test_key_batch_writes_one_get_of_its_keys():
    assert written([KeyBatch(b"gets", [b"a", b"b", b"a"], Got())]) == [b"gets a b a\r\n"]


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_key_batch_delivers_each_keys_client_bytes(chunk):
    batch = KeyBatch(b"get", [b"a", b"b", b"a", b"c"], Got())
    assert batch.size == 4
    item = b"VALUE a 0 1\r\n1\r\n"
    assert answer([batch], item + item + b"VALUE c 0 1 5\r\n3\r\nEND\r\n", chunk) == []
    assert batch.done == [[item, b"", item, b"VALUE c 0 1 5\r\n3\r\n"]]


def test_key_batch_error_line_and_failure_answer_every_key():
    batch = KeyBatch(b"get", [b"a", b"b"], Got())
    answer([batch], b"CLIENT_ERROR bad command line format\r\n")
    assert batch.done == [[b"CLIENT_ERROR bad command line format\r\n"] * 2]
    failed = KeyBatch(b"get", [b"a", b"b", b"c"], Got())
    failed.fail("disconnected", 0)
    assert failed.done == [[BACKEND_FAILURE] * 3]


def test_key_batch_refuses_a_key_out_of_order():
    batch = KeyBatch(b"get", [b"a", b"b"], Got())
    with pytest.raises(BackendProtocolError):
        answer([batch], b"VALUE b 0 1\r\n2\r\nVALUE a 0 1\r\n1\r\nEND\r\n")
    assert batch.done == []


class Sink:
    """A client that goes away once it has been told of ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrived = 0

    def arriving(self, size: int) -> None:
        self.arrived += size

    @property
    def wanted(self) -> bool:
        return self.arrived <= self.limit


def test_key_batch_for_a_client_gone_drops_values_but_checks_keys():
    sink = Sink(limit=0)
    sink.arriving(1)
    batch = KeyBatch(b"get", [b"a", b"b"], Got(), sink)
    answer([batch], b"VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\n")
    assert batch.done == [[b"", b""]]
    with pytest.raises(BackendProtocolError):
        answer([KeyBatch(b"get", [b"a"], Got(), sink)], b"VALUE z 0 1\r\n1\r\nEND\r\n")


# PlainRun


def test_plain_run_writes_the_bytes_as_they_came():
    data = b"get a\r\nset b 0 0 1\r\n1\r\nget c d\r\n"
    run = plain_run(data)
    assert written([run]) == [data]
    assert (run.count, run.size) == (3, 4)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_plain_run_delivers_the_replies_as_they_came(chunk):
    run = plain_run(b"get a\r\nset b 0 0 1\r\n1\r\nget c d\r\nget e\r\n")
    reply = (b"VALUE a 0 1\r\n1\r\nEND\r\nSTORED\r\nVALUE d 0 1\r\n4\r\nEND\r\n"
             b"VALUE e 0 1\r\n5\r\nEND\r\n")
    assert answer([run], reply, chunk) == []
    assert run.done == [reply]


def test_plain_run_error_line_for_a_multiget_answers_each_key():
    run = plain_run(b"get a b c\r\nget d\r\n")
    answer([run], b"SERVER_ERROR busy\r\nEND\r\n")
    assert run.done == [b"SERVER_ERROR busy\r\n" * 3 + END + END]


def test_plain_run_failed_part_way_keeps_what_came():
    run = plain_run(b"get a\r\nget b c\r\nset d 0 0 1\r\nd\r\nget e\r\n")
    assert answer([run], b"END\r\nVALUE b 0 1\r\n2\r\n") == [run]
    run.fail("timeout", 0)
    assert run.done == [b"END\r\n" + BACKEND_FAILURE * 2 + END + BACKEND_FAILURE * 2]


def test_plain_run_refuses_another_requests_reply_after_its_good_ones():
    run = plain_run(b"get a\r\nset b 0 0 1\r\nb\r\nget c\r\n")
    with pytest.raises(BackendProtocolError) as e:
        answer([run], b"END\r\nSTORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n")
    assert e.value.reason == FAIL_MISMATCH and run.answered == 2
    run.fail("mismatch", 0)
    assert run.done == [b"END\r\nSTORED\r\n" + BACKEND_FAILURE]


def test_plain_run_for_a_client_gone_drops_its_replies():
    sink = Sink(limit=0)
    run = plain_run(b"get a\r\nget b\r\n", sink)
    reader = ResponseReader()
    reader.feed(b"VALUE a 0 1\r\n1\r\nEND\r\n")
    assert not run.read(reader)
    sink.arriving(1)
    reader.feed(b"END\r\n")
    assert run.read(reader)
    run.deliver(0)
    assert run.done == [b""]
