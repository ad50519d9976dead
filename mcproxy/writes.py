"""Coalesced writes: one send per connection per reactor iteration.

One poll of the reactor can bring requests from many clients, all bound
for the same backend, and one backend read can complete replies for many
clients. Writing each of them at once costs a system call per request (and
on loopback a send is most of the cost of a request). Instead, a protocol
with bytes to write registers itself in the process-wide batch, which
flushes once, right after the reactor has handled every event of the
current poll (ProxyReactor.call_after_events; with another reactor
``callLater(0)``, which runs before the next poll): each registered
protocol then writes everything it has in a single send.

The send itself goes straight to the socket when Twisted holds nothing
buffered for it: Twisted's ``write`` always buffers and waits for the next
poll, which costs two ``epoll_ctl`` calls and a loop turn per write.

Where a C compiler is, Cython also builds this module from this file,
typed by ``writes.pxd`` (mcproxy.compiled): the batch's fields, its
methods and ``send`` then run as C.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial

from twisted.internet import tcp
from twisted.logger import Logger

log = Logger()

#: WriteBatch.events when no ProxyReactor counts them: as many as gathering wants.
MANY_EVENTS = 1 << 30
#: Buffers handed to one sendmsg call at most (below Linux's IOV_MAX).
MAX_IOV = 512


class WriteBatch:
    """Protocols with bytes waiting to be written at the end of this
    reactor iteration. A registered protocol has a ``write_pending()``
    method and registers at most once per flush.

    ``schedule(flush)`` defaults to the global reactor's
    ``call_after_events`` (mcproxy.app.reactor.ProxyReactor), else to
    ``callLater(0, flush)``; in-process tests that drive protocols by hand
    replace it with one that calls at once.
    """

    __slots__ = ("pending", "first", "scheduled", "schedule", "events")

    def __init__(self) -> None:
        self.pending: list = []
        #: what call_first was given since the last flush
        self.first: list[Callable[[], object]] = []
        #: how many I/O events the current poll brought, of which work
        #: gathered until the flush may be joined (set by
        #: mcproxy.app.reactor.ProxyReactor; under another, MANY_EVENTS)
        self.events = MANY_EVENTS
        self.scheduled = False
        self.schedule: Callable[[Callable[[], None]], object] | None = None

    def add(self, proto) -> None:
        self.pending.append(proto)
        if not self.scheduled:
            self._schedule()

    def call_first(self, call: Callable[[], object]) -> None:
        """Have ``call()`` run at the next flush, before the protocols
        registered by then write: what it makes them write (the requests
        the router gathered over this poll, mcproxy.routing.engine) goes
        in the same sends."""
        self.first.append(call)
        if not self.scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self.scheduled = True
        schedule = self.schedule
        if schedule is None:
            schedule = self.schedule = _scheduler()
        schedule(self.flush)

    def flush(self) -> None:
        try:
            while True:
                first = self.first
                if first:
                    self.first = []
                    for call in first:
                        try:
                            call()
                        except Exception:
                            log.failure("{call!r} before the writes failed", call=call)
                pending = self.pending
                if not pending:
                    break
                self.pending = []
                for proto in pending:
                    try:
                        proto.write_pending()
                    except Exception:
                        log.failure("writing to {proto!r} failed", proto=proto)
        finally:
            self.scheduled = False


def _scheduler() -> Callable[[Callable[[], None]], object]:
    """The global reactor's way to call something once this iteration's
    events are handled."""
    from twisted.internet import reactor

    after_events = getattr(reactor, "call_after_events", None)
    if after_events is not None:
        return after_events
    return partial(reactor.callLater, 0)


#: The process-wide batch (one reactor, one thread).
batch = WriteBatch()


def tcp_socket(transport) -> socket.socket | None:
    """The socket of a plain TCP transport (None for TLS, tests ...)."""
    if isinstance(transport, tcp.Connection):
        return transport.socket
    return None


def send(transport, sock: socket.socket | None, buffers: list[bytes]) -> None:
    """Write ``buffers`` in order, directly if the transport is idle."""
    if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer \
            and not transport.disconnecting and len(buffers) <= MAX_IOV:
        try:
            # send() for one buffer: sendmsg's iovec costs ~0.7 µs more here.
            sent = sock.send(buffers[0]) if len(buffers) == 1 else sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # write() meets the error again and closes properly
        if sent == sum(map(len, buffers)):
            return
        transport.write(b"".join(buffers)[sent:])
        return
    transport.writeSequence(buffers)
