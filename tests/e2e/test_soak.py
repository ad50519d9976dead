"""Soak: several clients for 30 s while a backend is killed and restarted.

Client threads pipeline sets, gets, deletes and multigets over keys on two
memcached servers, one of which is killed with SIGKILL and restarted on the
same port every few seconds, and check every reply against a model of what
the servers may hold. Afterwards the proxy must be back where it started:
no client or backend connection, file descriptor or route coroutine
(``proxy_req_active``) left over. Set ``MCPROXY_SOAK_SECONDS`` to run longer
(or shorter); ``-k "not soak"`` leaves it out.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from mcproxy.wire import errors
from tests.servers import Proxy, read_until

from .test_faults import backend, backends, config, proc_status, stats, tcp_sockets, wait_for

SOAK_SECONDS = float(os.environ.get("MCPROXY_SOAK_SECONDS", "30"))
CLIENTS = 4
KEYS = 16
#: Seconds the victim runs between kills, and stays dead.
UP, DOWN = 2.5, 0.5

FAILURE = errors.BACKEND_FAILURE

pytestmark = pytest.mark.timeout(SOAK_SECONDS + 60)


class Epochs:
    """Counts changes of the victim (kill, start): bumped before each, so
    a reply that arrives in the epoch its request was sent in, and after
    an acknowledged write in that same epoch, cannot have lost the write."""

    def __init__(self) -> None:
        self.value = 0
        self.kills = 0

    def bump(self) -> None:
        self.value += 1


class Key:
    """What the model knows of one key: the values a get may return,
    whether an acknowledged write says it is there, and the epoch of the
    last acknowledged write or delete (None: one that failed may or may not
    have happened since)."""

    __slots__ = ("name", "possible", "present", "certain")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.possible: set[bytes] = set()
        self.present = False
        self.certain: int | None = None


class Reader:
    """Buffered reads of replies from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("proxy closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while (eol := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:eol + 2], self.buf[eol + 2:]
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


def value_for(rng: random.Random, name: bytes, version: int) -> bytes:
    """A value naming its key and version, 1 byte to 40 KB long."""
    tag = b"%s#%d#" % (name, version)
    size = rng.choice((1, 10, 100, 1000, 40000))
    return (tag * (size // len(tag) + 1))[:max(size, len(tag))]


class Client(threading.Thread):
    """One connection checking every reply against the model."""

    def __init__(self, number: int, port: int, epochs: Epochs, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.number = number
        self.port = port
        self.epochs = epochs
        self.stop = stop
        self.rng = random.Random(number)
        self.keys = [Key(b"%s/c%dk%d" % (prefix, number, k))
                     for prefix in (b"m", b"s") for k in range(KEYS)]
        self.version = 0
        self.requests = 0
        self.failures = 0
        self.mismatches: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                reader = Reader(sock)
                while not self.stop.is_set():
                    self.batch(sock, reader)
        except BaseException as e:  # reported by the test
            self.error = e

    def batch(self, sock: socket.socket, reader: Reader) -> None:
        """Send 1-8 requests in one write, then check their replies in order."""
        ops = []
        out = []
        for _ in range(self.rng.randint(1, 8)):
            kind = self.rng.choice(("set", "set", "get", "get", "get", "delete", "multi"))
            if kind == "multi":
                keys = self.rng.sample(self.keys, 3)
                out.append(b"get %s\r\n" % b" ".join(k.name for k in keys))
                ops.append((kind, keys, None))
                continue
            key = self.rng.choice(self.keys)
            if kind == "set":
                self.version += 1
                value = value_for(self.rng, key.name, self.version)
                out.append(b"set %s 0 0 %d\r\n%s\r\n" % (key.name, len(value), value))
                ops.append((kind, key, value))
            else:
                out.append(b"%s %s\r\n" % (kind.encode(), key.name))
                ops.append((kind, key, None))
        sent = self.epochs.value
        sock.sendall(b"".join(out))
        for kind, key, value in ops:
            self.requests += 1
            getattr(self, "check_" + kind)(reader, key, value, sent)

    def mismatch(self, what: str) -> None:
        self.mismatches.append(what)

    def now_certain(self, key: Key, sent: int) -> bool:
        """No change of the victim between the write that made ``key``
        certain, this request and its reply."""
        return key.certain is not None and key.certain == sent == self.epochs.value

    def check_set(self, reader: Reader, key: Key, value: bytes, sent: int) -> None:
        line = reader.line()
        if line == b"STORED\r\n":
            key.possible = {value}
            key.present = True
            key.certain = self.epochs.value
        elif line == FAILURE:
            self.failures += 1
            key.possible.add(value)  # it may or may not have been stored
        else:
            self.mismatch(f"set {key.name!r}: {line!r}")

    def check_delete(self, reader: Reader, key: Key, value: None, sent: int) -> None:
        line = reader.line()
        if line in (b"DELETED\r\n", b"NOT_FOUND\r\n"):
            found = line == b"DELETED\r\n"
            if self.now_certain(key, sent) and (
                    (key.present and not found) or (found and not key.possible)):
                self.mismatch(f"delete {key.name!r}: {line!r}, model {key.possible}")
            key.possible = set()
            key.present = False
            key.certain = self.epochs.value
        elif line == FAILURE:
            self.failures += 1
            key.certain = None  # it may or may not have been deleted
        else:
            self.mismatch(f"delete {key.name!r}: {line!r}")

    def read_value(self, reader: Reader, line: bytes) -> tuple[bytes, bytes]:
        _, name, _flags, size = line.split()
        return name, reader.exactly(int(size) + 2)[:-2]

    def check_get(self, reader: Reader, key: Key, value: None, sent: int) -> None:
        line = reader.line()
        if line == FAILURE:
            self.failures += 1
            return
        if line == b"END\r\n":
            if key.present and self.now_certain(key, sent):
                self.mismatch(f"get {key.name!r}: a miss after a write was acknowledged")
            return
        if not line.startswith(b"VALUE "):
            self.mismatch(f"get {key.name!r}: {line!r}")
            return
        name, data = self.read_value(reader, line)
        if name != key.name or data not in key.possible:
            self.mismatch(f"get {key.name!r}: {name!r} {data[:40]!r}")
        if reader.line() != b"END\r\n":
            self.mismatch(f"get {key.name!r}: no END")

    def check_multi(self, reader: Reader, keys: list[Key], value: None, sent: int) -> None:
        position = 0
        answers = 0
        while (line := reader.line()) != b"END\r\n":
            answers += 1
            if line == FAILURE:
                self.failures += 1
                continue
            if not line.startswith(b"VALUE "):
                self.mismatch(f"multiget: {line!r}")
                continue
            name, data = self.read_value(reader, line)
            names = [k.name for k in keys]
            if name not in names[position:]:
                self.mismatch(f"multiget: {name!r} out of order in {names}")
                continue
            position = names.index(name, position) + 1
            if data not in keys[position - 1].possible:
                self.mismatch(f"multiget {name!r}: {data[:40]!r}")
        if answers > len(keys):
            self.mismatch(f"multiget: {answers} answers for {len(keys)} keys")


def proxy_backend_connections(pid: int, ports: set[int]) -> int:
    """Established connections to the backends (theirs are the remote ports)."""
    return sum(1 for row in tcp_sockets(pid) if row["state"] == "01" and row["remote"] in ports)


def lua_kb(control: socket.socket) -> int:
    """Memory of the routes' Lua state after a full collection (KB): leaked
    route coroutines would keep it growing."""
    control.sendall(b"get lua/memory\r\n")
    return int(read_until(control, b"\r\n").split()[2])


def snapshot(proxy, control: socket.socket, ports: set[int]) -> dict:
    """What must be the same before and after (asked on one connection,
    ``control``, so that no stats connection comes or goes meanwhile)."""
    general = stats(control)
    return {"fds": proc_status(proxy.proc.pid)["fds"],
            "curr_connections": general["curr_connections"],
            "proxy_req_active": general["proxy_req_active"],
            "backend_connections": proxy_backend_connections(proxy.proc.pid, ports),
            "backends": {label: (be["state"], be["depth"])
                         for label, be in backends(control).items()}}


@pytest.fixture
def soak(memcached_factory):
    """A proxy in front of a victim and a stable memcached."""
    victim, stable = memcached_factory(), memcached_factory()
    proxy = Proxy(None, config_text=config({"m": backend("m", victim.port),
                                            "s": backend("s", stable.port)})).start()
    control = proxy.connect()
    yield proxy, control, victim, stable
    control.close()
    proxy.stop()


def test_soak_kill_and_restart_under_load(soak):
    proxy, control, victim, stable = soak
    ports = {victim.port, stable.port}
    wait_for(lambda: all(be["state"] == "connected" for be in backends(control).values()))
    before = snapshot(proxy, control, ports)
    lua_before = lua_kb(control)
    start_rss = proc_status(proxy.proc.pid)["VmRSS"]

    epochs = Epochs()
    stop = threading.Event()
    clients = [Client(n, proxy.port, epochs, stop) for n in range(CLIENTS)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + SOAK_SECONDS
    try:
        while time.monotonic() + UP + DOWN < deadline:
            time.sleep(UP)
            epochs.bump()
            victim.stop()           # SIGKILL
            epochs.kills += 1
            time.sleep(DOWN)
            epochs.bump()
            victim.start()          # same port, empty
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    for client in clients:
        assert client.error is None, repr(client.error)
        assert not client.is_alive()

    # Back to the start: no client, connection, fd or coroutine left over.
    try:
        wait_for(lambda: snapshot(proxy, control, ports) == before, timeout=5)
    except AssertionError:
        pass  # the assertion below shows the difference
    after = snapshot(proxy, control, ports)
    lua_after = lua_kb(control)
    peak = proc_status(proxy.proc.pid)["VmHWM"]
    requests = sum(c.requests for c in clients)
    failures = sum(c.failures for c in clients)
    mismatches = [m for c in clients for m in c.mismatches]
    print(f"\nsoak: {SOAK_SECONDS:.0f} s, {CLIENTS} clients, {epochs.kills} kills; "
          f"{requests} requests checked, {failures} answered {FAILURE!r}, "
          f"{len(mismatches)} mismatched; RSS {start_rss // 1024} MB at start, "
          f"peak {peak // 1024} MB\n"
          f"before: {before}, Lua {lua_before} KB\nafter:  {after}, Lua {lua_after} KB")
    assert mismatches == []
    assert after == before
    assert lua_after < lua_before + 256
    assert epochs.kills >= max(1, int(SOAK_SECONDS / (UP + DOWN)) - 1)
    assert requests > 1000 and failures < requests
    assert peak < start_rss + 100 * 1024
    assert "Traceback" not in proxy.log()
