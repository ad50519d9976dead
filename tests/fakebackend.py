"""A scripted memcached stand-in for fault-injection tests.

:class:`FakeBackend` listens on a free loopback port and serves every
connection in a thread of its own. Left alone it is a tiny memcached: it
answers the proxy's ``version`` validation and ``get``/``gets``,
``set`` and ``delete`` from a dict, ``mn`` with ``MN``. A test scripts a fault
for the next request on a key with :meth:`FakeBackend.fault`: that request is
answered by the given steps instead (send bytes, sleep, drip bytes slowly,
close, reset, hang), in order, on the connection it arrived on. Setting
``silent`` makes it accept connections and never answer anything, not even
``version``. Everything is deterministic apart from thread scheduling: bytes
leave in the order the steps say.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

#: What the fake answers to ``version``.
VERSION_REPLY = b"VERSION 1.6.18-fake\r\n"

_STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}


@dataclass
class Send:
    """Write these bytes at once."""

    data: bytes


@dataclass
class Sleep:
    """Wait this many seconds."""

    seconds: float


@dataclass
class Drip:
    """Write ``data`` ``size`` bytes at a time, ``interval`` seconds apart."""

    data: bytes
    size: int
    interval: float


class Close:
    """Close the connection (FIN) after what was sent."""


class Reset:
    """Abort the connection: the peer sees a TCP reset."""


class Hang:
    """Answer nothing more on this connection (it still reads)."""


class FakeBackend:
    """A scripted memcached on ``127.0.0.1:port``.

    ``requests`` records ``(line, payload)`` of every request received,
    ``version`` included; ``connections`` counts accepted connections.
    ``read_size``/``read_delay`` make it read slowly, and ``rcvbuf`` shrinks
    its receive buffer, so that the proxy's writes to it are partial.
    """

    def __init__(self, read_size: int = 65536, read_delay: float = 0.0,
                 rcvbuf: int | None = None) -> None:
        self.read_size = read_size
        self.read_delay = read_delay
        self.rcvbuf = rcvbuf
        self.silent = False
        self.data: dict[bytes, tuple[bytes, bytes]] = {}
        self.requests: list[tuple[bytes, bytes | None]] = []
        self.connections = 0
        self._faults: dict[bytes, deque[tuple]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted sockets
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    # -- scripting -------------------------------------------------------------

    def fault(self, key: bytes, *steps) -> None:
        """Answer the next request for ``key`` with ``steps`` (none: never)."""
        with self._lock:
            self._faults.setdefault(key, deque()).append(steps or (Hang(),))

    def lines(self) -> list[bytes]:
        """Request lines received, ``version`` excluded."""
        with self._lock:
            return [line for line, _ in self.requests if line != b"version\r\n"]

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeBackend:
        self._listener.listen(64)
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(sock)
            self._spawn(self._serve, sock)

    # -- one connection --------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        buf = b""
        hung = False
        try:
            while not self._stop.is_set():
                eol = buf.find(b"\n")
                if eol < 0:
                    chunk = self._recv(sock)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                line, buf = buf[:eol + 1], buf[eol + 1:]
                tokens = line.split()
                payload = None
                if tokens and tokens[0] in _STORAGE and len(tokens) >= 5:
                    need = int(tokens[4]) + 2
                    while len(buf) < need:
                        chunk = self._recv(sock)
                        if not chunk:
                            return
                        buf += chunk
                    payload, buf = buf[:need], buf[need:]
                key = tokens[1] if len(tokens) > 1 else b""
                with self._lock:
                    self.requests.append((line, payload))
                    faults = self._faults.get(key)
                    steps = faults.popleft() if faults else None
                if hung or self.silent:
                    continue
                if steps is None:
                    sock.sendall(self._answer(tokens, payload))
                    continue
                for step in steps:
                    if isinstance(step, Send):
                        sock.sendall(step.data)
                    elif isinstance(step, Sleep):
                        self._stop.wait(step.seconds)
                    elif isinstance(step, Drip):
                        for i in range(0, len(step.data), step.size):
                            sock.sendall(step.data[i:i + step.size])
                            if self._stop.wait(step.interval):
                                return
                    elif isinstance(step, Close):
                        sock.shutdown(socket.SHUT_RDWR)
                        return
                    elif isinstance(step, Reset):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        return
                    elif isinstance(step, Hang):
                        hung = True
        except OSError:
            return
        finally:
            sock.close()

    def _recv(self, sock: socket.socket) -> bytes:
        if self.read_delay:
            time.sleep(self.read_delay)
        return sock.recv(self.read_size)

    def _answer(self, tokens: list[bytes], payload: bytes | None) -> bytes:
        """What a memcached would answer (enough for the tests)."""
        command = tokens[0] if tokens else b""
        if command == b"version":
            return VERSION_REPLY
        if command == b"mn":
            return b"MN\r\n"
        with self._lock:
            if command in (b"get", b"gets") and len(tokens) >= 2:
                out = []
                for key in tokens[1:]:
                    item = self.data.get(key)
                    if item is not None:
                        flags, value = item
                        out.append(b"VALUE %s %s %d\r\n%s" % (
                            key, flags, len(value) - 2, value))
                out.append(b"END\r\n")
                return b"".join(out)
            if command == b"set" and payload is not None:
                self.data[tokens[1]] = (tokens[2], payload)
                return b"STORED\r\n"
            if command == b"delete" and len(tokens) == 2:
                found = self.data.pop(tokens[1], None)
                return b"DELETED\r\n" if found else b"NOT_FOUND\r\n"
        return b"ERROR\r\n"
