"""The client-facing protocol: memcached's text and meta commands.

The protocol frames and parses; it does not decide routes. Each request gets
a reply slot the moment its line is parsed; the slot is filled by whoever
answers it (a route through the engine, the embedded cache, or the protocol
itself for local commands), and completed slots at the head of the queue are
written out, so replies always leave in request order.

Where a C compiler is, this module is also built as an extension by Cython
(setup.py) from this very file, typed by ``protocol.pxd``: the slots and
the protocol become extension types whose state is C fields and whose hot
methods call each other in C. The Python here is what runs without a
compiler, or with ``MCPROXY_PURE_PYTHON`` set (mcproxy.compiled); both
pass the same tests. Hence the protocol is a plain class, not a Twisted
``Protocol`` subclass (an extension type cannot derive from a Python
class): it provides IProtocol itself.
"""

from __future__ import annotations

import struct
import sys
from collections import deque

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import classImplements

from mcproxy.server.interfaces import IProxyCore, IRouter
from mcproxy.wire import errors
from mcproxy.wire.request import (
    CMD_MN,
    CMD_QUIT,
    CMD_WATCH,
    GET_COMMANDS,
    LOCAL_ONLY_COMMANDS,
    MAX_KEY_LENGTH,
    MAX_REQUEST_LINE,
    MAX_RUN,
    MAX_UNTERMINATED,
    ParseError,
    Request,
    multiget_key,
    multiget_prefix,
    parse_request,
    scan_bytes,
    split_multiget,
)
from mcproxy.writes import batch, send, tcp_socket

#: Requests a client may have in flight before we stop reading from it.
MAX_CLIENT_INFLIGHT = 4096
#: Payload bytes of a client's requests in flight (read, not yet answered)
#: at which we stop reading from it; reading resumes below half of it.
MAX_CLIENT_INFLIGHT_BYTES = 64 * 2**20
#: Largest value a storage command may carry through the proxy; a larger
#: one is answered ``SERVER_ERROR object too large for cache`` and its
#: payload is read and dropped, as memcached does with items over ``-I``.
MAX_PAYLOAD = 64 * 2**20
#: Longest ``get``/``gets`` line; beyond it the client gets
#: ``SERVER_ERROR request too long`` and is closed.
MAX_MULTIGET_LINE = 2 * 2**20
#: Most keys in one multi-key ``get``/``gets``/``gat``/``gats`` (as above beyond it).
MAX_MULTIGET_KEYS = 16384
#: The first byte of a binary protocol request.
BINARY_MAGIC = b"\x80"
#: Bytes of a binary protocol header.
BINARY_HEADER = 24
#: Seconds a connection that began with BINARY_MAGIC may take to send the
#: rest of its header; then it is refused with what came.
BINARY_HEADER_WAIT = 2.0
#: The status of the proxy's binary error response (memcached's "unknown
#: command": libmemcached and pylibmc report it as a protocol error).
BINARY_STATUS = 0x0081
#: magic, opcode, key length, extras length, data type, status, body length
_BINARY_RESPONSE = struct.Struct(">BBHBBHI")
#: Bytes before a bare ``\n`` for a line to be a request where one may end so
#: (1.6.45: ``mn\n``, 3 bytes in all, is too short, as is ``x\r\n``).
MIN_BARE_LF_LINE = 3
#: How far a multiget line may be indented and still count as one.
MAX_MULTIGET_INDENT = 100
#: What a client beyond --max-connections gets before the hang-up (memcached's words).
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
#: Longest pause between two sweeps for idle clients, in seconds.
MAX_IDLE_SWEEP = 1.0
#: Bytes of replies that may wait for one client (``--client-output-limit``'s
#: default): buffered for it, or arriving from backends for its requests in
#: flight. Beyond it the client is closed and what still comes for it dropped.
CLIENT_OUTPUT_LIMIT = 256 * 2**20
#: At this fraction of the output limit, reading from the client pauses
#: (resuming below half of it), so that it sends no more requests.
OUTPUT_PAUSE_SHARE = 16
#: The log event of a client closed for the output limit.
LOG_OUTPUT_LIMIT = ("client {client} closed: {waiting} bytes of replies waiting for it, "
                    "over the output limit of {limit}")


def binary_refusal(head: bytes) -> bytes:
    """The binary error response, as memcached writes one, to the request
    whose header begins ``head``: its opcode and opaque echoed (zeros for
    what did not arrive), BINARY_STATUS, the reason as body."""
    opcode = head[1] if len(head) > 1 else 0
    opaque = head[12:16] if len(head) >= 16 else bytes(4)
    body = errors.BINARY_PROTOCOL
    return (_BINARY_RESPONSE.pack(0x81, opcode, 0, 0, 0, BINARY_STATUS, len(body))
            + opaque + bytes(8) + body)


def _peer(transport) -> str:
    """The client's address as ``host:port`` (or as Twisted shows it)."""
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return str(peer) if host is None else f"{host}:{port}"


class Slot:
    """One reply position in a connection's output order. Its bytes count
    towards the connection's replies waiting from the moment it holds them."""

    __slots__ = ("data", "proto")

    def __init__(self, proto: ProxyServerProtocol, data: bytes | None = None) -> None:
        # (the protocol reached through the typed field, not the argument:
        # compiled, a C call)
        self.proto = proto
        self.data = data
        if data is not None:
            self.proto._add_waiting(len(data))

    def fill(self, data: bytes) -> None:
        self.data = data
        proto = self.proto
        # _add_waiting, inlined: this runs for every reply
        waiting = proto._waiting = proto._waiting + len(data)
        if waiting > proto._pause_at:
            proto._output_check()
        proto.flush()


class PayloadSlot(Slot):
    """The slot of a storage request: its payload counts towards the
    connection's in-flight bytes until the reply fills it."""

    __slots__ = ("size",)

    def __init__(self, proto: ProxyServerProtocol, size: int) -> None:
        super().__init__(proto)
        self.size = size
        self.proto._inflight_bytes += size

    def fill(self, data: bytes) -> None:
        self.proto._inflight_bytes -= self.size
        Slot.fill(self, data)  # (compiled, a cpdef method has no super())


class GroupSlot(Slot):
    """The one slot of requests answered together: a multiget whose keys
    are routed together (``RouteEngine.route_keys``), or a run of plain
    requests (``RouteEngine.route_run``). Until it leaves the queue it
    counts as ``extra`` more slots towards the connection's in-flight
    limit (those of its requests, and a multiget's ``END``), and its
    ``size`` bytes as in flight.

    It is also the ``sink`` of its backend units (units.ReplySink): the
    bytes backends send for it count as replies waiting (``credited``)
    until the reply fills it, so that a multiget whose reply is hundreds of
    MB hits the output limit while it arrives, not once it is complete."""

    __slots__ = ("extra", "size", "credited")

    def __init__(self, proto: ProxyServerProtocol, extra: int, size: int = 0) -> None:
        self.proto = proto  # (its fields then reached through it: see Slot)
        self.data = None
        self.extra = extra
        self.size = size
        self.credited = 0
        self.proto._extra_slots += extra
        self.proto._inflight_bytes += size

    def fill(self, data: bytes) -> None:
        proto = self.proto
        proto._inflight_bytes -= self.size
        self.data = data
        proto._add_waiting(len(data) - self.credited)
        proto.flush()

    def arriving(self, size: int) -> None:
        """A backend received ``size`` bytes of this slot's reply."""
        proto = self.proto
        if not proto._gone:
            self.credited += size
            proto._add_waiting(size)

    @property
    def wanted(self) -> bool:
        """False once the client is gone: drop what still comes for it."""
        return not self.proto._gone


#: The lines of multigets whose keys may be routed together: those a
#: backend can be sent as they are, key lists aside.
_BATCH_PREFIXES = frozenset((b"get ", b"gets "))


def _is_multiget_prefix(buffered: bytes) -> bool:
    """Does an unterminated line look like a ``get``/``gets`` multiget?"""
    stripped = buffered.lstrip(b" ")
    return (len(buffered) - len(stripped) <= MAX_MULTIGET_INDENT
            and (stripped.startswith(b"get ") or stripped.startswith(b"gets ")))


class ProxyServerProtocol:
    """One client connection.

    Lines end in ``\\n``. What a bad line gets is
    the router's ``wire`` (mcproxy.wire.behaviour), read when a line is
    refused (see lineReceived): as
    memcached's proxy 1.6.15, a line must end in ``\\r\\n`` (a bare ``\\n``
    is a parse error) and every refusal is answered; as 1.6.45, a bare
    ``\\n`` ends a line too (re-framed with ``\\r\\n`` before it is parsed,
    so that what is forwarded is what memcached reads as one request),
    refusals are worded ``CLIENT_ERROR``, and an unknown command or a routed
    line too long closes the connection at once (``_refused``).
    ``dataReceived`` scans each chunk once with ``bytes.find`` (not as
    LineReceiver re-splits its whole buffer, quadratic with many lines per
    chunk, twisted#6357), applies the proxy's 1024-byte no-newline rule, and
    hands ``rawDataReceived`` at most the bytes of the pending payload.

    A client may shut down its write side (``shutdown(SHUT_WR)``, ``nc -N``)
    and still reads every reply: see ``readConnectionLost``.
    """

    log = Logger()
    #: the ProxyServerFactory that built us (None in tests that build by hand)
    factory: ProxyServerFactory | None = None
    #: a connection that began with BINARY_MAGIC: its header so far, and
    #: the timeout of the wait for the rest
    _binary_head = b""
    _binary_wait: IDelayedCall | None = None

    def __init__(self, core: IProxyCore,
                 output_limit: int = CLIENT_OUTPUT_LIMIT, router: IRouter | None = None) -> None:
        #: IProtocol's: set by makeConnection
        self.transport = None
        self.connected = 0
        self.core = core
        #: the router of this connection's listener (default: the core's)
        self.router = core.router if router is None else router
        self.stats = core.stats
        self._seconds = core.clock.seconds
        self._slots: deque[Slot] = deque()
        self._buffer = bytearray()
        self._payload_for: Request | None = None
        self._payload_then = None
        self._payload_chunks: list[bytes] = []
        self._payload_needed = 0
        self._reading_paused = False
        #: requests of ours the router holds to route at the end of the
        #: poll (IRouter.gather): what we read meanwhile waits in _buffer
        self._held = 0
        self._writing_paused = False
        #: the client shut down its write side: nothing more will arrive
        self._read_closed = False
        self._closing = False
        self._gone = False
        self._out: list[bytes] = []
        self._batched = False
        self._socket = None
        self._inflight_bytes = 0
        #: slots the GroupSlots in the queue stand for, beyond themselves
        self._extra_slots = 0
        #: bytes of replies waiting for the client: in filled slots, in
        #: ``_out``, arriving for GroupSlots, and ``_unsent``
        self._waiting = 0
        #: bytes handed to the transport while its buffer was full; they
        #: leave ``_waiting`` when it has written everything (resumeProducing)
        self._unsent = 0
        #: close beyond this many bytes waiting, pause reading beyond
        #: ``_pause_at`` (0: no limit)
        self.output_limit = output_limit or sys.maxsize
        self._pause_at = self.output_limit // OUTPUT_PAUSE_SHARE

    # -- connection lifecycle -----------------------------------------------

    def makeConnection(self, transport) -> None:
        """IProtocol's: the connection is made on ``transport``."""
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def logPrefix(self) -> str:
        """ILoggingContext's: what Twisted's log lines about us begin with."""
        return self.__class__.__name__

    def connectionMade(self) -> None:
        #: when the client last sent anything (for --idle-timeout), on the core's clock
        self.last_active = self._seconds()
        if self.factory is not None:
            self.factory.clients.add(self)
        self.stats.curr_connections += 1
        self.stats.total_connections += 1
        self._socket = tcp_socket(self.transport)
        if self._socket is not None:
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.dataReceived = self._first_data

    def _first_data(self, data: bytes) -> None:
        """The first bytes of the connection: refuse the binary protocol
        (memcached would answer it), then hand over to ``dataReceived``
        for good (so later reads pay nothing for this check)."""
        if not data:
            return
        del self.dataReceived
        if data[:1] != BINARY_MAGIC:
            self.dataReceived(data)
            return
        self.stats.conn_errors += 1
        self._binary_head = data[:BINARY_HEADER]
        if len(self._binary_head) == BINARY_HEADER:
            self._refuse_binary()
            return
        self.dataReceived = self._binary_header
        self._binary_wait = self.core.clock.callLater(BINARY_HEADER_WAIT, self._refuse_binary)

    def _binary_header(self, data: bytes) -> None:
        """More of a binary header: refuse once it is whole."""
        head = self._binary_head = self._binary_head + data[:BINARY_HEADER - len(self._binary_head)]
        if len(head) == BINARY_HEADER:
            self._binary_wait.cancel()
            self._refuse_binary()

    def _refuse_binary(self) -> None:
        """Answer a binary client memcached's way (binary_refusal), close."""
        self._binary_wait = None
        vars(self).pop("dataReceived", None)  # (compiled: the instance dict)
        self._reply(binary_refusal(self._binary_head))
        self._close_after_replies()

    def readConnectionLost(self) -> None:
        """The client shut down its write side: answer every request it
        sent, in order, then close (as memcached does). Bytes held while
        reading was paused are requests too: they are read first, when
        ``_resume_reading`` runs, and only then is the connection closing.
        An unfinished last request gets no reply."""
        if self._read_closed:
            return
        self._read_closed = True
        if self._gone:  # a watcher: its stream ends with the client's
            self.transport.loseConnection()
        elif not self._reading_paused and not self._held:
            self._close_after_replies()

    def writeConnectionLost(self) -> None:
        """Never called: the proxy only ever closes both sides at once."""

    def connectionLost(self, reason=None) -> None:
        if self._binary_wait is not None:
            self._binary_wait.cancel()
            self._binary_wait = None
        self._forget()

    def _forget(self) -> None:
        """Stop being a client connection: leave the counts (once) and drop
        every request and reply still waiting; later events do nothing."""
        if self.factory is not None:
            self.factory.clients.discard(self)
        if not self._gone:
            self._gone = True
            self.stats.curr_connections -= 1
        self._slots.clear()
        self._extra_slots = 0
        self._out = []
        self._buffer.clear()
        self._payload_for = None
        self._payload_needed = 0
        self._payload_chunks = []
        self._waiting = self._unsent = 0

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.last_active = self._seconds()
        if self._closing:
            return
        if self._reading_paused or self._held:
            self._buffer += data
            return
        if self._buffer:
            if not self._payload_needed and b"\n" not in data:
                self._buffer += data
                self._check_unterminated()
                return
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        self._process(data)

    def _process(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        router = self.router
        plain = router.plain_runs
        multigets = MAX_MULTIGET_KEYS if plain is not None and router.plain_multigets else 0
        while pos < end:
            if self._closing or self._reading_paused or self._held:
                self._buffer += data[pos:]
                return
            if self._payload_needed:
                take = data[pos:pos + self._payload_needed]
                pos += len(take)
                self.rawDataReceived(take)
                continue
            if plain is not None:
                stop, keys, ends, sets, widths = scan_bytes(data, pos, plain, MAX_PAYLOAD,
                                                            MAX_RUN, multigets)
                if keys:
                    if self._route_run(data, pos, keys, ends, sets, widths):
                        pos = stop
                        continue
                    plain = None  # refused: the rest of the chunk line by line
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._buffer += data[pos:]
                self._check_unterminated()
                return
            self.lineReceived(data[pos:newline])
            pos = newline + 1

    def _check_unterminated(self) -> None:
        """memcached's rule: > 1024 bytes without a newline closes, unless
        it is a get/gets multiget, which may be up to MAX_MULTIGET_LINE long."""
        if len(self._buffer) <= MAX_UNTERMINATED:
            return
        if not _is_multiget_prefix(bytes(self._buffer[: MAX_MULTIGET_INDENT + 5])):
            self._buffer.clear()
            self._closing = True
            self.transport.loseConnection()
        elif len(self._buffer) > MAX_MULTIGET_LINE:
            self._too_long()

    def rawDataReceived(self, data: bytes) -> None:
        """Collect payload bytes; ``data`` never runs past the payload.
        Without a ``then`` the payload is too large and dropped as it comes."""
        self._payload_needed -= len(data)
        if self._payload_then is None:
            if not self._payload_needed:
                self._payload_for = None
            return
        self._payload_chunks.append(data)
        if self._payload_needed:
            return
        req, then = self._payload_for, self._payload_then
        value = b"".join(self._payload_chunks)
        self._payload_for = self._payload_then = None
        self._payload_chunks = []
        if value[-2:] != b"\r\n":
            self._reply(errors.BAD_DATA_CHUNK)
            return
        req.value = value
        then(req)

    def lineReceived(self, line: bytes) -> None:
        """One line, without its ``\\n``. The router's wire behaviour is
        read only when the line is refused: a line ending in a bare ``\\n``
        always is (parse_request wants ``\\r\\n``), and where the behaviour
        reads it as memcached 1.6.22 and later do, it is parsed again as
        the request it would be with ``\\r\\n``, which is then what a
        backend receives. Lines that parse pay nothing for the choice."""
        try:
            req = parse_request(line + b"\n")
        except ParseError as e:
            wire = self.router.wire
            if wire.bare_lf and line[-1:] != b"\r" and len(line) >= MIN_BARE_LF_LINE:
                self.lineReceived(line + b"\r")
                return
            if e.reply is errors.REQUEST_TOO_LONG:
                self._line_too_long()
                return
            self.stats.conn_errors += 1
            if e.unknown and wire.close_refused:
                self._refused()
                return
            self._reply(wire.refusal(e))
            if e.vlen:
                self._expect_payload(None, None, e.vlen)
            return
        cmd = req.command
        if cmd in LOCAL_ONLY_COMMANDS or not self.router.hooked(cmd):
            then = self._local
        elif cmd in GET_COMMANDS and req.tokens[-1].find(b" ") >= 0:  # split_multiget's test
            self._multiget(req, split_multiget(req))
            return
        elif len(req.line) >= MAX_REQUEST_LINE:
            self._line_too_long()
            return
        else:
            then = self._route
        if req.vlen:
            if req.vlen > MAX_PAYLOAD + 2:
                self._reply(errors.OBJECT_TOO_LARGE)
                then = None
            self._expect_payload(req, then, req.vlen)
        else:
            then(req)

    def _expect_payload(self, req: Request | None, then, vlen: int) -> None:
        """Read the next ``vlen`` bytes as ``req``'s payload and hand it to
        ``then``; without ``then`` they are read and dropped."""
        self._payload_for = req
        self._payload_then = then
        self._payload_needed = vlen

    # -- dispatch ------------------------------------------------------------

    def _route(self, req: Request) -> None:
        value = req.value
        if value is None:
            slot = Slot(self)
        else:
            slot = PayloadSlot(self, len(value))
            if self._inflight_bytes >= MAX_CLIENT_INFLIGHT_BYTES:
                self._pause_reading()
        self._slots.append(slot)
        self._check_inflight()
        router = self.router
        gathers = router.gathers
        if gathers and batch.events >= gathers:  # else too few to join
            self._held += 1  # before: a router may route and release at once
            if router.gather(req, slot.fill, self._release):
                return
            self._held -= 1
        router.route(req, slot.fill)

    def _release(self) -> None:
        """The router routed a request it gathered: once it routed every
        one, read on."""
        self._held -= 1
        # (with nothing buffered and no EOF, _read_buffered has nothing to do)
        if not self._held and not self._reading_paused and (self._buffer or self._read_closed):
            self._read_buffered()

    def _route_run(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                   sets: list[int], widths: dict[int, int] | None) -> bool:
        """Route a run of plain requests (``scan_plain``) with one slot;
        False if the router routes them one by one instead."""
        # Its requests, a multiget's keys each and END, less the slot itself.
        extra = len(keys) - 1 + (sum(widths.values()) if widths else 0)
        router = self.router
        gathers = router.gathers
        slots = self._slots
        routed = False
        if not extra and gathers and batch.events >= gathers:  # join others'
            # A get's slot is a plain one: the joined unit has no sink, and
            # the get counts nothing extra.
            slot = GroupSlot(self, 0, ends[0] - start) if sets else Slot(self)
            slots.append(slot)
            self._held += 1  # before: a router may route and release at once
            routed = router.gather_plain(keys[0], data[start:ends[0]], bool(sets), slot.fill,
                                         self._release)
            if not routed:
                self._held -= 1
                if not sets:  # refused (an active-request limit): route_run's slot after all
                    slots.pop()
                    slot = GroupSlot(self, 0)
                    slots.append(slot)
        elif widths is not None and gathers and len(keys) == 1 and batch.events >= gathers:
            # a multi-key get alone: join others' too, where the router
            # does (refused, route_run takes the slot as its sink)
            slot = GroupSlot(self, extra)
            slots.append(slot)
            self._held += 1
            routed = router.gather_plain(keys[0], data[start:ends[0]], False, slot.fill,
                                         self._release, None, extra)
            if not routed:
                self._held -= 1
        else:
            slot = GroupSlot(self, extra, ends[-1] - start if sets else 0)
            slots.append(slot)
        if routed or router.route_run(data, start, keys, ends, sets, widths, slot.fill,
                                      sink=slot):
            if self._inflight_bytes >= MAX_CLIENT_INFLIGHT_BYTES \
                    or len(slots) + self._extra_slots >= MAX_CLIENT_INFLIGHT:
                self._pause_reading()
            return True
        slots.pop()
        self._extra_slots -= slot.extra
        self._inflight_bytes -= slot.size
        return False

    def _multiget(self, req: Request, keys: list[bytes]) -> None:
        """Route a hooked multiget: its keys together when the router can
        (``get``/``gets``, every key within the length limit), else split
        into one routed request per key."""
        if len(keys) > MAX_MULTIGET_KEYS:
            self._too_long()
            return
        prefix = multiget_prefix(req)
        if prefix in _BATCH_PREFIXES and max(map(len, keys)) <= MAX_KEY_LENGTH:
            slot = GroupSlot(self, len(keys))
            self._slots.append(slot)
            if self.router.route_keys(req, keys, slot.fill, sink=slot):
                self._check_inflight()
                return
            self._slots.pop()
            self._extra_slots -= slot.extra
        for key in keys:
            if len(key) > MAX_KEY_LENGTH:
                self._slots.append(Slot(self, self.router.wire.reply(errors.KEY_TOO_LONG)))
                continue
            line = prefix + key + b"\r\n"
            if len(line) >= MAX_REQUEST_LINE:
                self._line_too_long()
                return
            self._route(multiget_key(req, prefix, key))
        self._reply(errors.END)

    def _local(self, req: Request) -> None:
        """Commands no route takes: those of the connection itself here,
        the rest answered by the core (``version``, ``stats``, the cache)."""
        cmd = req.command
        if cmd == CMD_MN:
            self._reply(b"MN\r\n")
        elif cmd == CMD_QUIT:
            self._close_after_replies()
        elif cmd == CMD_WATCH:
            self._watch(req.tokens[1:])
        else:
            reply = self.core.answer(req)
            if reply:
                self._reply(reply)

    def _watch(self, streams: list[bytes]) -> None:
        """``watch STREAM ...``: hand the connection to the core's watch
        registry (mcproxy.ops.watch). From its ``OK`` on the connection carries
        only log lines: requests after the ``watch`` are ignored and replies
        still pending are dropped, as in memcached. Watchers do not count as
        client connections (curr_connections, --max-connections, --idle-timeout)."""
        watchers = self.core.watchers
        if watchers is None:
            self._reply(errors.NOT_SUPPORTED)
            return
        self.flush()
        self.write_pending()  # earlier replies go out before the OK
        error = watchers.add(self.transport, streams)
        if error is not None:
            self._reply(error)
            return
        self._closing = True
        self._forget()

    # -- replies -------------------------------------------------------------

    def _reply(self, data: bytes) -> None:
        """Answer in order, right away (the slot is born filled)."""
        self._slots.append(Slot(self, data))
        self.flush()

    def flush(self) -> None:
        """Move every completed reply at the head of the queue to the output,
        written at the end of this reactor iteration (see writes.py)."""
        if self._gone:
            return
        slots = self._slots
        out = self._out
        while slots:
            slot = slots[0]
            data = slot.data
            if data is None:
                break
            slots.popleft()
            if type(slot) is GroupSlot:
                group = slot  # (compiled, typed: protocol.pxd)
                self._extra_slots -= group.extra
            if data:
                out.append(data)
        if not self._batched:
            self._batched = True
            batch.add(self)

    def write_pending(self) -> None:
        """Write the collected replies in one send; hang up or resume
        reading if that was waiting for them."""
        self._batched = False
        if self._gone:
            return
        out = self._out
        if out:
            self._out = []
            send(self.transport, self._socket, out)
            size = 0
            for data in out:
                size += len(data)
            if self._writing_paused:
                self._unsent += size
            else:
                self._waiting -= size  # written, or at most 64 KB in Twisted's buffer
        if self._closing:
            if not self._slots:
                self.transport.loseConnection()
        elif self._reading_paused and not self._writing_paused and self._may_read():
            self._resume_reading()

    def _too_long(self) -> None:
        """``SERVER_ERROR request too long``, then hang up: memcached's
        proxy 1.6.15's answer to a routed line too long, and mcproxy's to a
        multiget beyond its limits, under either wire behaviour."""
        self.stats.conn_errors += 1
        self._reply(errors.REQUEST_TOO_LONG)
        self._close_after_replies()

    def _line_too_long(self) -> None:
        """A routed line of MAX_REQUEST_LINE bytes or more: as 1.6.15
        (``_too_long``), or as 1.6.45, which closes at once (``_refused``)."""
        if self.router.wire.close_refused:
            self.stats.conn_errors += 1
            self._refused()
        else:
            self._too_long()

    def _refused(self) -> None:
        """Close at once, as memcached's proxy 1.6.45 does on a request it
        will not serve: no reply, nothing more read, and the replies not
        yet written (those of earlier requests in the same read, or still
        at the backends) dropped; what was written is still delivered."""
        self._closing = True
        self._forget()
        self.transport.loseConnection()

    def _close_after_replies(self) -> None:
        """Stop reading; hang up once every earlier reply is written."""
        self._closing = True
        self._buffer.clear()
        self.flush()

    # -- backpressure --------------------------------------------------------

    def _may_read(self) -> bool:
        """Whether every limit that paused reading is below its resume mark."""
        return (len(self._slots) + self._extra_slots < MAX_CLIENT_INFLIGHT // 2
                and self._inflight_bytes < MAX_CLIENT_INFLIGHT_BYTES // 2
                and self._waiting < self._pause_at // 2)

    def _add_waiting(self, size: int) -> None:
        waiting = self._waiting = self._waiting + size
        if waiting > self._pause_at:
            self._output_check()

    def _output_check(self) -> None:
        """Past the pause mark: stop reading; past the output limit: the
        client does not read fast enough for what it asked, close it."""
        if self._gone:
            return
        if self._waiting > self.output_limit:
            self._cut_off()
        elif not self._closing:
            self._pause_reading()

    def _cut_off(self) -> None:
        """Close at once for the output limit: drop what waits (the transport
        drops its buffer on abort), and what still comes (``_gone``)."""
        self.stats.conn_output_closed += 1
        self.log.warn(LOG_OUTPUT_LIMIT, client=_peer(self.transport), waiting=self._waiting,
                      limit=self.output_limit, type="proxy_error")
        self._closing = True
        self._forget()
        self.transport.abortConnection()

    def _check_inflight(self) -> None:
        if len(self._slots) + self._extra_slots >= MAX_CLIENT_INFLIGHT:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if not self._read_closed:
            # After the client's EOF, reading again would only meet it again.
            self.transport.resumeProducing()
        if not self._held:
            self._read_buffered()

    def _read_buffered(self) -> None:
        """Read what was held back while reading was paused or the router
        held a request of ours; after the client's EOF, then close."""
        if self._buffer and not self._closing:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._process(data)
        if self._read_closed and not self._reading_paused and not self._held \
                and not self._closing:
            self._close_after_replies()  # what was held is read: now close

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: the client is not reading
        its replies, so stop reading its requests."""
        self._writing_paused = True
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The transport wrote everything it held (Twisted calls this only
        once its buffer is empty): what we handed it is no longer waiting."""
        self._writing_paused = False
        self._waiting -= self._unsent
        self._unsent = 0
        if self._reading_paused and self._may_read():
            self._resume_reading()

    def stopProducing(self) -> None:
        pass


classImplements(ProxyServerProtocol, IProtocol, ILoggingContext, IPushProducer,
                IHalfCloseableProtocol)


class _Rejected(Protocol):
    """A client beyond --max-connections: told so, then hung up on."""

    def connectionMade(self) -> None:
        self.transport.write(TOO_MANY_CONNECTIONS)
        self.transport.loseConnection()


class ProxyServerFactory(Factory):
    """Builds a ProxyServerProtocol per client connection, and applies the
    client limits.

    ``max_connections`` (0: none): a client that connects while that many
    are open gets ``ERROR Too many open connections`` and is closed at once,
    counted in ``rejected``. ``idle_timeout`` (seconds, 0: never): clients
    that sent nothing for that long, and wait for no reply, are closed by a
    sweep that runs while the factory listens; a request costs only the
    ``last_active`` timestamp store. ``output_limit`` (bytes, 0: none): a
    client with more replies waiting for it is closed, counted in
    ``conn_output_closed`` (see ProxyServerProtocol._output_check).
    """

    noisy = False

    def __init__(self, core: IProxyCore, max_connections: int = 0,
                 idle_timeout: float = 0, output_limit: int = CLIENT_OUTPUT_LIMIT) -> None:
        self.core = core
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.output_limit = output_limit
        #: connections refused for max_connections
        self.rejected = 0
        #: clients that have an open connection (watchers excluded)
        self.clients: set[ProxyServerProtocol] = set()
        self._sweeper: LoopingCall | None = None

    def buildProtocol(self, addr, router: IRouter | None = None) -> Protocol:
        """A connection, routed by ``router`` (default: the core's)."""
        if self.max_connections and len(self.clients) >= self.max_connections:
            self.rejected += 1
            return _Rejected()
        proto = ProxyServerProtocol(self.core, self.output_limit, router)
        proto.factory = self
        return proto

    def routed_by(self, router: IRouter) -> ListenerFactory:
        """The factory of a listener whose connections ``router`` routes
        (a tagged listener's), under this factory's limits."""
        return ListenerFactory(self, router)

    def startFactory(self) -> None:
        if self.idle_timeout > 0:
            self._sweeper = LoopingCall(self.close_idle)
            self._sweeper.clock = self.core.clock
            self._sweeper.start(min(MAX_IDLE_SWEEP, self.idle_timeout / 4), now=False)

    def stopFactory(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def close_idle(self) -> None:
        """Close every client idle for idle_timeout with no reply pending."""
        deadline = self.core.clock.seconds() - self.idle_timeout
        for proto in [p for p in self.clients if p.last_active <= deadline and not p._slots]:
            self.clients.discard(proto)
            proto.transport.loseConnection()


class ListenerFactory(Factory):
    """The factory of one listener with a router of its own (a tagged
    listener: mcproxy.routing.engine.RouteEngine.view). Its connections are
    built by ``parent``, whose client limits, count and idle sweep they
    share with every other listener's."""

    noisy = False

    def __init__(self, parent: ProxyServerFactory, router: IRouter) -> None:
        self.parent = parent
        self.router = router

    def doStart(self) -> None:
        self.parent.doStart()

    def doStop(self) -> None:
        self.parent.doStop()

    def buildProtocol(self, addr) -> Protocol:
        return self.parent.buildProtocol(addr, self.router)
