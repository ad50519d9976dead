"""Connections to memcached backends: pipelining, validation, timeouts, failures.

A :class:`Backend` owns one address and at most one TCP connection to it
(:class:`BackendProtocol`). Requests are written as soon as they are sent
and matched to replies strictly in order, as memcached's proxy does
(mcp-api.md sections 3.2-3.5, with the 1.6.18+ ``version`` validation).

Every request's callback runs exactly once, never inside ``send``: with the
parsed reply, or with a failure response when the connection is reset, the
backend is marked bad, the queue is too deep, or the backend is closed.

Failure accounting: failures of the connect or validation phase and read
timeouts count; ``failure_limit`` consecutive counted failures without a
successful validation in between make the backend bad. A bad backend fails
requests at once and re-probes every ``retry_timeout``. A connected
connection that is closed by the server or sends garbage is reset and
reconnected without counting a failure (as in memcached).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcproxy.backends.latency import LatencyWindow
from mcproxy.backends.options import BackendOptions, client_tls
from mcproxy.counters import ProxyStats
from mcproxy.wire.request import CMD_GET, CMD_GETS, KeyBatch, PlainRun, Request
from mcproxy.wire.response import (
    FAIL_BADVALIDATE,
    FAIL_CLOSED,
    FAIL_CONNECTING,
    FAIL_CONNTIMEOUT,
    FAIL_DEPTH,
    FAIL_DISCONNECTED,
    FAIL_MARKEDBAD,
    FAIL_READVALIDATE,
    FAIL_TIMEOUT,
    FAIL_TRAILINGDATA,
    MCMC_CODE_VERSION,
    MCMC_RESP_END,
    MCMC_RESP_ERRMSG,
    BackendProtocolError,
    Response,
    ResponseReader,
    check_reply,
    mismatched,
)
from mcproxy.writes import batch, send, tcp_socket

#: Called once per request with its response.
Callback = Callable[[Response], object]

#: What a new connection sends before any request (memcached 1.6.18+).
VALIDATE_REQUEST = b"version\r\n"

# Public states (Backend.state).
IDLE = "idle"
CONNECTING = "connecting"
VALIDATING = "validating"
CONNECTED = "connected"
FAILED = "failed"
BAD = "bad"
CLOSED = "closed"
# Internal: bad, waiting for the retry timer.
_WAITING = "waiting"

# Log events.
LOG_RESET = ("backend {label} ({host}:{port}) error={reason}; "
             "{requests} queued requests failed")
LOG_MARKED_BAD = ("backend {label} ({host}:{port}) error={reason}; marked bad "
                  "after {failures} failures, {requests} queued requests failed, "
                  "retrying every {retry}s")
LOG_RECOVERED = "backend {label} ({host}:{port}) is back after {failures} failures"
LOG_CALLBACK = "backend {label} response callback failed"
LOG_MISMATCH = ("backend {label} ({host}:{port}) sent a reply that does not answer "
                "its request ({detail}); resetting the connection")
LOG_TLS_FAILED = "backend {label} ({host}:{port}) TLS failed: {error}"

#: Slack when comparing the clock with a read deadline.
_EPSILON = 1e-6


_EMPTY = b""

#: Keys merged into one backend multiget at most.
MAX_MERGED_KEYS = 100
#: A unit (see BackendProtocol._units) that is one KeyBatch, answered whole.
_BATCH = 0
#: A unit that is one PlainRun, answered reply by reply as the bytes come.
_RUN = -1

_MERGEABLE = {CMD_GET: b"get", CMD_GETS: b"gets"}


def _merge_name(req: Request) -> bytes | None:
    """``get``/``gets`` if ``req`` is one key of a client multiget that can
    share a backend request with its neighbours (unedited, no noreply)."""
    if req.__class__ is not Request or not req.multiget or req.noreply:
        return None
    name = _MERGEABLE.get(req.command)
    tokens = req.tokens
    if name is None or len(tokens) != 2 or tokens[0] != name or tokens[1] != req.key:
        return None
    return name


def _align(keys: list[bytes], values: list[tuple]) -> list[tuple | None]:
    """The ``VALUE`` items of a multi-key get's reply (as
    ``ResponseReader.read_values`` gives them), one per key, None for a miss.

    memcached answers the keys in request order and skips misses; a value
    whose key is out of that order means the stream is desynchronised.
    """
    aligned: list[tuple | None] = []
    size = len(keys)
    index = 0
    for value in values:
        key = value[0]
        while index < size and keys[index] != key:
            aligned.append(None)
            index += 1
        if index == size:
            raise mismatched("VALUE of a key not asked for, or out of order",
                             b" ".join(keys), key)
        aligned.append(value)
        index += 1
    if index < size:
        aligned.extend([None] * (size - index))
    return aligned


def _check_multi_end(res: Response) -> None:
    """A multi-key get's reply ends in ``END`` or an error line."""
    if res.type != MCMC_RESP_END and res.type != MCMC_RESP_ERRMSG:
        raise mismatched("reply of the wrong kind", b"get", res.line)


def _size(request: Request | PlainRun) -> int:
    """How many client requests a queue entry stands for."""
    cls = request.__class__
    if cls is KeyBatch:
        return len(request.keys)
    if cls is PlainRun:
        return request.requests
    return 1


class BackendProtocol(Protocol):
    """One pipelined connection to a backend.

    ``queue`` holds ``(request, callback, sent time)`` for every request
    written and not yet answered; it is the owning :class:`Backend`'s queue.
    The connection first answers the validation ``version`` request; only
    then are requests written. ``backend`` is None once the connection has
    been abandoned (its late events are then ignored).
    """

    def __init__(self, backend: Backend, queue: deque) -> None:
        self.backend: Backend | None = backend
        self.queue = queue
        self.validating = True
        self.reader = ResponseReader()
        #: fired when a connection abandoned by Backend.close() is gone
        self.on_lost: Deferred | None = None
        #: requests to write at the end of this reactor iteration
        self._requests: list[Request] = []
        #: per request or merged multiget written and not yet answered, how
        #: many queue entries its reply answers (_BATCH: one KeyBatch,
        #: _RUN: one PlainRun)
        self._units: deque[int] = deque()
        #: values received so far for the multi-key get at the head
        self._values: list[tuple] = []
        self._batched = False
        self._socket = None
        #: bytes arrived since the read timer last looked (see _read_timer)
        self.receiving = False
        #: when the last complete reply was read (see _read_timer)
        self.answered_at = 0.0

    def connectionMade(self) -> None:
        transport = self.transport
        self._socket = tcp_socket(transport)
        backend = self.backend
        if backend is None or backend._factory is not self.factory:
            self.backend = None
            transport.abortConnection()
            return
        transport.setTcpNoDelay(True)
        if backend.options.keepalive:
            transport.setTcpKeepAlive(True)
        backend._connection_made(self)

    def write_request(self, req: Request) -> None:
        """Queue one request for writing; the requests of one reactor
        iteration leave in one send (see writes.py)."""
        self._requests.append(req)
        if not self._batched:
            self._batched = True
            batch.add(self)

    def write_pending(self) -> None:
        """Write the queued requests: each its wire line and payload, except
        that consecutive keys of client multigets are sent as one multi-key
        ``get``/``gets`` (one backend request and reply instead of one per
        key, as nutcracker does; the reply is split per key on arrival)."""
        self._batched = False
        requests = self._requests
        if not requests or self.backend is None:
            return
        self._requests = []
        out = []
        units = self._units
        count = len(requests)
        i = 0
        while i < count:
            req = requests[i]
            i += 1
            if req.__class__ is PlainRun:
                out.append(req.data)
                units.append(_RUN)
                continue
            name = _merge_name(req)
            if name is not None:
                keys = [req.key]
                while i < count and len(keys) < MAX_MERGED_KEYS \
                        and _merge_name(requests[i]) == name:
                    keys.append(requests[i].key)
                    i += 1
                if len(keys) > 1:
                    out.append(b"%s %s\r\n" % (name, b" ".join(keys)))
                    units.append(len(keys))
                    continue
            out.append(req.wire_line())
            if req.value is not None:
                out.append(req.value)
            units.append(_BATCH if req.__class__ is KeyBatch else 1)
        send(self.transport, self._socket, out)

    def dataReceived(self, data: bytes) -> None:
        backend = self.backend
        if backend is None:
            return
        self.receiving = True
        queue = self.queue
        units = self._units
        if units and units[0] <= 0:
            # A KeyBatch or PlainRun is answered whole: its client counts
            # the bytes as they come (the next unit's may be in there too).
            sink = queue[0][0].sink
            if sink is not None:
                sink.arriving(len(data))
        reader = self.reader
        if not reader.feed(data):
            return
        if self.validating:
            self._validation_reply(backend)
            return
        now = backend._seconds()
        while units:
            try:
                if units[0] == 1:
                    res = reader.read()
                    if res is None:
                        return
                    check_reply(queue[0][0], res)
                    units.popleft()
                    answers = ((queue.popleft(), res),)
                elif units[0] <= 0:  # a PlainRun or a KeyBatch: one callback
                    read_whole = self._run_reply if units[0] == _RUN else self._batch_reply
                    if not read_whole(reader, backend, now):
                        return
                    if self.backend is None:
                        return
                    continue
                else:
                    answers = self._merged_reply(reader, units[0])
                    if answers is None:
                        return
            except BackendProtocolError as e:
                backend._protocol_error(e)
                return
            self.answered_at = now
            for (_request, callback, sent), res in answers:
                res.elapsed = int((now - sent) * 1e6)
                backend.latency.record(res.elapsed)
                try:
                    callback(res)
                except Exception:
                    backend.log.failure(LOG_CALLBACK, label=backend.label)
                if self.backend is None:
                    return
        if reader.buffered:
            backend._reset(FAIL_TRAILINGDATA)

    def _merged_reply(self, reader: ResponseReader, size: int):
        """Read on in the reply to a merged multiget of ``size`` keys.

        None until its ``END`` has arrived; then the ``size`` queue entries
        it answers, popped, each with its own response: its ``VALUE``, or a
        miss. memcached answers the keys in request order and skips misses;
        a key out of that order is a desync. An error line answers all.
        """
        res = reader.read_values(self._values)
        if res is None:
            return None
        _check_multi_end(res)
        queue = self.queue
        entries = [queue[i] for i in range(size)]
        if res.type == MCMC_RESP_END:
            aligned = _align([entry[0].key for entry in entries], self._values)
            answers = [(entry, Response.miss() if value is None else Response.of_item(value))
                       for entry, value in zip(entries, aligned, strict=True)]
        else:
            answers = [(entry, res) for entry in entries]
        self._values = []
        self._units.popleft()
        for _ in range(size):
            queue.popleft()
        return answers

    def _batch_reply(self, reader: ResponseReader, backend: Backend, now: float) -> bool:
        """Read on in the reply to the KeyBatch at the head of the queue.

        False until it is complete; then its callback gets ``(END, hits)``,
        ``hits`` aligned with the batch's keys: the ``VALUE`` line and data
        of each, None for a miss. For an error line it gets ``(error line,
        None)``. The latency is recorded once per key, as for keys sent one
        by one. Values for a client that is gone are dropped as they come
        (their keys are kept: the reply is still checked).
        """
        values = self._values
        start = len(values)
        res = reader.read_values(values)
        request, callback, sent = self.queue[0]
        sink = request.sink
        if sink is not None and not sink.wanted:
            if values and values[0][1] is not None:
                start = 0  # the client just went: what came before goes too
            values[start:] = [(value[0], None, 0) for value in values[start:]]
        if res is None:
            return False
        _check_multi_end(res)
        keys = request.keys
        hits = None
        if res.type == MCMC_RESP_END:
            hits = [hit and hit[1] for hit in _align(keys, self._values)]
        self._values = []
        self._units.popleft()
        self.queue.popleft()
        self.answered_at = now
        elapsed = res.elapsed = int((now - sent) * 1e6)
        backend.latency.record(elapsed, len(keys))
        try:
            callback(res, hits)
        except Exception:
            backend.log.failure(LOG_CALLBACK, label=backend.label)
        return True

    def _run_reply(self, reader: ResponseReader, backend: Backend, now: float) -> bool:
        """Read on in the replies to the PlainRun at the head of the queue,
        and to the runs right after it.

        Each run all of whose replies have arrived leaves the queue, and its
        callback gets their bytes as ResponseReader.read_raw frames them (as
        they came, but for an error line answering a multi-key get); False
        when the run at the head is still waiting for some. The latency is
        recorded once per request, each key of a multiget counting as one.
        Replies for a client that is gone are dropped as they come.
        """
        queue = self.queue
        units = self._units
        record = backend.latency.record
        while True:
            run, callback, sent = queue[0]
            count = run.count
            sink = run.sink
            while run.answered < count:
                framed = reader.read_raw(count - run.answered, run.parts, run.keys, run.sets,
                                         run.widths, run.answered)
                if sink is not None and not sink.wanted:
                    run.parts.clear()
                    reader.drop_held()
                if not framed:
                    return False
                run.answered += framed
            units.popleft()
            queue.popleft()
            self.answered_at = now
            record(int((now - sent) * 1e6), run.requests)
            parts = run.parts
            try:
                callback(parts[0] if len(parts) == 1 else _EMPTY.join(parts))
            except Exception:
                backend.log.failure(LOG_CALLBACK, label=backend.label)
            if not units or units[0] != _RUN or self.backend is None:
                return True

    def _validation_reply(self, backend: Backend) -> None:
        reader = self.reader
        try:
            res = reader.read(version=True)
        except BackendProtocolError:
            backend._reset(FAIL_BADVALIDATE)
            return
        if res is None:
            return
        if res.code != MCMC_CODE_VERSION:
            backend._reset(FAIL_BADVALIDATE)
        elif reader.buffered:
            backend._reset(FAIL_TRAILINGDATA)
        else:
            self.validating = False
            backend._validated(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        backend = self.backend
        if backend is not None:
            if self.validating and backend._tls is not None \
                    and not reason.check(error.ConnectionDone, error.ConnectionLost):
                backend.log.warn(LOG_TLS_FAILED, label=backend.label, host=backend.host,
                                 port=backend.port, error=reason.getErrorMessage(),
                                 type="proxy_backend")
            self.backend = None
            backend._connection_lost(self)
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost.callback(None)


class _BackendFactory(ClientFactory):
    """One connection attempt; a Backend ignores events of stale attempts."""

    noisy = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        protocol = BackendProtocol(self.backend, self.backend._queue)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.backend._connect_failed(self, reason)


class Backend:
    """One memcached server: its connection, queue, and failure state.

    ``port`` is kept as given (a string from Lua; it also feeds ring hashing);
    one that is not a number fails every connect attempt. ``reactor``
    defaults to the global reactor.
    """

    log = Logger()

    def __init__(self, label: str, host: str, port: str | int,
                 options: BackendOptions | None = None,
                 stats: ProxyStats | None = None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.label = label
        self.host = host
        self.port = port
        self.options = options if options is not None else BackendOptions()
        #: the TLS connection creator, None for plain TCP
        self._tls = client_tls(host, self.options) if self.options.tls else None
        self.stats = stats if stats is not None else ProxyStats()
        self.reactor = reactor
        self._seconds: Callable[[], float] = reactor.seconds
        self._read_timeout = self.options.read_timeout
        self._depth_limit = self.options.depth_limit
        self._queue: deque[tuple[Request, Callback, float]] = deque()
        try:
            self._port_number: int | None = int(port)
        except ValueError:
            self._port_number = None
        self._state = IDLE
        self._bad = self.options.down
        self._failures = 0
        self._factory: _BackendFactory | None = None
        self._connector: Any = None
        self._protocol: BackendProtocol | None = None
        self._writer: Callable[[Request], None] | None = None
        self._timer: Any = None
        #: reply times of answered requests (failures are not counted)
        self.latency = LatencyWindow()

    def __repr__(self) -> str:
        return f"<Backend {self.label} {self.host}:{self.port} {self.state}>"

    def reconfigure(self, options: BackendOptions) -> None:
        """Take the timeouts and limits of a newly loaded config (the
        connection stays; keepalive and TLS apply from the next connection)."""
        self.options = options
        self._tls = client_tls(self.host, options) if options.tls else None
        self._read_timeout = options.read_timeout
        self._depth_limit = options.depth_limit

    @property
    def state(self) -> str:
        """idle, connecting, validating, connected, failed, bad or closed.

        ``failed``: reconnecting after counted failures, below the limit;
        ``bad``: failing requests at once, re-probing every retry_timeout.
        """
        state = self._state
        if state is CLOSED:
            return state
        if self._bad:
            return BAD
        if state is IDLE:
            return state
        if state is not CONNECTED and self._failures:
            return FAILED
        return state

    @property
    def failures(self) -> int:
        """Counted failures since the last successful validation."""
        return self._failures

    @property
    def depth(self) -> int:
        """Requests queued or in flight (each key of a KeyBatch and each
        request of a PlainRun counts)."""
        return sum(_size(item[0]) for item in self._queue)

    def connect(self) -> None:
        """Start connecting (a no-op unless idle, or when ``down``)."""
        if self._state is IDLE and not self._bad:
            self._connect()

    def send(self, request: Request, callback: Callback) -> None:
        """Send ``request``; ``callback(response)`` runs later, exactly once.

        A KeyBatch's callback gets ``(response, hits)`` for a reply (see
        BackendProtocol._batch_reply), a failure alone; a PlainRun's gets
        the bytes of its replies, or a failure (see
        BackendProtocol._run_reply). The depth limit counts a batch or run
        as one request: the route engine makes neither for a backend that
        has one.
        """
        queue = self._queue
        if self._state is CONNECTED:
            limit = self._depth_limit
            if limit and len(queue) >= limit:
                self._fail_soon(callback, FAIL_DEPTH)
                return
            self._writer(request)
            queue.append((request, callback, self._seconds()))
            if self._timer is None:
                self._timer = self.reactor.callLater(
                    self._read_timeout, self._read_timer)
            return
        if self._state is CLOSED:
            self._fail_soon(callback, FAIL_CLOSED)
        elif self._bad:
            self._fail_soon(callback, FAIL_MARKEDBAD)
        elif self._depth_limit and len(queue) >= self._depth_limit:
            self._fail_soon(callback, FAIL_DEPTH)
        else:
            queue.append((request, callback, self._seconds()))
            if self._state is IDLE:
                self._connect()

    def close(self) -> Deferred:
        """Fail what is queued, drop the connection, stop reconnecting.

        The Deferred fires once the connection is gone.
        """
        state = self._state
        if state is CLOSED:
            return succeed(None)
        self._state = CLOSED
        self._cancel_timer()
        self._factory = None
        closed: Deferred = Deferred()
        protocol = self._protocol
        if protocol is not None:
            self._detach(protocol)
            protocol.on_lost = closed
            protocol.transport.abortConnection()
        else:
            if state is CONNECTING:
                self._stop_connecting()
            closed.callback(None)
        self._fail_queue(FAIL_CLOSED)
        return closed

    # Connection lifecycle.

    def _connect(self) -> None:
        self._state = CONNECTING
        factory = _BackendFactory(self)
        self._factory = factory
        timeout = self.options.connect_timeout
        self._arm(timeout, self._connect_timer)
        if self._port_number is None:
            self._connector = None
            self.reactor.callLater(0, factory.clientConnectionFailed, None,
                                   Failure(error.ServiceNameUnknownError(self.port)))
            return
        if self._tls is None:
            self._connector = self.reactor.connectTCP(
                self.host, self._port_number, factory, timeout=timeout)
        else:
            self._connector = self.reactor.connectSSL(
                self.host, self._port_number, factory, self._tls, timeout=timeout)

    def _connect_failed(self, factory: _BackendFactory, reason: Failure) -> None:
        if factory is not self._factory:
            return
        if reason.check(error.TimeoutError):
            self._reset(FAIL_CONNTIMEOUT)
        else:
            self._reset(FAIL_CONNECTING)

    def _connection_made(self, protocol: BackendProtocol) -> None:
        self._protocol = protocol
        self._state = VALIDATING
        self._arm(self._read_timeout, self._validate_timer)
        protocol.transport.write(VALIDATE_REQUEST)

    def _validated(self, protocol: BackendProtocol) -> None:
        self._cancel_timer()
        self._state = CONNECTED
        recovered = self._bad
        failures = self._failures
        self._bad = False
        self._failures = 0
        writer = self._writer = protocol.write_request
        queue = self._queue
        if queue:
            for item in queue:
                writer(item[0])
            self._arm(self._read_timeout, self._read_timer)
        if recovered:
            self.log.info(LOG_RECOVERED, label=self.label, host=self.host,
                          port=self.port, failures=failures, type="proxy_backend")

    def _connection_lost(self, protocol: BackendProtocol) -> None:
        if protocol is self._protocol:
            self._reset(FAIL_DISCONNECTED)

    def _detach(self, protocol: BackendProtocol) -> None:
        self._protocol = None
        self._writer = None
        protocol.backend = None

    def _stop_connecting(self) -> None:
        connector = self._connector
        if connector is not None:
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass

    def _protocol_error(self, error: BackendProtocolError) -> None:
        """The connection's stream cannot be trusted: reset it, and say
        why when a reply did not answer its request."""
        if error.detail:
            self.stats.backend_mismatches += 1
            self.log.error(LOG_MISMATCH, label=self.label, host=self.host, port=self.port,
                           detail=error.detail, type="proxy_backend")
        self._reset(error.reason)

    def _reset(self, reason: str) -> None:
        """Drop the connection, fail its queue, count, reconnect or go bad.

        Failures before validation and read timeouts count; other resets of
        a validated connection (EOF, garbage) reconnect without counting.
        """
        state = self._state
        counted = state is not CONNECTED or reason == FAIL_TIMEOUT
        self._cancel_timer()
        self._factory = None
        protocol = self._protocol
        if protocol is not None:
            self._detach(protocol)
            protocol.transport.abortConnection()
        elif state is CONNECTING:
            self._stop_connecting()
        queue = self._queue
        failed = list(queue)
        queue.clear()
        requests = sum(_size(item[0]) for item in failed)
        was_bad = self._bad
        options = self.options
        if counted:
            self._failures += 1
        if counted and self._failures > options.failure_limit:
            self._bad = True
            if not was_bad:
                self.stats.backend_marked_bad += 1
                self.log.error(LOG_MARKED_BAD, label=self.label, host=self.host,
                               port=self.port, reason=reason,
                               failures=self._failures, requests=requests,
                               retry=options.retry_timeout, type="proxy_backend")
            self._state = _WAITING
            self._arm(options.retry_timeout, self._retry_timer)
        else:
            self.log.warn(LOG_RESET, label=self.label, host=self.host,
                          port=self.port, reason=reason, requests=requests,
                          failures=self._failures, type="proxy_backend")
            if counted:
                self.stats.backend_failed += 1
            self._connect()
        self._fail_items(failed, reason)

    def _fail_queue(self, reason: str) -> None:
        queue = self._queue
        failed = list(queue)
        queue.clear()
        self._fail_items(failed, reason)

    def _fail_items(self, items: list, reason: str) -> None:
        """Give every item its own failure response, in order."""
        if not items:
            return
        now = self._seconds()
        for _request, callback, sent in items:
            res = Response.failure(reason)
            res.elapsed = int((now - sent) * 1e6)
            try:
                callback(res)
            except Exception:
                self.log.failure(LOG_CALLBACK, label=self.label)

    def _fail_soon(self, callback: Callback, reason: str) -> None:
        self.reactor.callLater(0, callback, Response.failure(reason))

    # The single timer: connect, validation, read deadline or retry.

    def _arm(self, delay: float, func: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.reactor.callLater(delay, func)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _connect_timer(self) -> None:
        self._timer = None
        self._reset(FAIL_CONNTIMEOUT)

    def _validate_timer(self) -> None:
        # Timers run before the reactor polls: give a busy process one pass
        # to read a reply that may already be waiting in the socket.
        self._timer = self.reactor.callLater(0, self._validate_expired)

    def _validate_expired(self) -> None:
        self._timer = None
        self._reset(FAIL_READVALIDATE)

    def _read_timer(self) -> None:
        """The oldest request's deadline, re-armed lazily for the next one.

        A request's time runs from when it was sent, or from when the reply
        before it was read if that is later: a backend is not to blame for
        the time the proxy took to read the replies queued ahead (with a
        stuck reply nothing is read, so its deadline stands). And an overdue
        request times out only after a pass of the reactor that brought no
        bytes from the backend: timers run before the reactor polls, so a
        process busy with a burst may not yet have read replies that are
        waiting in the socket.
        """
        self._timer = None
        queue = self._queue
        if not queue or self._state is not CONNECTED:
            return
        protocol = self._protocol
        receiving = protocol.receiving
        protocol.receiving = False
        due = max(queue[0][2], protocol.answered_at) + self._read_timeout
        now = self._seconds()
        if now < due - _EPSILON:
            self._timer = self.reactor.callLater(due - now, self._read_timer)
        elif receiving:
            self._timer = self.reactor.callLater(0, self._read_timer)
        else:
            self._reset(FAIL_TIMEOUT)

    def _retry_timer(self) -> None:
        self._timer = None
        self._connect()
