"""The checks the fuzz targets run, written against mcproxy's public API.

Each check takes plain bytes (and the chunks or seeds a driver derived
from them) and raises AssertionError when mcproxy breaks a rule; any other
exception escaping is a bug too. ``fuzz_parsers.py`` feeds them bytes from
atheris (or from hypothesis without it), and the property tests in
``tests/`` feed them generated requests and replies, so the fuzzer and the
tests check the same rules.

The parsers come from :mod:`mcproxy.wire.request` and
:mod:`mcproxy.wire.response`, the client protocol from
:mod:`mcproxy.server.protocol` (on Twisted's ``StringTransport``), the
embedded cache from :mod:`mcproxy.cache.store`.
"""

from __future__ import annotations

import random
import re

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.server.interfaces import IProxyCore
from mcproxy.server.protocol import BINARY_HEADER, BINARY_MAGIC, ProxyServerProtocol, binary_refusal
from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.behaviour import WIRE_1_6_15, WIRE_1_6_45, Wire
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import (
    MAX_UNTERMINATED,
    ParseError,
    Request,
    multiget_prefix,
    parse_request,
    split_multiget,
)
from mcproxy.wire.response import BackendProtocolError, parse_response
from mcproxy.writes import WriteBatch, batch

#: What ``version`` answers on a connection under test.
VERSION_LINE = b"VERSION test\r\n"

#: Tokens indexed for most commands (memcached's MAX_TOKENS; the last holds the rest).
TOKEN_CAP = 24


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (taken modulo its length + 1)."""
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def seeded_chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """A fuzz input as (stream, chunks of it): its first byte seeds the cuts."""
    if not data:
        return b"", []
    rng = random.Random(data[0])
    stream = data[1:]
    cuts = [rng.randrange(len(stream) + 1) for _ in range(rng.randrange(1, 16))]
    return stream, chunked(stream, cuts)


# -- requests ------------------------------------------------------------------


def check_wire(req: Request) -> None:
    """What goes to a backend is itself a request for the same thing,
    one the backend will answer (no noreply, no quiet mode left: ``me``,
    which has none, keeps its ``q``; a line that repeats ``q`` goes as it
    came, for memcached's duplicate-flag error, which is never silent)."""
    wire = req.wire_line()
    assert wire.endswith(b"\r\n") and b"\n" not in wire[:-1]
    flags = b" ".join(req.tokens[2:]).split(b" ")
    if req.quiet and sum(flag[:1] == b"q" for flag in flags) > 1:
        assert wire == req.line
        return
    try:
        again = parse_request(wire)
    except ParseError:
        # Past the token cap the flags in the last token were never checked;
        # without its q flags the line is shorter and they are. (memcached
        # refuses meta lines with that many flags anyway.)
        assert req.quiet and len(req.tokens) == TOKEN_CAP
        return
    assert (again.command, again.key, again.vlen) == (req.command, req.key, req.vlen)
    assert not again.noreply and not again.quiet


def check_request_line(line: bytes) -> None:
    """Any bytes parse as one whole request line or raise ParseError; a
    parsed request keeps its line, sends a backend a line of its own
    (:func:`check_wire`), and a get's keys are its line's."""
    try:
        req = parse_request(line)
    except ParseError:
        return
    assert req.line == line and line.endswith(b"\r\n")
    assert b" " not in req.key and req.vlen >= 0
    check_wire(req)
    if req.command in rq.GET_COMMANDS:
        keys = split_multiget(req)
        assert keys is None or all(keys)
        assert line.startswith(multiget_prefix(req))


# -- replies -------------------------------------------------------------------


def reply_fields(res) -> tuple:
    """What a parsed reply is, to compare (code, type, line, value)."""
    return res.code, res.type, res.line, res.value


def read_one_piece(data: bytes) -> tuple[list[tuple], str | None]:
    """Replies parse_response finds in ``data``, and the error that stopped it."""
    out, pos = [], 0
    try:
        while (got := parse_response(data, pos)) is not None:
            out.append(reply_fields(got[0]))
            pos = got[1]
    except BackendProtocolError as e:
        return out, e.reason
    return out, None


def read_chunks(chunks: list[bytes], multi: bool = False
                ) -> tuple[list[tuple], str | None, int]:
    """The same through a ResponseReader fed ``chunks`` (reading items of a
    multi-key get reply with ``multi``); also what it buffers."""
    reader, out = ResponseReader(), []
    try:
        for chunk in chunks:
            if reader.feed(chunk):
                while (res := reader.read(multi=multi)) is not None:
                    out.append(reply_fields(res))
    except BackendProtocolError as e:
        return out, e.reason, -1
    return out, None, reader.buffered


def check_reply_chunks(data: bytes, chunks: list[bytes], multi: bool) -> None:
    """Only BackendProtocolError escapes, and the replies before it, the
    error itself and what stays buffered do not depend on the chunking
    (nor, for single replies, on using the reader or parse_response)."""
    whole = read_chunks([data], multi)
    split = read_chunks(chunks, multi)
    assert split == whole, (split, whole)
    if not multi:
        assert read_one_piece(data) == whole[:2]


def read_raw_chunks(chunks: list[bytes], counts: list[int],
                    widths: dict[int, int] | None = None, keys: list[bytes] | None = None,
                    sets: frozenset[int] | None = None) -> tuple[bytes, int, str | None]:
    """The bytes and number of replies ResponseReader.read_raw frames in
    ``chunks``, asking for ``counts`` replies in turn (``widths``: the key
    counts of multi-key gets; ``keys`` and ``sets`` the requests, by
    default gets of ``k``), and the error that stopped it."""
    if keys is None:
        widths_ = widths or {}
        keys = [b" ".join([b"k"] * widths_.get(i, 1)) for i in range(64)]
    reader, parts, framed, turn = ResponseReader(), [], 0, 0
    try:
        for chunk in chunks:
            if reader.feed(chunk):
                while got := reader.read_raw(counts[turn % len(counts)], parts, keys, sets,
                                             widths, framed):
                    framed += got
                    turn += 1
    except BackendProtocolError as e:
        return b"".join(parts), framed, e.reason
    return b"".join(parts), framed, None


def check_raw_chunks(data: bytes, chunks: list[bytes], seed: int) -> None:
    """``read_raw``, framing ``data`` as the replies to a run of single- and
    multi-key gets (their widths picked by ``seed``), frames the same bytes,
    count and error however the bytes arrive and however many it is asked
    for at a time."""
    widths = {index: 2 + (seed >> 2) % 4 for index in range(0, 12, 1 + (seed >> 4) % 3)}
    raw = read_raw_chunks([data], [1 + seed % 3], widths)
    assert read_raw_chunks(chunks, [1, 4, 2], widths) == raw


# -- the client protocol -------------------------------------------------------


class NumberingEngine:
    """Answers every routed request with a numbered line, now or later.
    With ``runs``, takes runs of plain get/set requests (route_run) when
    both commands are hooked, multi-key gets too with ``multigets``, and
    records and numbers their requests as if they had come one by one
    (a multiget key by key); with ``runs="gets"`` runs of gets only, a run
    of one get gathered (routed when ``batch``, the connection's write
    batch, flushes), as the route engine takes gets routed in Lua; with
    ``runs="joined"`` runs of gets and sets, a run of one of them gathered,
    a multi-key get's too, as the direct path joins them."""

    def __init__(self, hooked: frozenset[int], counter: list[int], later: bool,
                 runs: bool | str = False, multigets: bool = True,
                 wire: Wire = WIRE_1_6_15) -> None:
        self.hooked_commands = hooked
        self.wire = wire
        self.counter = counter
        self.later = later
        self.routed: list[tuple[bytes, bytes | None, bool]] = []
        self.pending: list = []
        self.plain_runs = True if runs and {rq.CMD_GET, rq.CMD_SET} <= hooked else None
        self.plain_multigets = multigets
        self.gathers = 0
        self.gather_multigets = 0
        if runs == "gets":
            self.plain_runs = False if rq.CMD_GET in hooked else None
            self.plain_multigets = False
            self.gathers = 2 if self.plain_runs is False else 0
        elif runs == "joined" and self.plain_runs:
            self.gathers = 2
            self.gather_multigets = 16 if multigets else 0
        #: the write batch gathered requests are routed at (set by run_protocol)
        self.batch = None
        self._gathered: list = []
        #: with runs="refuse", route_run declines every run (as it does for
        #: an active request limit), counted here
        self.refused = 0 if runs == "refuse" else None

    def route_run(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                  sets: list[int], widths: dict[int, int] | None, done, sink=None) -> bool:
        if self.refused is not None:
            self.refused += 1
            return False
        assert widths is None or self.plain_multigets
        assert not sets or self.plain_runs
        answers = []
        for index, (end, key) in enumerate(zip(ends, keys, strict=True)):
            line, newline, value = data[start:end].partition(b"\n")
            req = parse_request(line + newline)
            multiget = split_multiget(req)
            assert key == (b" ".join(multiget) if multiget else req.key)
            assert (index in sets) == (req.command == rq.CMD_SET)
            assert (widths or {}).get(index) == (multiget and len(multiget))
            for one in multiget or [key]:
                self.routed.append((b"get %s\r\n" % one if multiget else line + newline,
                                    value or None, bool(multiget)))
                self.counter[0] += 1
                answers.append(b"<%d>\r\n" % self.counter[0])
            if multiget:
                answers.append(errors.END)
            start = end
        self._answer(done, b"".join(answers))
        return True

    def hooked(self, command: int) -> bool:
        return command in self.hooked_commands

    def gather(self, req: Request, done, release) -> bool:
        if req.command != rq.CMD_GET or len(req.line) != len(req.key) + 6 or req.multiget:
            return False
        return self.gather_plain(req.key, req.line, False, done, release, req)

    def gather_plain(self, key: bytes, sent: bytes, is_set: bool, done, release,
                     req=None, width: int = 0) -> bool:
        assert self.gathers and (not is_set or self.plain_runs)
        if width > self.gather_multigets:
            return False
        self._gathered.append((key, sent, is_set, width, done, release))
        if len(self._gathered) == 1:
            self.batch.call_first(self._route_gathered)
        return True

    def _route_gathered(self) -> None:
        """Each as route_run takes a run of one."""
        gathered, self._gathered = self._gathered, []
        for key, sent, is_set, width, done, _ in gathered:
            self.route_run(sent, 0, [key], [len(sent)], [0] if is_set else [],
                           {0: width} if width else None, done)
        for *_, release in gathered:
            release()

    def route_keys(self, req: Request, keys: list[bytes], done, sink=None) -> bool:
        return False  # multigets go key by key

    def route(self, req: Request, done) -> None:
        self.routed.append((req.line, req.value, req.multiget))
        self.counter[0] += 1
        self._answer(done, b"<%d>\r\n" % self.counter[0])

    def _answer(self, done, answer: bytes) -> None:
        if self.later:
            self.pending.append((done, answer))
        else:
            done(answer)

    def answer_backwards(self, end_of_iteration) -> None:
        while self.pending:
            done, answer = self.pending.pop()
            done(answer)
            end_of_iteration()


class NumberingStore:
    """Stands in for the embedded cache: a numbered line per request."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter

    def execute(self, req: Request) -> bytes:
        self.counter[0] += 1
        return b"" if req.noreply else b"<%d>\r\n" % self.counter[0]


@implementer(IProxyCore)
class NumberingService:
    """The IProxyCore a connection under test talks to: the numbering
    router, a numbered line for every local answer but ``version``."""

    def __init__(self, hooked: frozenset[int], later: bool, runs: bool | str = False,
                 multigets: bool = True, wire: Wire = WIRE_1_6_15) -> None:
        self.counter = [0]
        self.engine = self.router = NumberingEngine(hooked, self.counter, later, runs,
                                                    multigets, wire)
        self.stats = ProxyStats()
        self.clock = Clock()
        self.watchers = None
        self.store = NumberingStore(self.counter)

    def answer(self, req: Request) -> bytes:
        if req.command == rq.CMD_VERSION:
            return VERSION_LINE
        if req.command == rq.CMD_STATS:
            self.counter[0] += 1
            return b"<%d>\r\nEND\r\n" % self.counter[0]
        return self.store.execute(req)


def run_protocol(chunks: list[bytes], hooked: frozenset[int], later: bool = False,
                 runs: bool | str = False, multigets: bool = True, wire: Wire = WIRE_1_6_15,
                 per_turn: int = 1):
    """Feed ``chunks`` to a connection; what was routed, written, and
    whether it hung up. ``later`` answers routes at the end, backwards;
    ``runs`` lets the engine take runs of plain requests ("refuse": offers
    them, and the engine declines each), with ``multigets`` those of
    several keys too; ``wire``: the behaviour the connection gets.

    Each ``per_turn`` chunks (as a TLS connection reads several records in
    one poll), and each late answer, are one reactor iteration: replies are
    written by a write batch of this run's own, flushed after each (without
    pytest's ``immediate_writes`` fixture, as under the fuzzer, too).
    """
    flushes: list = []
    own = WriteBatch()
    own.schedule = flushes.append

    def end_of_iteration() -> None:
        while flushes:
            flushes.pop(0)()

    saved = _take_batch_state(own)
    try:
        service = NumberingService(hooked, later, runs, multigets, wire)
        service.engine.batch = batch
        proto = ProxyServerProtocol(service)
        transport = StringTransport()
        proto.makeConnection(transport)
        for index, chunk in enumerate(chunks):
            proto.dataReceived(chunk)
            if index % per_turn == per_turn - 1:
                end_of_iteration()
        end_of_iteration()
        service.engine.answer_backwards(end_of_iteration)
    finally:
        _take_batch_state(saved)
    return service.engine.routed, transport.value(), transport.disconnecting, service


def _take_batch_state(state: WriteBatch) -> WriteBatch:
    """Give the process-wide write batch the fields of ``state`` and return
    its own as a WriteBatch: the compiled protocol holds that batch in C, so
    a run swaps what the batch holds, never the batch."""
    former = WriteBatch()
    for name in WriteBatch.__slots__:
        setattr(former, name, getattr(batch, name))
        setattr(batch, name, getattr(state, name))
    return former


#: Everything the proxy writes of its own accord.
_PROXY_LINES = [errors.PARSING_REQUEST, errors.REQUEST_TOO_LONG, errors.KEY_TOO_LONG,
                errors.BAD_DATA_CHUNK, errors.NO_ROUTE, errors.NOT_SUPPORTED,
                errors.BINARY_PROTOCOL, errors.OBJECT_TOO_LARGE, errors.BAD_COMMAND_LINE,
                errors.OPTIONS_TOO_LONG, errors.ERROR, errors.CLIENT_PARSING_REQUEST,
                errors.CLIENT_KEY_TOO_LONG, errors.END, b"MN\r\n", VERSION_LINE]
_OUTPUT_ITEM = re.compile(b"<(\\d+)>\r\n|" + b"|".join(map(re.escape, _PROXY_LINES)))


def check_output(stream: bytes, routed: list, output: bytes, service) -> None:
    """The output is a sequence of whole replies: every numbered answer
    exactly once and in order, the rest the proxy's own lines, and no more
    of those than the input had lines and keys. A stream that starts as a
    binary-protocol packet gets the binary refusal once its header is in."""
    if stream.startswith(BINARY_MAGIC):
        whole = len(stream) >= BINARY_HEADER
        assert output == (binary_refusal(stream[:BINARY_HEADER]) if whole else b"")
        return
    pos, numbers, own = 0, [], 0
    while pos < len(output):
        match = _OUTPUT_ITEM.match(output, pos)
        assert match, output[pos:pos + 40]
        if match.group(1):
            numbers.append(int(match.group(1)))
        else:
            own += 1
        pos = match.end()
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert set(numbers) <= set(range(1, service.counter[0] + 1))
    assert len(routed) <= service.counter[0]
    assert own <= stream.count(b"\n") + stream.count(b" ") + 1


def check_client_stream(stream: bytes, chunks: list[bytes], hooked: frozenset[int]) -> None:
    """A client stream fed in one chunk with immediate answers, and in
    ``chunks`` with answers arriving later in reverse order, routes the
    same requests, writes the same bytes and hangs up the same way (also
    when the engine takes runs of plain requests whole); every byte
    written is a whole reply to a request that was made."""
    whole = run_protocol([stream], hooked)
    split = run_protocol(chunks, hooked, later=True)
    runs = run_protocol(chunks, hooked, later=True, runs=True)
    check_output(stream, *split[:2], split[3])
    assert runs[:3] == split[:3], (runs[:3], split[:3])
    gets = run_protocol(chunks, hooked, later=True, runs="gets")
    assert gets[:3] == split[:3], (gets[:3], split[:3])
    joined = run_protocol(chunks, hooked, later=True, runs="joined")
    assert joined[:3] == split[:3], (joined[:3], split[:3])
    if all(len(line) <= MAX_UNTERMINATED for line in stream.split(b"\n")):
        # Longer lines close the connection only when they arrive in pieces
        # (memcached's rule is about buffered bytes), so they may differ.
        assert whole[:3] == split[:3], (whole[:3], split[:3])


def check_client_stream_1_6_45(stream: bytes, chunks: list[bytes],
                               hooked: frozenset[int]) -> None:
    """Under memcached 1.6.45's wire behaviour, which closes at once on an
    unknown command and drops the replies not yet written (so what is
    written depends on when answers come): a client stream fed whole with
    immediate answers, in ``chunks`` with late answers, and in runs of
    plain requests, routes the same requests and hangs up the same way,
    and writes only whole replies to requests that were made."""
    whole = run_protocol([stream], hooked, wire=WIRE_1_6_45)
    split = run_protocol(chunks, hooked, later=True, wire=WIRE_1_6_45)
    runs = run_protocol(chunks, hooked, later=True, runs=True, wire=WIRE_1_6_45)
    for run in (whole, split, runs):
        check_output(stream, *run[:2], run[3])
    assert runs[0] == split[0] and runs[2] == split[2], (runs[:3], split[:3])
    if all(len(line) <= MAX_UNTERMINATED for line in stream.split(b"\n")):
        assert whole[0] == split[0] and whole[2] == split[2], (whole[:3], split[:3])


# -- the embedded cache --------------------------------------------------------

#: What the client protocol answers itself: never handed to the cache.
PROTOCOL_LOCAL = frozenset((rq.CMD_QUIT, rq.CMD_STATS, rq.CMD_WATCH, rq.CMD_VERSION))


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.5

    def __call__(self) -> float:
        return self.now


def cache_requests(stream: bytes) -> list[Request]:
    """The requests a client stream makes of the cache, framed as the
    client protocol frames them: a line, then a storage request's payload
    (a refused storage line's payload is skipped, as the proxy skips it)."""
    out, pos = [], 0
    while (newline := stream.find(b"\n", pos)) >= 0:
        line, pos = stream[pos:newline + 1], newline + 1
        try:
            req = parse_request(line)
        except ParseError as e:
            pos += e.vlen
            continue
        if req.command in PROTOCOL_LOCAL:
            continue
        if req.vlen:
            req.value, pos = stream[pos:pos + req.vlen], pos + req.vlen
        out.append(req)
    return out


def check_cache_stream(stream: bytes, seed: int) -> None:
    """The cache answers every request of ``stream`` without raising, the
    client's requests and their backend lines (:meth:`Request.wire_line`,
    as ``mcp.internal`` sends them) leave two caches in the same state, the
    client's reply is the backend line's or nothing (noreply and quiet
    only silence), the backend line's reply to one key reads back as one
    whole reply (``mcp.internal`` parses it), and memory stays in bounds.

    ``seed`` picks the memory limit (small, to evict) and the clock's
    steps between requests.
    """
    rng = random.Random(seed)
    limit = 2048 + 64 * (seed % 64)
    clocks = _Clock(), _Clock()
    client, internal = (Store(memory_limit=limit, clock=clock) for clock in clocks)
    for req in cache_requests(stream):
        try:
            clean = parse_request(req.wire_line())
        except ParseError:
            continue  # past the token cap: see check_wire
        clean.value = req.value
        step = rng.choice((0, 0, 0, 1, 2, 31))
        for clock in clocks:
            clock.now += step
        reply = client.execute(req)
        answer = internal.execute(clean)
        assert reply in (b"", answer), (req.line, reply, answer)
        assert client.stats() == internal.stats(), req.line
        stats = internal.stats()
        assert stats["bytes"] <= stats["limit_maxbytes"]
        assert stats["curr_items"] == len(internal)
        assert stats["bytes"] > 0 if len(internal) else stats["bytes"] == 0
        keys = split_multiget(clean) if clean.command in rq.GET_COMMANDS else None
        if clean.command == rq.CMD_CACHE_MEMLIMIT or (keys and len(keys) > 1):
            continue  # a local command, and a reply of several items
        parsed = parse_response(answer)
        assert parsed is not None and parsed[1] == len(answer), (clean.line, answer)
