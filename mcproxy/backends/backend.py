"""The backend state machine: connect, validate, time out, fail, recover.

A :class:`Backend` owns one address, the queue of units (mcproxy.units)
sent to it, and at most one connection to it
(:class:`~mcproxy.backends.connection.BackendConnection`, which writes the
units and hands them their replies; see there for the calls between the
two). Requests are written as soon as they are sent and matched to replies
strictly in order, as memcached's proxy does (mcp-api.md sections 3.2-3.5,
with the 1.6.18+ ``version`` validation).

Every unit is settled exactly once, never inside ``send``: delivered its
reply, or failed when the connection is reset, the backend is marked bad,
the queue is too deep, or the backend is closed.

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
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcproxy.backends.connection import LOG_CALLBACK, BackendConnection
from mcproxy.backends.latency import LatencyWindow
from mcproxy.backends.options import BackendOptions, client_tls
from mcproxy.counters import ProxyStats
from mcproxy.units import Single, Unit
from mcproxy.wire.request import Request
from mcproxy.wire.response import (
    FAIL_CLOSED,
    FAIL_CONNECTING,
    FAIL_CONNTIMEOUT,
    FAIL_DEPTH,
    FAIL_DISCONNECTED,
    FAIL_MARKEDBAD,
    FAIL_READVALIDATE,
    FAIL_TIMEOUT,
    Response,
)

#: Called once per request with its response.
Callback = Callable[[Response], object]

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

#: Bytes of a reset connection's unread input a backend event carries
#: (``rbuf=`` on watch streams, as memcached 1.6.45's proxy shows it).
EVENT_RBUF = 64
LOG_MISMATCH = ("backend {label} ({host}:{port}) sent a reply that does not answer "
                "its request ({detail}); resetting the connection")
LOG_TLS_FAILED = "backend {label} ({host}:{port}) TLS failed: {error}"

#: Slack when comparing the clock with a read deadline.
_EPSILON = 1e-6


class _BackendFactory(ClientFactory):
    """One connection attempt; a Backend ignores events of stale attempts."""

    noisy = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def buildProtocol(self, addr: Any) -> BackendConnection:
        backend = self.backend
        connection = BackendConnection(backend, backend._queue, backend.options.keepalive)
        connection.factory = self
        return connection

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
        #: units sent and not yet settled, oldest first
        self._queue: deque[Unit] = deque()
        try:
            self._port_number: int | None = int(port)
        except ValueError:
            self._port_number = None
        self._state = IDLE
        self._bad = self.options.down
        self._failures = 0
        self._factory: _BackendFactory | None = None
        self._connector: Any = None
        self._connection: BackendConnection | None = None
        self._writer: Callable[[Unit], None] | None = None
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
        request of a PlainRun counts: ``Unit.size``)."""
        return sum(unit.size for unit in self._queue)

    def connect(self) -> None:
        """Start connecting (a no-op unless idle, or when ``down``)."""
        if self._state is IDLE and not self._bad:
            self._connect()

    def send(self, request: Request, callback: Callback) -> None:
        """Send one request; ``callback(response)`` runs later, exactly once
        (a Single unit: see send_unit)."""
        self.send_unit(Single(request, callback))

    def send_unit(self, unit: Unit) -> None:
        """Queue ``unit``; it is settled later, exactly once.

        The depth limit counts units (a KeyBatch or PlainRun as one): the
        route engine makes neither for a backend that has one.
        """
        queue = self._queue
        if self._state is CONNECTED:
            limit = self._depth_limit
            if limit and len(queue) >= limit:
                self._fail_soon(unit, FAIL_DEPTH)
                return
            unit.sent = self._seconds()
            self._writer(unit)
            queue.append(unit)
            if self._timer is None:
                self._timer = self.reactor.callLater(
                    self._read_timeout, self._read_timer)
            return
        if self._state is CLOSED:
            self._fail_soon(unit, FAIL_CLOSED)
        elif self._bad:
            self._fail_soon(unit, FAIL_MARKEDBAD)
        elif self._depth_limit and len(queue) >= self._depth_limit:
            self._fail_soon(unit, FAIL_DEPTH)
        else:
            unit.sent = self._seconds()
            queue.append(unit)
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
        connection = self._connection
        if connection is not None:
            connection.on_lost = closed
            self._drop(connection)
        else:
            if state is CONNECTING:
                self._stop_connecting()
            closed.callback(None)
        self._fail_queue(FAIL_CLOSED)
        return closed

    # The connection's calls (see mcproxy.backends.connection).

    def connection_made(self, connection: BackendConnection) -> bool:
        """A connection is up: validate it. False if its attempt is stale."""
        if connection.factory is not self._factory:
            return False
        self._connection = connection
        self._state = VALIDATING
        self._arm(self._read_timeout, self._validate_timer)
        return True

    def connection_validated(self, connection: BackendConnection) -> None:
        """The connection answered ``version``: write what is queued."""
        self._cancel_timer()
        self._state = CONNECTED
        recovered = self._bad
        failures = self._failures
        self._bad = False
        self._failures = 0
        writer = self._writer = connection.write
        queue = self._queue
        if queue:
            for unit in queue:
                writer(unit)
            self._arm(self._read_timeout, self._read_timer)
        if recovered:
            self.log.info(LOG_RECOVERED, label=self.label, host=self.host,
                          port=self.port, failures=failures, type="proxy_backend")

    def connection_failed(self, reason: str, detail: str = "") -> None:
        """The connection's stream cannot be trusted: reset it, and say why
        when a reply did not answer its request (``detail``)."""
        if detail:
            self.stats.backend_mismatches += 1
            self.log.error(LOG_MISMATCH, label=self.label, host=self.host, port=self.port,
                           detail=detail, type="proxy_backend")
        self._reset(reason)

    def connection_lost(self, connection: BackendConnection, reason: Failure) -> None:
        """The connection is gone (it has forgotten its owner already)."""
        if connection.validating and self._tls is not None \
                and not reason.check(error.ConnectionDone, error.ConnectionLost):
            self.log.warn(LOG_TLS_FAILED, label=self.label, host=self.host,
                          port=self.port, error=reason.getErrorMessage(),
                          type="proxy_backend")
        if connection is self._connection:
            self._reset(FAIL_DISCONNECTED)

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

    def _drop(self, connection: BackendConnection) -> None:
        self._connection = None
        self._writer = None
        connection.abandon()

    def _stop_connecting(self) -> None:
        connector = self._connector
        if connector is not None:
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass

    def _reset(self, reason: str) -> None:
        """Drop the connection, fail its queue, count, reconnect or go bad.

        Failures before validation and read timeouts count; other resets of
        a validated connection (EOF, garbage) reconnect without counting.
        """
        state = self._state
        counted = state is not CONNECTED or reason == FAIL_TIMEOUT
        self._cancel_timer()
        self._factory = None
        connection = self._connection
        rbuf = b""
        if connection is not None:
            rbuf = connection.reader.unread(EVENT_RBUF)
            self._drop(connection)
        elif state is CONNECTING:
            self._stop_connecting()
        queue = self._queue
        failed = list(queue)
        queue.clear()
        requests = sum(unit.size for unit in failed)
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
                               retry=options.retry_timeout, rbuf=rbuf,
                               type="proxy_backend")
            self._state = _WAITING
            self._arm(options.retry_timeout, self._retry_timer)
        else:
            self.log.warn(LOG_RESET, label=self.label, host=self.host,
                          port=self.port, reason=reason, requests=requests,
                          failures=self._failures, rbuf=rbuf, type="proxy_backend")
            if counted:
                self.stats.backend_failed += 1
            self._connect()
        self._fail_units(failed, reason)

    def _fail_queue(self, reason: str) -> None:
        queue = self._queue
        failed = list(queue)
        queue.clear()
        self._fail_units(failed, reason)

    def _fail_units(self, units: list[Unit], reason: str) -> None:
        """Fail every unit (each request its own failure), in order."""
        if not units:
            return
        now = self._seconds()
        for unit in units:
            try:
                unit.fail(reason, int((now - unit.sent) * 1e6))
            except Exception:
                self.log.failure(LOG_CALLBACK, label=self.label)

    def _fail_soon(self, unit: Unit, reason: str) -> None:
        self.reactor.callLater(0, unit.fail, reason, 0)

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
        connection = self._connection
        receiving = connection.receiving
        connection.receiving = False
        due = max(queue[0].sent, connection.answered_at) + self._read_timeout
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
