"""Fault injection: what clients see when a backend dies, hangs, restarts,
answers garbage or is slow.

Every test runs a real ``twistd -n mcproxy`` with small timeouts against
real memcached processes (killed with SIGKILL, hung with SIGSTOP, restarted
on the same port) or a scripted :class:`FakeBackend`, and asserts the exact
reply to every request and their order, the time until an error arrives,
recovery once the backend is back, the counters of ``stats`` and
``stats proxybe``, and exactly one log event per reset.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from mcproxy.ops.stats import backend_stats, format_stats
from mcproxy.wire import errors
from tests.fakebackend import Close, Drip, FakeBackend, Reset, Send, Sleep
from tests.servers import Memcached, Proxy, exchange, read_until

#: The timeouts the tests configure (seconds), and the slack allowed on top
#: of one for a timer to fire in another, busy process.
TIMEOUT = 0.5
MARGIN = 0.35
#: Failures in a row that a backend survives; one more marks it bad.
FAILURE_LIMIT = 2

FAILURE = errors.BACKEND_FAILURE

TUNABLES = f"""
    mcp.backend_connect_timeout({TIMEOUT})
    mcp.backend_read_timeout({TIMEOUT})
    mcp.backend_retry_timeout({TIMEOUT})
    mcp.backend_failure_limit({FAILURE_LIMIT})
"""

# Keys "<prefix>/..." go to the pool of that prefix, one backend each;
# "lua/memory" answers with the memory of the routes' Lua state.
CONFIG = """
function mcp_config_pools()
%(tunables)s
    return {
%(pools)s
    }
end

function mcp_config_routes(pools)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        if r:key() == "lua/memory" then
            -- the route state's memory after a full collection, in KB
            collectgarbage("collect")
            return string.format("SERVER_ERROR lua_kb %%d\\r\\n",
                                 math.floor(collectgarbage("count")))
        end
        local pool = pools[string.match(r:key(), "^(%%a+)/")]
        if pool == nil then
            return "SERVER_ERROR no route\\r\\n"
        end
        return pool(r)
    end)
end
"""

#: A backend's reset, as logged (memcached's ``error=`` names).
LOG_RESET = re.compile(r"backend (\S+) \((\S+)\) error=(\w+); (?:marked bad after \d+ "
                       r"failures, )?(\d+) queued requests failed")


def backend(label: str, port: int, **options) -> str:
    """A Lua ``mcp.backend{}`` for ``127.0.0.1:port``."""
    fields = [f'label = "{label}"', 'host = "127.0.0.1"', f'port = "{port}"']
    for name, value in options.items():
        fields.append(f"{name} = {str(value).lower()}")
    return "mcp.backend{ " + ", ".join(fields) + " }"


def config(backends: dict[str, str], tunables: str = TUNABLES) -> str:
    pools = "\n".join(f"        {label} = mcp.pool({{ {expr} }})," for label, expr in
                      backends.items())
    return CONFIG % {"tunables": tunables, "pools": pools}


# -- looking at a running proxy ------------------------------------------------


def stats(proxy: Proxy | socket.socket, which: bytes = b"") -> dict[str, str]:
    """``stats [which]`` as a dict, on a new connection or on ``proxy`` if
    that is a connected socket."""
    request = b"stats " + which + b"\r\n" if which else b"stats\r\n"
    if isinstance(proxy, socket.socket):
        proxy.sendall(request)
        reply = read_until(proxy, b"END\r\n")
    else:
        reply = proxy.call(request, b"END\r\n")
    pairs = {}
    for line in reply.decode().split("\r\n"):
        if line.startswith("STAT "):
            _, name, value = line.split(" ")
            pairs[name] = value
    return pairs


def backends(proxy: Proxy | socket.socket) -> dict[str, dict[str, str]]:
    """``stats proxybe`` by label: state, failures, depth and address."""
    table = {}
    for name, value in stats(proxy, b"proxybe").items():
        label, _, address = name.partition(":")
        fields = dict(item.split("=") for item in value.split(","))
        table[label] = {**fields, "address": address}
    return table


def state(proxy: Proxy, label: str) -> tuple[str, str, str]:
    be = backends(proxy)[label]
    return be["state"], be["failures"], be["depth"]


def resets(proxy: Proxy, label: str) -> list[tuple[str, int]]:
    """(reason, failed requests) of every reset logged for ``label``."""
    return [(m.group(3), int(m.group(4))) for m in LOG_RESET.finditer(proxy.log())
            if m.group(1) == label]


def wait_for(predicate, timeout: float = 10.0) -> float:
    """Poll until predicate() is true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"still not true after {timeout}s: {predicate}")
        time.sleep(0.01)
    return time.monotonic() - start


def ask(sock: socket.socket, request: bytes, expected: bytes) -> tuple[bytes, float]:
    """Send request, read len(expected) bytes: the reply and how long it took."""
    start = time.monotonic()
    reply = exchange(sock, request, expected)
    return reply, time.monotonic() - start


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes (fewer if the peer closes or the socket times out)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    try:
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                break
            got += n
    except TimeoutError:
        pass
    return bytes(buf[:got])


def read_one_of(sock: socket.socket, *choices: bytes) -> bytes:
    """Read byte by byte until the data is one of ``choices`` (small replies)."""
    data = b""
    while data not in choices and any(c.startswith(data) for c in choices):
        byte = sock.recv(1)
        if not byte:
            break
        data += byte
    return data


def recover(sock: socket.socket, request: bytes, good: bytes, limit: float) -> float:
    """Repeat ``request`` while it fails; the seconds until it answers ``good``."""
    start = time.monotonic()
    while True:
        sock.sendall(request)
        reply = read_one_of(sock, FAILURE, good)
        if reply == good:
            return time.monotonic() - start
        assert reply == FAILURE, reply
        assert time.monotonic() - start < limit, "no recovery"
        time.sleep(0.01)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) in kB, and open fds, of a process."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                status[name] = int(value.split()[0])
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return status


def tcp_sockets(pid: int) -> list[dict]:
    """The process's TCP sockets: local/remote port, state, timer, queues."""
    rows = []
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            tx, rx = fields[4].split(":")
            rows.append({"local": int(fields[1].split(":")[1], 16),
                         "remote": int(fields[2].split(":")[1], 16),
                         "state": fields[3], "timer": fields[5].split(":")[0],
                         "tx": int(tx, 16), "rx": int(rx, 16)})
    return rows


def pause(server: Memcached) -> None:
    """SIGSTOP ``server`` and wait until every thread of it has stopped
    (the signal is delivered asynchronously)."""
    server.pause()
    pid = server.proc.pid

    def stopped() -> bool:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rpartition(")")[2].split()[0])
        return all(state in ("T", "t") for state in states)

    wait_for(stopped, timeout=5)


def value_reply(key: bytes, value: bytes, flags: int = 0) -> bytes:
    return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(value), value)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def start_proxy():
    """Start proxies for a config; each is stopped, and its log checked."""
    started: list[Proxy] = []

    def start(pools: dict[str, str], tunables: str = TUNABLES) -> Proxy:
        proxy = Proxy(None, config_text=config(pools, tunables)).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        log = proxy.log()
        proxy.stop()
        assert "Traceback" not in log


@pytest.fixture
def fake():
    backend = FakeBackend().start()
    yield backend
    backend.stop()


def connected(proxy: Proxy, *labels: str) -> None:
    wait_for(lambda: all(state(proxy, label)[0] == "connected" for label in labels))


# -- stats proxybe ---------------------------------------------------------------


def test_backend_stats_lines_keep_three_fields():
    bes = [SimpleNamespace(label="b", host="10.0.0.2", port="11211", state="bad",
                           failures=4, depth=0),
           SimpleNamespace(label="a b", host="h", port="1", state="connected",
                           failures=0, depth=7)]
    assert format_stats(backend_stats(bes)) == (
        b"STAT a_b:h:1 state=connected,failures=0,depth=7\r\n"
        b"STAT b:10.0.0.2:11211 state=bad,failures=4,depth=0\r\n"
        b"END\r\n")


def test_stats_proxybe_lists_every_backend(start_proxy, memcached, fake):
    proxy = start_proxy({"m": backend("m", memcached.port),
                         "f": backend("f", fake.port),
                         "d": backend("d", fake.port, down=True)})
    connected(proxy, "m", "f")
    assert proxy.call(b"stats proxybe\r\n", b"END\r\n") == (
        b"STAT d:127.0.0.1:%d state=bad,failures=0,depth=0\r\n"
        b"STAT f:127.0.0.1:%d state=connected,failures=0,depth=0\r\n"
        b"STAT m:127.0.0.1:%d state=connected,failures=0,depth=0\r\n"
        b"END\r\n" % (fake.port, fake.port, memcached.port))
    general = stats(proxy)
    assert (general["proxy_backend_total"], general["proxy_backend_marked_bad"],
            general["proxy_backend_failed"]) == ("3", "0", "0")


# -- real memcached: killed, hung, restarted -------------------------------------


def test_kill_9_with_pipelined_requests_in_flight(start_proxy, memcached_factory):
    victim, other = memcached_factory(), memcached_factory()
    proxy = start_proxy({"m": backend("m", victim.port), "n": backend("n", other.port)})
    with proxy.connect() as s:
        setup = b"set m/a 0 0 1\r\na\r\nset n/b 0 0 1\r\nb\r\n"
        assert exchange(s, setup, b"STORED\r\n" * 2) == b"STORED\r\n" * 2
        pause(victim)
        # Ten requests to the victim, each followed by one the other server
        # answers at once; every reply waits for the victim's.
        pipeline = b"".join(b"get m/a\r\nget n/b\r\n" if i % 2 else
                            b"set m/%d 0 0 1\r\nx\r\nget n/b\r\n" % i for i in range(10))
        s.sendall(pipeline)
        wait_for(lambda: state(proxy, "m")[2] == "10")
        s.setblocking(False)
        with pytest.raises(BlockingIOError):   # n's replies wait for m's
            s.recv(100)
        s.settimeout(10)
        start = time.monotonic()
        victim.stop()  # SIGKILL
        expected = (FAILURE + value_reply(b"n/b", b"b")) * 10
        reply = exchange(s, b"", expected)
        elapsed = time.monotonic() - start
    assert reply == expected
    assert elapsed < MARGIN
    # Marked bad within milliseconds: the reconnects are refused.
    wait_for(lambda: state(proxy, "m") == ("bad", str(FAILURE_LIMIT + 1), "0"))
    with proxy.connect() as s:
        reply, fast = ask(s, b"get m/a\r\n", FAILURE)
        assert reply == FAILURE and fast < 0.1
    # One event for the reset that failed the ten, then one per refused
    # reconnect (one may be accepted by the dying process, then dropped).
    events = resets(proxy, "m")
    assert events[0] == ("disconnected", 10)
    assert len(events) == FAILURE_LIMIT + 2
    assert {reason for reason, _ in events[1:]} <= {"connecting", "disconnected"}
    assert sum(failed for _, failed in events) == 10
    general = stats(proxy)
    assert general["proxy_backend_marked_bad"] == "1"
    assert general["proxy_backend_failed"] == str(FAILURE_LIMIT)

    victim.start()  # the same port, empty
    with proxy.connect() as s:
        recovery = recover(s, b"get m/a\r\n", b"END\r\n", TIMEOUT + MARGIN)
    assert state(proxy, "m") == ("connected", "0", "0")
    assert re.search(rf"backend m \(127.0.0.1:{victim.port}\) is back after \d+ failures",
                     proxy.log())
    assert stats(proxy)["proxy_req_active"] == "0"
    print(f"kill -9: 10 in-flight requests failed {elapsed * 1000:.0f} ms after the "
          f"kill; recovered {recovery * 1000:.0f} ms after restart")


def test_sigstop_hang_times_out_then_recovers(start_proxy, memcached):
    # A generous global read timeout, overridden for this one backend.
    tunables = TUNABLES.replace(f"backend_read_timeout({TIMEOUT})", "backend_read_timeout(5)")
    proxy = start_proxy({"m": backend("m", memcached.port, readtimeout=TIMEOUT)}, tunables)
    with proxy.connect() as s:
        assert exchange(s, b"set m/k 0 0 2\r\nhi\r\n", b"STORED\r\n") == b"STORED\r\n"
        pause(memcached)
        try:
            start = time.monotonic()
            s.sendall(b"get m/k\r\n")
            time.sleep(0.2)
            s.sendall(b"get m/j\r\n")     # queued behind the stuck one
            reply = exchange(s, b"", FAILURE * 2)
            elapsed = time.monotonic() - start
            assert reply == FAILURE * 2
            assert TIMEOUT - 0.05 < elapsed < TIMEOUT + MARGIN
            assert resets(proxy, "m") == [("timeout", 2)]
            # Reconnects succeed but validation never answers: marked bad
            # after FAILURE_LIMIT + 1 counted failures, then errors are fast.
            wait_for(lambda: state(proxy, "m")[0] == "bad",
                     timeout=(FAILURE_LIMIT + 2) * (TIMEOUT + MARGIN))
            reply, fast = ask(s, b"get m/k\r\n", FAILURE)
            assert reply == FAILURE and fast < 0.1
            assert resets(proxy, "m") == [("timeout", 2)] + [("readvalidate", 0)] * 2
        finally:
            memcached.resume()
        # Recovered within a retry period plus one validation; the data is
        # still there (the server was only paused).
        recovery = recover(s, b"get m/k\r\n", value_reply(b"m/k", b"hi"),
                           2 * TIMEOUT + MARGIN)
    assert state(proxy, "m") == ("connected", "0", "0")
    general = stats(proxy)
    assert general["proxy_backend_marked_bad"] == "1"
    assert general["proxy_backend_failed"] == str(FAILURE_LIMIT)
    print(f"SIGSTOP: error after {elapsed * 1000:.0f} ms (read timeout "
          f"{TIMEOUT * 1000:.0f} ms); recovered {recovery * 1000:.0f} ms after SIGCONT")


def test_restart_on_the_same_port(start_proxy, memcached):
    proxy = start_proxy({"m": backend("m", memcached.port)})
    connected(proxy, "m")
    memcached.stop()
    wait_for(lambda: state(proxy, "m")[0] == "bad")
    with proxy.connect() as s:
        for _ in range(3):  # bad: failed at once, the socket is not touched
            reply, fast = ask(s, b"set m/k 0 0 1\r\nx\r\n", FAILURE)
            assert reply == FAILURE and fast < 0.1
        memcached.start()
        recover(s, b"set m/k 0 0 1\r\nx\r\n", b"STORED\r\n", TIMEOUT + MARGIN)
        assert exchange(s, b"get m/k\r\n", value_reply(b"m/k", b"x")) == value_reply(
            b"m/k", b"x")
    events = resets(proxy, "m")
    assert events[0] == ("disconnected", 0)
    assert len(events) == FAILURE_LIMIT + 2
    assert {reason for reason, _ in events[1:]} <= {"connecting", "disconnected"}
    assert sum(failed for _, failed in events) == 0
    assert memcached.get(b"m/k") == b"x"


# -- scripted backends ---------------------------------------------------------


@pytest.mark.parametrize("garbage, reason", [
    (b"GARBAGE\r\n", "parsing"),
    (b"END\n", "parsing"),
    (b"STAT pid 1\r\n", "unhandledres"),
    (b"VALUE f/bad 0 1\r\nx\r\nVALUE f/bad 0 1\r\nx\r\nEND\r\n", "missingend"),
    (b"VALUE f/bad 0 3\r\nxyz\r\nEN", "missingend"),   # wrong, and incomplete
    (b"x" * 20000, "parsing"),                          # a line that never ends
], ids=["garbage", "bare-newline", "stat", "two-values", "value-without-end", "endless-line"])
def test_garbage_resets_the_connection(start_proxy, fake, garbage, reason):
    proxy = start_proxy({"f": backend("f", fake.port)})
    fake.fault(b"f/bad", Send(garbage))
    with proxy.connect() as s:
        expected = b"END\r\n" + FAILURE * 2
        reply, elapsed = ask(s, b"get f/before\r\nget f/bad\r\nget f/after\r\n", expected)
        assert reply == expected
        assert elapsed < MARGIN
        assert exchange(s, b"get f/again\r\n", b"END\r\n") == b"END\r\n"
    assert resets(proxy, "f") == [(reason, 2)]
    assert state(proxy, "f") == ("connected", "0", "0")
    assert fake.connections == 2
    general = stats(proxy)
    assert (general["proxy_backend_failed"], general["proxy_backend_marked_bad"]) == ("0", "0")


def test_unexpected_data_when_nothing_is_queued(start_proxy, fake):
    proxy = start_proxy({"f": backend("f", fake.port)})
    fake.fault(b"f/k", Send(b"END\r\n"), Sleep(0.1), Send(b"END\r\n"))
    with proxy.connect() as s:
        assert exchange(s, b"get f/k\r\n", b"END\r\n") == b"END\r\n"
        wait_for(lambda: fake.connections == 2)
        assert exchange(s, b"get f/k\r\n", b"END\r\n") == b"END\r\n"
    assert resets(proxy, "f") == [("trailingdata", 0)]


def test_half_reply_then_close(start_proxy, fake):
    proxy = start_proxy({"f": backend("f", fake.port)})
    fake.fault(b"f/half", Send(b"VALUE f/half 0 10\r\nabc"), Sleep(0.05), Close())
    with proxy.connect() as s:
        reply, elapsed = ask(s, b"get f/half\r\nget f/next\r\n", FAILURE * 2)
        assert reply == FAILURE * 2
        assert 0.05 < elapsed < MARGIN
        assert exchange(s, b"get f/half\r\n", b"END\r\n") == b"END\r\n"
    assert resets(proxy, "f") == [("disconnected", 2)]
    assert state(proxy, "f") == ("connected", "0", "0")


def test_reset_in_the_middle_of_a_large_value(start_proxy, fake):
    proxy = start_proxy({"f": backend("f", fake.port)})
    value = bytes(range(256)) * 4096  # 1 MiB
    fake.data[b"f/big"] = (b"0", value + b"\r\n")
    fake.fault(b"f/big", Send(b"VALUE f/big 0 %d\r\n" % len(value) + value[:300000]),
               Sleep(0.05), Reset())
    with proxy.connect() as s:
        reply, elapsed = ask(s, b"get f/big\r\nget f/small\r\n", FAILURE * 2)
        assert reply == FAILURE * 2
        assert elapsed < MARGIN
        expected = value_reply(b"f/big", value)
        s.sendall(b"get f/big\r\n")
        assert read_exactly(s, len(expected)) == expected
    assert resets(proxy, "f") == [("disconnected", 2)]


def test_slow_drip_completes_within_the_deadline_else_times_out(start_proxy, fake):
    proxy = start_proxy({"f": backend("f", fake.port)})
    value = b"d" * 200
    fake.data[b"f/drip"] = (b"0", value + b"\r\n")
    reply = value_reply(b"f/drip", value)
    fake.fault(b"f/drip", Drip(reply, 20, 0.02))   # about 0.22 s: in time
    fake.fault(b"f/drip", Drip(reply, 20, 0.1))    # about 1.1 s: too late
    with proxy.connect() as s:
        got, in_time = ask(s, b"get f/drip\r\n", reply)
        assert got == reply
        assert 0.15 < in_time < TIMEOUT
        got, too_late = ask(s, b"get f/drip\r\n", FAILURE)
        assert got == FAILURE
        assert TIMEOUT - 0.05 < too_late < TIMEOUT + MARGIN
        assert exchange(s, b"get f/drip\r\n", reply) == reply
    assert resets(proxy, "f") == [("timeout", 1)]
    assert stats(proxy)["proxy_backend_failed"] == "1"
    print(f"slow drip: answered in {in_time * 1000:.0f} ms; timed out after "
          f"{too_late * 1000:.0f} ms")


def test_accept_then_never_answer(start_proxy, fake):
    fake.silent = True
    proxy = start_proxy({"f": backend("f", fake.port)})
    with proxy.connect() as s:
        reply, elapsed = ask(s, b"get f/k\r\n", FAILURE)
        assert reply == FAILURE
        assert elapsed < TIMEOUT + MARGIN   # queued while validating
        wait_for(lambda: state(proxy, "f")[0] == "bad",
                 timeout=(FAILURE_LIMIT + 2) * (TIMEOUT + MARGIN))
        reply, fast = ask(s, b"get f/k\r\n", FAILURE)
        assert reply == FAILURE and fast < 0.1
        fake.silent = False
        # The probe under way still times out; the next one succeeds.
        recovery = recover(s, b"get f/k\r\n", b"END\r\n", 2 * TIMEOUT + MARGIN)
    events = resets(proxy, "f")
    assert [reason for reason, _ in events] == ["readvalidate"] * (FAILURE_LIMIT + 1)
    assert sum(failed for _, failed in events) == 1
    assert stats(proxy)["proxy_backend_marked_bad"] == "1"
    assert state(proxy, "f") == ("connected", "0", "0")
    print(f"never answers: error after {elapsed * 1000:.0f} ms, bad, "
          f"recovered {recovery * 1000:.0f} ms after it answers again")


def test_connect_timeout(start_proxy):
    # A listener whose accept queue is full: the kernel drops new SYNs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        # The global connect timeout is long; this backend's own is short.
        tunables = TUNABLES.replace(f"backend_connect_timeout({TIMEOUT})",
                                    "backend_connect_timeout(5)")
        proxy = start_proxy({"f": backend("f", listener.getsockname()[1],
                                          connecttimeout=0.3)}, tunables)
        with proxy.connect() as s:
            reply, elapsed = ask(s, b"get f/k\r\n", FAILURE)
            assert reply == FAILURE
            assert elapsed < 0.3 + MARGIN
            wait_for(lambda: state(proxy, "f")[0] == "bad",
                     timeout=(FAILURE_LIMIT + 2) * (0.3 + MARGIN))
        events = resets(proxy, "f")
        assert [reason for reason, _ in events] == ["conntimeout"] * (FAILURE_LIMIT + 1)
        assert sum(failed for _, failed in events) == 1
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def test_one_megabyte_values_both_directions(start_proxy, memcached):
    # Six 1 MiB values pipelined to a backend that reads slowly through a
    # small window, and back to a client that does the same: more than the
    # kernel takes at once, so the proxy's writes both ways are partial and
    # resume when the socket drains.
    slow = FakeBackend(read_size=16384, read_delay=0.001, rcvbuf=16384).start()
    try:
        tunables = TUNABLES.replace(f"backend_read_timeout({TIMEOUT})",
                                    "backend_read_timeout(5)")
        proxy = start_proxy({"f": backend("f", slow.port), "m": backend("m", memcached.port)},
                            tunables)
        value = bytes(range(256)) * 4096  # 1 MiB
        keys = [b"f/big%d" % i for i in range(6)]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.settimeout(10)
            s.connect(("127.0.0.1", proxy.port))
            request = b"".join(b"set %s 7 0 %d\r\n%s\r\n" % (key, len(value), value)
                               for key in keys)
            request += b"".join(b"get %s\r\n" % key for key in keys)
            sender = threading.Thread(target=s.sendall, args=(request,))
            sender.start()
            expected = b"STORED\r\n" * 6 + b"".join(value_reply(k, value, 7) for k in keys)
            got = bytearray()
            while len(got) < len(expected):
                chunk = s.recv(16384)
                if not chunk:
                    break
                got += chunk
                time.sleep(0.0005)
            sender.join()
            assert got == expected
        assert slow.lines() == [b"set %s 7 0 %d\r\n" % (k, len(value)) for k in keys] + [
            b"get %s\r\n" % k for k in keys]
        assert all(payload == value + b"\r\n" for _, payload in slow.requests[1:7])
        # And through a real memcached (whose items stop just short of 1 MiB).
        value = value[:1000000]
        with proxy.connect() as s:
            s.sendall(b"set m/big 0 0 %d\r\n%s\r\nget m/big\r\n" % (len(value), value))
            expected = b"STORED\r\n" + value_reply(b"m/big", value)
            assert read_exactly(s, len(expected)) == expected
        assert memcached.get(b"m/big") == value
        assert resets(proxy, "f") == resets(proxy, "m") == []
    finally:
        slow.stop()


# -- backpressure --------------------------------------------------------------


def test_flood_against_a_stopped_backend_hits_the_depth_limit(start_proxy, memcached):
    proxy = start_proxy({"m": backend("m", memcached.port, depthlimit=100)})
    connected(proxy, "m")
    before = proc_status(proxy.proc.pid)
    count = 20000
    pause(memcached)
    try:
        with proxy.connect() as s:
            sender = threading.Thread(target=s.sendall, args=(b"get m/k\r\n" * count,))
            start = time.monotonic()
            sender.start()
            reply = read_exactly(s, len(FAILURE) * count)
            elapsed = time.monotonic() - start
            sender.join()
            assert reply == FAILURE * count
    finally:
        memcached.resume()
    after = proc_status(proxy.proc.pid)
    assert elapsed < 10
    assert after["VmHWM"] - before["VmRSS"] < 50 * 1024
    assert resets(proxy, "m")[0] == ("timeout", 100)   # the depth limit held
    wait_for(lambda: proxy.call(b"get m/k\r\n") == b"END\r\n")
    assert stats(proxy)["proxy_req_active"] == "0"
    print(f"flood: {count} requests, all failed in {elapsed:.2f} s; RSS "
          f"{before['VmRSS'] // 1024} MB before, peak {after['VmHWM'] // 1024} MB")


def test_a_client_that_never_reads_is_not_read_from(start_proxy, memcached):
    # A read timeout long enough that a busy machine cannot fail requests.
    proxy = start_proxy({"m": backend("m", memcached.port, readtimeout=5)})
    value = b"v" * 1024
    assert proxy.call(b"set m/v 0 0 1024\r\n%s\r\n" % value) == b"STORED\r\n"
    before = proc_status(proxy.proc.pid)
    count = 30000
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(b"get m/v\r\n" * count)   # the kernel buffers what the proxy won't read
        port = s.getsockname()[1]

        def unread() -> int:
            rows = [r for r in tcp_sockets(proxy.proc.pid)
                    if (r["local"], r["remote"]) == (proxy.port, port)]
            return rows[0]["rx"] if rows else 0

        # Once what it did read is answered, the proxy holds those replies
        # and reads nothing more: the rest waits in the kernel.
        wait_for(lambda: unread() > 0 and state(proxy, "m")[2] == "0"
                 and stats(proxy)["proxy_req_active"] == "0")

        def settled() -> bool:
            # the kernel has moved what the client's side still held (a
            # busy machine may take a while): the queue holds still
            before = unread()
            time.sleep(0.1)
            return unread() == before

        wait_for(settled)
        waiting = unread()
        held = proc_status(proxy.proc.pid)
        time.sleep(0.5)
        assert unread() == waiting > 0
        assert proc_status(proxy.proc.pid)["VmRSS"] - held["VmRSS"] < 2048
        # Other clients are served meanwhile.
        assert proxy.call(b"get m/v\r\n", b"END\r\n") == value_reply(b"m/v", value)
        expected = value_reply(b"m/v", value) * count
        s.settimeout(5)
        assert read_exactly(s, len(expected)) == expected
    after = proc_status(proxy.proc.pid)
    assert after["VmHWM"] - before["VmRSS"] < 64 * 1024
    print(f"non-reading client: {waiting} request bytes left unread in the kernel; RSS "
          f"{before['VmRSS'] // 1024} MB before, {held['VmRSS'] // 1024} MB while stuck, "
          f"peak {after['VmHWM'] // 1024} MB")


def test_a_burst_slower_to_relay_than_the_read_timeout_is_not_a_failure(
        start_proxy, memcached):
    # 4096 pipelined gets of 32 KiB take the proxy itself about twice the
    # read timeout to relay; memcached answered them all in time.
    proxy = start_proxy({"m": backend("m", memcached.port, readtimeout=1)})
    value = bytes(range(256)) * 128
    assert proxy.call(b"set m/v 0 0 %d\r\n%s\r\n" % (len(value), value)) == b"STORED\r\n"
    count = 4096
    with proxy.connect() as s:
        start = time.monotonic()
        s.sendall(b"get m/v\r\n" * count)
        expected = value_reply(b"m/v", value) * count
        assert read_exactly(s, len(expected)) == expected
        elapsed = time.monotonic() - start
    assert resets(proxy, "m") == []
    assert stats(proxy)["proxy_backend_failed"] == "0"
    print(f"burst: {count} x 32 KiB relayed in {elapsed:.2f} s (read timeout 1 s)")


# -- keepalive -------------------------------------------------------------------


def test_tcp_keepalive_global_and_per_backend(start_proxy, fake):
    other = FakeBackend().start()
    try:
        proxy = start_proxy({"f": backend("f", fake.port),
                             "o": backend("o", other.port, tcpkeepalive=False)},
                            TUNABLES + "    mcp.tcp_keepalive(true)\n")
        connected(proxy, "f", "o")
        timers = {r["remote"]: r["timer"] for r in tcp_sockets(proxy.proc.pid)
                  if r["state"] == "01"}     # established
        assert timers[fake.port] == "02"     # the keepalive timer is armed
        assert timers[other.port] == "00"
    finally:
        other.stop()
