"""Twisted's epoll reactor, dispatching I/O events without a log context.

Twisted's poll-style reactors run every I/O event inside
``twisted.python.log.callWithLogger``: it asks the selectable for its log
prefix and copies a context dictionary so that legacy ``log.msg`` calls
made while handling the event carry that prefix as their ``system``. On
the benchmark machine that wrapping costs about 3 µs per event, and a proxy
handles one or two events per request: with one request in flight per
connection it was a tenth of mcproxy's CPU. mcproxy logs through
``twisted.logger`` (whose events name their own namespace), so the only
thing lost is that prefix on Twisted's legacy messages; errors raised while
handling an event are still logged and still close the connection
(``_doReadOrWrite`` does both).

An event that is a read and nothing else (by far the most common: a
client's request, a backend's replies) goes straight to the selectable's
``doRead``, without ``_doReadOrWrite``'s tests for the other kinds and its
``fileno()`` check (a selectable is removed from the poll before its
socket is closed); what doRead returns or raises disconnects it as
``_doReadOrWrite`` would. Every other event goes through ``_doReadOrWrite``.

Of a read on a TCP connection (``tcp.Connection``, whose ``doRead`` is
Twisted's and not overridden), doPoll does what that ``doRead`` does
itself: ``recv``, an empty read is the end of the stream, EWOULDBLOCK
nothing, any other error a lost connection, else the protocol's
``dataReceived``; the two Python frames it saves were a tenth of what the
reactor ran per request at one connection in flight.

Its main loop (:meth:`ProxyReactor.mainLoop`) polls for as long as the next
timed call allows, as Twisted's does, but asks ``runUntilCurrent`` only
when there is something for it to do (a call due, from a thread, new or to
clean up, a stop to finish), and enters its error handler once rather than
per iteration: with a request in flight at a time, Twisted's loop ran about
110 opcodes per poll doing nothing.

It also offers :meth:`ProxyReactor.call_after_events`, with which the
write batches (mcproxy.writes) run once the events of a poll are
handled without a DelayedCall each, and tells the batch how many events
a poll brought (``WriteBatch.events``): the router gathers requests of
several connections only from a poll of enough of them.

``twistd mcproxy`` switches the running epoll reactor to
:class:`ProxyReactor` (:func:`adopt`) when its ProxyProcess starts
(mcproxy.app.process); an application that embeds
ProxyService keeps its reactor unless it calls :func:`install` or
:func:`adopt` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from errno import EWOULDBLOCK
from select import EPOLLIN

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.logger import Logger

from mcproxy import writes

log = Logger()

#: The longest poll: what Twisted's ReactorBase.timeout allows (epoll_wait's
#: milliseconds in a C int).
LONGEST_POLL = 2147483
#: Twisted's runUntilCurrent cleans up cancelled calls beyond this many.
_CANCELLATIONS = 50
_TCP_READ = tcp.Connection.doRead


class ProxyReactor(EPollReactor):
    """The epoll reactor, minus the log context around each I/O event and
    the generic handling of a read, plus :meth:`call_after_events`."""

    #: While the events of a poll are handled: what to call after them.
    _after_events: list | None = None

    def doPoll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens)
        for I/O, handle each event, then make the calls the handlers asked
        for with call_after_events."""
        selectables = self._selectables
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        handle = self._doReadOrWrite
        after = self._after_events = []
        writes.batch.events = len(events)
        try:
            for fd, event in events:
                # An earlier event of this poll may have removed it.
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                if event != EPOLLIN:
                    handle(selectable, fd, event)
                    continue
                try:
                    if type(selectable).doRead is not _TCP_READ:
                        why = selectable.doRead()
                    else:
                        try:
                            data = selectable.socket.recv(selectable.bufferSize)
                        except OSError as e:
                            why = None if e.args[0] == EWOULDBLOCK else CONNECTION_LOST
                        else:
                            if data:
                                selectable.protocol.dataReceived(data)
                                continue  # (most often: nothing more to do)
                            why = CONNECTION_DONE
                except BaseException:
                    why = sys.exc_info()[1]
                    log.failure("reading from {selectable!r} failed", selectable=selectable)
                if why:
                    self._disconnectSelectable(selectable, why, True)
        finally:
            self._after_events = None
        for call in after:
            try:
                call()
            except Exception:
                log.failure("call after events {call!r} failed", call=call)

    doIteration = doPoll

    def mainLoop(self) -> None:
        """Run until stopped: each iteration runs what is due
        (``runUntilCurrent``, only when something is) and polls until the
        next timed call. An error out of an iteration is logged and the
        loop goes on, as Twisted's does."""
        while self._started:
            try:
                self._iterate()
            except BaseException:
                log.failure("Unexpected error in main loop")
        log.info("Main loop terminated.")

    def _iterate(self) -> None:
        """Iterations until stopped or an error (mainLoop)."""
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            if self._newTimedCalls:  # (what runUntilCurrent and timeout() do first)
                self._insertNewDelayedCalls()
            pending = self._pendingTimedCalls
            now = seconds()
            if pending and pending[0].time <= now or self.threadCallQueue \
                    or self._justStopped or self._cancellations > _CANCELLATIONS:
                self.runUntilCurrent()
                if self._newTimedCalls:
                    self._insertNewDelayedCalls()
                pending = self._pendingTimedCalls  # (runUntilCurrent may make a new one)
                now = seconds()
            if not self.running:
                poll(0)
            elif pending:
                poll(max(0, min(LONGEST_POLL, pending[0].time - now)))
            else:
                poll(None)

    def call_after_events(self, call: Callable[[], object]) -> None:
        """Call ``call()`` once every I/O event of the current poll has been
        handled, or when called outside event handling, on the reactor's next
        iteration: what ``callLater(0, call)`` does, without a DelayedCall
        (about 3.5 µs here) when called from an event handler."""
        after = self._after_events
        if after is None:
            self.callLater(0, call)
        else:
            after.append(call)


def install() -> ProxyReactor:
    """Install a ProxyReactor as the global reactor (before anything
    imports ``twisted.internet.reactor``)."""
    reactor = ProxyReactor()
    installReactor(reactor)
    return reactor


def adopt(reactor) -> bool:
    """Make a Twisted epoll reactor, installed and maybe running, a
    ProxyReactor (it has no state of its own, so the switch is its class
    alone); False, leaving it as it is, for any other reactor."""
    if type(reactor) is not EPollReactor:
        return False
    reactor.__class__ = ProxyReactor
    return True
