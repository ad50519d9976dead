"""Coalesced writes: one send per connection per reactor event.

A backend read can complete replies for many clients, and one client's
pipelined requests are often answered by the same read; a client read can
produce requests for the same backend from many lines. While a batch is
open (around ``dataReceived`` of a backend or a client connection), a
protocol with bytes to write only registers itself; when the outermost
batch closes, each registered protocol writes everything it has in a single
send. Outside a batch (a timer firing) bytes are written at once.

The send itself goes straight to the socket when Twisted holds nothing
buffered for it: Twisted's ``write`` always buffers and waits for the next
poll, which costs two ``epoll_ctl`` calls and a loop turn per write.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp

#: Buffers handed to one sendmsg call at most (below Linux's IOV_MAX).
MAX_IOV = 512


class WriteBatch:
    """The open batch, and the protocols with bytes waiting to be written.

    A registered protocol has a ``write_pending()`` method.
    """

    __slots__ = ("depth", "pending")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list = []

    def open(self) -> None:
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            while self.pending:
                pending = self.pending
                self.pending = []
                for proto in pending:
                    proto.write_pending()


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
            sent = sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # write() meets the error again and closes properly
        total = 0
        for buf in buffers:
            total += len(buf)
        if sent == total:
            return
        transport.write(b"".join(buffers)[sent:])
        return
    transport.writeSequence(buffers)
