"""Errors never cross clients: end to end through ``twistd -n mcproxy``.

All clients of these proxies share one backend connection, where replies are
paired with requests by position. The first test runs well-behaved clients,
each pipelining ``set``/``get``/``mg``/``ms``, multi-key gets and runs of
plain gets of keys and values of its own, against a real memcached while one
hostile connection on the same proxy sends the hostile corpus of
test_differential (the known triggers first) over and over: every reply a
well-behaved client gets must be exactly its own, byte for byte, with no
error. It runs again with a dozen clients that each have one request in
flight, whose lone requests the proxy joins (with the hostile client's) into
one backend run when a poll brings enough of them, also through a failover.

The second group scripts a backend (tests/fakebackend.py) that answers a
request wrongly (an extra ``END``, the ``VALUE`` of another key, ``STORED``
to a get, ``END`` to a set) and checks that the client of that request gets
``SERVER_ERROR backend failure`` and never another key's value, that every
request queued behind it on the connection gets an error too rather than
someone else's reply, and that the proxy reconnects and serves what comes
next correctly.

Everything runs through a route that the engine runs without Lua
(``return pool(r)``) and one that runs in Lua, and through runs of plain
gets and multi-key gets, which have code paths of their own.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import pytest

from mcproxy.wire import errors
from tests.fakebackend import FakeBackend, Send, Sleep
from tests.servers import Memcached, Proxy, read_until

from .test_differential import CORPUS, KNOWN_TRIGGERS, ROUTES

CONFIG = """
function mcp_config_pools()
    mcp.backend_read_timeout(5)
    return mcp.pool({ mcp.backend("one", "127.0.0.1", "%d") })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, %s)
end
"""

FAILURE = errors.BACKEND_FAILURE
#: Well-behaved clients next to the hostile one.
CLIENTS = 4
#: How long the well-behaved clients run next to the hostile one, at least
#: (and until the hostile one has sent the whole corpus once), at most.
HOSTILE_SECONDS = 3.0
HOSTILE_SECONDS_MAX = 7.0
#: Hostile corpus entries sent on one connection before a fresh one.
HOSTILE_BATCH = 20


def start_proxy(port: int, route: str) -> Proxy:
    return Proxy(None, config_text=CONFIG % (port, ROUTES[route])).start()


def call(sock: socket.socket, pipeline: bytes) -> bytes:
    """Send a pipeline and ``mn``; everything up to the ``MN`` (which the
    proxy sends once every earlier reply is out)."""
    sock.sendall(pipeline + b"mn\r\n")
    data = read_until(sock, b"MN\r\n")
    assert data.endswith(b"MN\r\n"), f"no MN after {pipeline[:300]!r}: got {data[-300:]!r}"
    return data[:-len(b"MN\r\n")]


# -- well-behaved clients next to a hostile one ---------------------------------------


def value(client: int, seq: int, part: bytes) -> bytes:
    """A value that says whose it is; its length varies with seq."""
    return b"client=%d/seq=%d/%s/" % (client, seq, part) + b"v" * (seq % 7 * 13)


def good_round(client: int, seq: int) -> tuple[bytes, bytes]:
    """One pipeline of a well-behaved client and its exact answer."""
    base = b"good/%d/%d/" % (client, seq)
    ka, kb, miss = base + b"a", base + b"b", base + b"miss"
    va, vb = value(client, seq, b"a"), value(client, seq, b"b")
    hit_a = b"VALUE %s 0 %d\r\n%s\r\n" % (ka, len(va), va)
    hit_b = b"VALUE %s 0 %d\r\n%s\r\n" % (kb, len(vb), vb)
    exchange = [
        (b"set %s 0 0 %d\r\n%s\r\n" % (ka, len(va), va), b"STORED\r\n"),
        (b"get %s\r\n" % ka, hit_a + b"END\r\n"),
        (b"ms %s %d T0\r\n%s\r\n" % (kb, len(vb), vb), b"HD\r\n"),
        (b"mg %s v k O%d\r\n" % (kb, seq), b"VA %d k%s O%d\r\n%s\r\n" % (len(vb), kb, seq, vb)),
        (b"get %s %s %s\r\n" % (ka, miss, kb), hit_a + hit_b + b"END\r\n"),
        (b"get %s\r\nget %s\r\nget %s\r\n" % (ka, miss, kb),
         hit_a + b"END\r\n" + b"END\r\n" + hit_b + b"END\r\n"),
        (b"gets %s\r\n" % miss, b"END\r\n"),
        (b"mg %s v\r\n" % miss, b"EN\r\n"),
        (b"set %s 0 0 %d noreply\r\n%s\r\n" % (miss, len(va), va), b""),
        (b"delete %s\r\n" % miss, b"DELETED\r\n"),
    ]
    return b"".join(r for r, _ in exchange), b"".join(a for _, a in exchange)


def first_difference(expected: bytes, got: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
              min(len(expected), len(got)))
    start = expected.rfind(b"\r\n", 0, at)
    start = 0 if start < 0 else start + 2
    return (f"at byte {at}: expected {expected[start:start + 200]!r}, "
            f"got {got[start:start + 200]!r}")


class Run:
    """What the threads of one hostile run share."""

    def __init__(self, proxy: Proxy, clients: int = CLIENTS) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.rounds = [0] * clients
        self.hostile_sent = 0
        self.hostile_passes = 0
        #: the hostile entries sent last (for the failure message)
        self.hostile_last: deque[bytes] = deque(maxlen=5)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        self.stop.set()


def good_client(run: Run, client: int) -> None:
    try:
        with run.proxy.connect() as sock:
            sock.settimeout(5)
            seq = 0
            while not run.stop.is_set():
                pipeline, expected = good_round(client, seq)
                sock.sendall(pipeline + b"mn\r\n")
                got = read_until(sock, b"MN\r\n")
                expected += b"MN\r\n"
                if got != expected:
                    run.fail(f"client {client} round {seq}: {first_difference(expected, got)}")
                    return
                seq += 1
                run.rounds[client] = seq
    except Exception as e:  # noqa: BLE001 - reported by the test
        run.fail(f"client {client}: {e!r}")


def lone_client(run: Run, client: int) -> None:
    """A client with one request in flight, each sent on its own (a run of
    one, which the proxy joins with other connections' in one backend run
    when a poll brings enough of them): a set, a get of it, a miss, and a
    multiget of the key, a miss and the key again."""
    try:
        with run.proxy.connect() as sock:
            sock.settimeout(5)
            seq = 0
            while not run.stop.is_set():
                key = b"lone/%d/%d" % (client, seq)
                data = value(client, seq, b"lone")
                for request, expected in [
                        (b"set %s 0 0 %d\r\n%s\r\n" % (key, len(data), data), b"STORED\r\n"),
                        (b"get %s\r\n" % key,
                         b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(data), data)),
                        (b"get %s/miss\r\n" % key, b"END\r\n"),
                        (b"get %s %s/miss %s\r\n" % (key, key, key),
                         b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(data), data) * 2
                         + b"END\r\n")]:
                    sock.sendall(request)
                    got = read_until(sock, expected[-5:])
                    if got != expected:
                        run.fail(f"lone client {client} round {seq}: "
                                 f"{first_difference(expected, got)}")
                        return
                seq += 1
                run.rounds[client] = seq
    except Exception as e:  # noqa: BLE001 - reported by the test
        run.fail(f"lone client {client}: {e!r}")


def drain(sock: socket.socket) -> None:
    """Read until the proxy hangs up (or 2 s pass without a byte)."""
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def hostile_client(run: Run) -> None:
    """The known triggers, each on a connection of its own, then the whole
    corpus in batches, over and over. Each connection sends its entries,
    shuts down its write side and reads whatever comes back until the proxy
    hangs up (having answered what it read), so everything hostile that the
    proxy would forward is forwarded while the well-behaved clients run."""
    entries = [[data] for data in KNOWN_TRIGGERS]
    rest = [data for name, data in CORPUS if not name.startswith("trigger/")]
    entries += [rest[i:i + HOSTILE_BATCH] for i in range(0, len(rest), HOSTILE_BATCH)]
    try:
        while not run.stop.is_set():
            for batch in entries:
                if run.stop.is_set():
                    return
                with run.proxy.connect() as sock:
                    try:
                        for data in batch:
                            sock.sendall(data)
                            run.hostile_sent += 1
                            run.hostile_last.append(data)
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the proxy hung up (a line too long ...)
                    drain(sock)
            run.hostile_passes += 1
    except Exception as e:  # noqa: BLE001 - reported by the test
        run.fail(f"hostile client: {e!r}")


@pytest.fixture(scope="module")
def memcached_server():
    server = Memcached().start()
    yield server
    server.stop()


#: Routes of the lone clients' test: also a failover the engine runs
#: natively (lone requests joined into its first child's backend runs).
LONE_ROUTES = {**ROUTES, "failover": 'require("mcproxy.routes").failover{ pool, pool }'}
#: Clients with one request in flight next to the hostile one.
LONE_CLIENTS = 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route, kind", [*((route, "pipelined") for route in ROUTES),
                                         *((route, "lone") for route in LONE_ROUTES)])
def test_clients_see_only_their_own_replies_next_to_a_hostile_one(memcached_server, route,
                                                                  kind):
    proxy = Proxy(None, config_text=CONFIG % (memcached_server.port, LONE_ROUTES[route])).start()
    try:
        clients, target = (CLIENTS, good_client) if kind == "pipelined" \
            else (LONE_CLIENTS, lone_client)
        run = Run(proxy, clients)
        threads = [threading.Thread(target=target, args=(run, c), daemon=True)
                   for c in range(clients)]
        threads.append(threading.Thread(target=hostile_client, args=(run,), daemon=True))
        start = time.monotonic()
        for thread in threads:
            thread.start()
        while not run.stop.wait(0.05):
            elapsed = time.monotonic() - start
            if elapsed > HOSTILE_SECONDS_MAX or (
                    elapsed > HOSTILE_SECONDS and run.hostile_passes):
                run.stop.set()
        for thread in threads:
            thread.join(10)
        resets = [line for line in proxy.log().splitlines() if "backend one" in line]
        assert not run.failures, (
            f"{run.failures[0]}\nthe hostile client sent last: {list(run.hostile_last)!r}"
            f"\nthe proxy logged: {resets[:5]}")
        assert run.hostile_sent >= len(KNOWN_TRIGGERS)
        assert min(run.rounds) > 0, run.rounds
        with proxy.connect() as sock:  # still serving
            pipeline, expected = good_round(99, 0)
            assert call(sock, pipeline) == expected
    finally:
        proxy.stop()


# -- a backend that answers wrongly ---------------------------------------------------


@pytest.fixture(scope="module")
def fake():
    backend = FakeBackend().start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def fake_proxies(fake):
    proxies = {route: start_proxy(fake.port, route) for route in ROUTES}
    yield proxies
    for proxy in proxies.values():
        proxy.stop()


@dataclass
class Request:
    """A request of a scenario: its bytes and its right answer; it may get
    its failure instead, and only that unless ``right_allowed``."""

    data: bytes
    answer: bytes
    keys: int = 1  # keys of a multi-key get (its failure is one per key + END)
    right_allowed: bool = True

    def failure(self) -> bytes:
        return FAILURE if self.keys == 1 else FAILURE * self.keys + errors.END


#: Wrong answers to the request on the faulted key (the fake sends them
#: instead of its own answer, given the right one), and whether that request
#: may still get its right answer (an extra END after the right answer: only
#: the request behind it can tell).
FAULTS = {
    "extra-END": (lambda right: right + b"END\r\n", True),
    "VALUE-of-another-key": (lambda right: b"VALUE someone/else 0 5\r\nbad!!\r\nEND\r\n", False),
    "STORED-to-a-get": (lambda right: b"STORED\r\n", False),
    "END-to-a-set": (lambda right: b"END\r\n", False),
}


def scenario(fake: FakeBackend, tag: bytes, shape: str, fault: str) -> list[Request]:
    """The requests of one pipeline, one of which the fake answers wrongly:
    one before it, it, and several behind it."""
    def key(name: bytes) -> bytes:
        return b"%s/%s" % (tag, name)

    for name in (b"a", b"b", b"c"):
        fake.data[key(name)] = (b"0", b"val-" + key(name) + b"\r\n")

    def hit(*names: bytes) -> bytes:
        return b"".join(b"VALUE %s 0 %d\r\nval-%s\r\n" % (key(n), len(key(n)) + 4, key(n))
                        for n in names) + b"END\r\n"

    wrong_answer, right_allowed = FAULTS[fault]
    faulted = key(b"x")
    if fault == "END-to-a-set":
        target = Request(b"set %s 0 0 2\r\nhi\r\n" % faulted, b"STORED\r\n",
                         right_allowed=right_allowed)
    elif shape in MULTIGETS:
        target = Request(b"%s %s %s %s\r\n" % (MULTIGETS[shape], faulted, key(b"a"), key(b"b")),
                         hit(b"a", b"b"), keys=3, right_allowed=right_allowed)
    else:
        target = Request(b"get %s\r\n" % faulted, b"END\r\n", right_allowed=right_allowed)
    before = [Request(b"get %s\r\n" % key(b"a"), hit(b"a"))]
    # Behind it: a set first, whose reply cannot be an END or a VALUE, so
    # that whatever the wrong answer leaves over cannot pass for its reply.
    behind = [Request(b"set %s 0 0 3\r\nnew\r\n" % key(b"d"), b"STORED\r\n", right_allowed=False),
              Request(b"get %s\r\n" % key(b"b"), hit(b"b"), right_allowed=False),
              Request(b"get %s\r\n" % key(b"c"), hit(b"c"), right_allowed=False)]
    if shape in MULTIGETS:
        behind.append(Request(b"get %s %s\r\n" % (key(b"b"), key(b"c")), hit(b"b", b"c"),
                              keys=2, right_allowed=False))
    # The fake waits a little first, so that everything behind is queued.
    fake.fault(faulted, Sleep(0.05), Send(wrong_answer(target.answer)))
    return [*before, target, *behind]


def match(requests: list[Request], answer: bytes) -> list[bytes]:
    """Split the client's answer into one reply per request, each its right
    answer (where allowed) or its failure; AssertionError otherwise."""
    replies = []
    pos = 0
    for req in requests:
        choices = [req.failure()] + ([req.answer] if req.right_allowed else [])
        reply = next((c for c in choices if answer.startswith(c, pos)), None)
        assert reply is not None, (
            f"request {req.data[:100]!r} got {answer[pos:pos + 300]!r}, which is neither "
            f"{' nor '.join(repr(c) for c in choices)}\nwhole answer: {answer!r}")
        replies.append(reply)
        pos += len(reply)
    assert pos == len(answer), f"left over: {answer[pos:]!r}"
    return replies


#: How the faulted request is sent: a get in a run of plain requests, or
#: one key of a multi-key get (a ``get`` is still part of a run of plain
#: requests for the direct route, a ``gets`` its keys routed together).
SHAPES = ["run", "multiget", "gets-multiget"]
MULTIGETS = {"multiget": b"get", "gets-multiget": b"gets"}


@pytest.mark.parametrize("shape, fault", [
    (shape, fault) for shape in SHAPES for fault in FAULTS
    if not (fault == "END-to-a-set" and shape in MULTIGETS)])  # a set is no multiget
@pytest.mark.parametrize("route", ROUTES)
def test_wrong_backend_answer_fails_it_and_everything_behind(fake, fake_proxies, route,
                                                             shape, fault):
    proxy = fake_proxies[route]
    tag = b"%s/%s/%s" % (route.encode(), shape.encode(), fault.encode())
    requests = scenario(fake, tag, shape, fault)
    connections = fake.connections
    with proxy.connect() as sock:
        sock.settimeout(5)
        # one send: a run of plain requests (direct route), or a multiget
        answer = call(sock, b"".join(req.data for req in requests))
        # the faulted request and all behind it fail, the one before may
        match(requests, answer)
        assert b"someone/else" not in answer
        # reconnected: the same pipeline, without the fault, is answered right
        again = [Request(req.data, req.answer) for req in requests]
        answer = call(sock, b"".join(req.data for req in again))
        assert answer == b"".join(req.answer for req in again)
        assert fake.connections > connections
