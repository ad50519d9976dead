"""One pipelined connection to a backend: a queue of units, written in
per-turn batches, replies handed to the unit at the head.

The connection knows the interface of :mod:`mcproxy.units` and nothing of
the kinds behind it. It first answers the validation ``version`` request;
only then does its owner hand it units to write. Whatever goes wrong with
the stream (garbage, a reply that does not answer its request, bytes
nobody asked for) is reported to the owner, which resets the connection
and fails every unit in the queue.

Between the connection and its owner (a :class:`~mcproxy.backends.backend.
Backend`) these calls go, and no others:

* owner -> connection: :meth:`BackendConnection.write`,
  :meth:`BackendConnection.abandon`; reading ``factory`` (the attempt it
  belongs to), ``validating``, ``answered_at`` and ``receiving`` (which the
  read timer clears); setting ``on_lost``.
* connection -> owner: ``connection_made(conn) -> bool`` (False: a stale
  attempt, dropped), ``connection_validated(conn)``,
  ``connection_failed(reason, detail)``, ``connection_lost(conn, reason)``;
  and its ``label``, ``log``, ``latency`` and ``reactor``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ILoggingContext, IProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import classImplements

from mcproxy.units import Unit
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.response import (
    FAIL_BADVALIDATE,
    FAIL_TRAILINGDATA,
    MCMC_CODE_VERSION,
    BackendProtocolError,
)
from mcproxy.writes import batch, send, tcp_socket

#: What a new connection sends before any request (memcached 1.6.18+).
VALIDATE_REQUEST = b"version\r\n"

LOG_CALLBACK = "backend {label} response callback failed"


class BackendConnection:
    """One pipelined connection to a backend.

    ``queue`` is the owner's queue of units: those written on this
    connection, oldest first (the first ``written`` of them), then those
    handed over and not written yet. ``owner`` is None once the connection
    has been abandoned (its late events are then ignored).

    A plain class providing IProtocol itself (as Twisted's Protocol would),
    so that it compiles to an extension type (connection.pxd).
    """

    def __init__(self, owner: Any, queue: deque[Unit], keepalive: bool = False) -> None:
        #: IProtocol's: set by makeConnection
        self.transport = None
        self.connected = 0
        #: the connection attempt that built it (Backend's factory sets it)
        self.factory = None
        self.owner = owner
        self.queue = queue
        self.keepalive = keepalive
        self._seconds = owner.reactor.seconds
        self.validating = True
        self.reader = ResponseReader()
        #: fired when an abandoned connection is gone (see Backend.close)
        self.on_lost: Deferred | None = None
        #: units handed over in this reactor iteration, written at its end
        self._pending: list[Unit] = []
        #: units written and not yet answered (the head of ``queue``)
        self.written = 0
        self._batched = False
        self._socket = None
        #: bytes arrived since the read timer last looked (Backend._read_timer)
        self.receiving = False
        #: when the last complete reply was read (Backend._read_timer)
        self.answered_at = 0.0

    def makeConnection(self, transport) -> None:
        """IProtocol's: the connection is made on ``transport``."""
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def logPrefix(self) -> str:
        """ILoggingContext's: what Twisted's log lines about us begin with."""
        return self.__class__.__name__

    def connectionMade(self) -> None:
        transport = self.transport
        self._socket = tcp_socket(transport)
        owner = self.owner
        if owner is None or not owner.connection_made(self):
            self.owner = None
            transport.abortConnection()
            return
        transport.setTcpNoDelay(True)
        if self.keepalive:
            transport.setTcpKeepAlive(True)
        transport.write(VALIDATE_REQUEST)

    def write(self, unit: Unit) -> None:
        """Write ``unit`` at the end of this reactor iteration, with every
        other unit handed over in it, in one send (see writes.py)."""
        self._pending.append(unit)
        if not self._batched:
            self._batched = True
            batch.add(self)

    def write_pending(self) -> None:
        """Write the units handed over since the last call (each may take
        the ones after it into its own request: ``Unit.write``)."""
        self._batched = False
        pending = self._pending
        if not pending or self.owner is None:
            return
        self._pending = []
        self.written += len(pending)
        out: list[bytes] = []
        count = len(pending)
        index = 0
        while index < count:
            index = pending[index].write(out, pending, index + 1)
        send(self.transport, self._socket, out)

    def abandon(self) -> None:
        """Forget the owner and drop the connection."""
        self.owner = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            return
        self.receiving = True
        queue = self.queue
        if self.written:
            # Counted against the head's client as they come (the next
            # unit's may be in there too).
            sink = queue[0].sink
            if sink is not None:
                sink.arriving(len(data))
        reader = self.reader
        if not reader.feed(data):
            return
        if self.validating:
            self._validation_reply(owner)
            return
        now = self._seconds()
        latency = owner.latency
        while self.written:
            unit = queue[0]
            try:
                if not unit.read(reader):
                    return
            except BackendProtocolError as e:
                owner.connection_failed(e.reason, e.detail)
                return
            queue.popleft()
            self.written -= 1
            self.answered_at = now
            elapsed = int((now - unit.sent) * 1e6)
            latency.record(elapsed, unit.size)
            try:
                unit.deliver(elapsed)
            except Exception:
                owner.log.failure(LOG_CALLBACK, label=owner.label)
            if self.owner is None:
                return
        if reader.buffered:
            owner.connection_failed(FAIL_TRAILINGDATA)

    def _validation_reply(self, owner: Any) -> None:
        reader = self.reader
        try:
            res = reader.read(version=True)
        except BackendProtocolError:
            owner.connection_failed(FAIL_BADVALIDATE)
            return
        if res is None:
            return
        if res.code != MCMC_CODE_VERSION:
            owner.connection_failed(FAIL_BADVALIDATE)
        elif reader.buffered:
            owner.connection_failed(FAIL_TRAILINGDATA)
        else:
            self.validating = False
            owner.connection_validated(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.connection_lost(self, reason)
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost.callback(None)


classImplements(BackendConnection, IProtocol, ILoggingContext)
