"""Reloading the route config: SIGHUP, failed loads, draining backends, check mode.

The first half drives a ProxyService in this process over a fake reactor
(backend connections are completed by hand, time is moved by hand, SIGHUP
is a real signal). The second half sends SIGHUP to ``twistd -n mcproxy``
with real memcached servers behind it, one test of them under client load.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent

from mcproxy.app.check import check_config
from mcproxy.app.service import ProxyService
from mcproxy.backends.connection import VALIDATE_REQUEST
from mcproxy.wire.request import parse_request
from tests.servers import Memcached, Proxy, read_until

# -- in process ------------------------------------------------------------------

# Keys under "a/" go to backend a, the rest to b; keys under "bg/" are sent
# to a in the background and answered at once. Ports are never dialled.
TWO = """
function mcp_config_pools()
    mcp.add_stat(1, "hits")
    return { a = mcp.pool({ mcp.backend("a", "127.0.0.1", "1001") }),
             b = mcp.pool({ mcp.backend("b", "127.0.0.1", "1002") }) }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        mcp.stat(1, 1)
        local key = r:key()
        if string.find(key, "^a/") then
            return p.a(r)
        elseif string.find(key, "^bg/") then
            mcp.await(r, { p.a }, 0, mcp.AWAIT_BACKGROUND)
            return "HD\\r\\n"
        end
        return p.b(r)
    end)
end
"""

# Backend a is gone; b (same label, host, port) stays.
ONE = """
function mcp_config_pools()
    mcp.add_stat(1, "hits")
    mcp.add_stat(2, "more")
    return { b = mcp.pool({ mcp.backend("b", "127.0.0.1", "1002") }) }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        mcp.stat(1, 1)
        return p.b(r)
    end)
end
"""

# Broken configs: (id, text or None for "file deleted", what the error says).
# Those that get far enough create a backend and change a tunable first,
# which a failed reload must undo.
_SIDE_EFFECTS = """
    mcp.active_req_limit(7)
    local ghost = mcp.backend("ghost", "127.0.0.1", "1009")
"""
BROKEN = [
    ("deleted", None, "cannot open"),
    ("syntax", "function mcp_config_pools()\n    return {\nend\n",
     "route.lua:3: unexpected symbol near 'end'"),
    ("chunk", "local settings = nil\nlocal port = settings.port\n",
     "route.lua:2: attempt to index a nil value"),
    ("pools", "function mcp_config_pools()" + _SIDE_EFFECTS
     + "    error('no pools today')\nend\nfunction mcp_config_routes() end\n",
     "route.lua:4: no pools today"),
    ("routes", "function mcp_config_pools()" + _SIDE_EFFECTS
     + "    return { g = mcp.pool({ ghost }) }\nend\n"
       "function mcp_config_routes(p)\n    mcp.attach(mcp.CMD_GET, 42)\nend\n",
     "route.lua:7: Must pass a function to mcp.attach"),
    ("copy", "function mcp_config_pools()" + _SIDE_EFFECTS
     + "    return { f = print }\nend\nfunction mcp_config_routes() end\n",
     "unhandled data type in configuration table"),
]


class Reactor(MemoryReactorClock):
    """A fake reactor that also queues ``callFromThread`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list = []

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.from_thread.append((f, args, kwargs))

    def run_from_thread(self) -> None:
        while self.from_thread:
            f, args, kwargs = self.from_thread.pop(0)
            f(*args, **kwargs)


class TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


class Harness:
    """A started ProxyService on a fake reactor, its config file and log."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.path = tmp_path / "route.lua"
        self.write(text)
        self.reactor = Reactor()
        self.service = ProxyService(str(self.path), [], reactor=self.reactor)
        self.events: list[dict] = []
        self.service.log = Logger(observer=self.events.append)
        self.service.registry.log = Logger(observer=self.events.append)
        self.service.startService()

    def write(self, text: str | None) -> None:
        if text is None:
            self.path.unlink()
        else:
            self.path.write_text(textwrap.dedent(text))

    def reload(self, text: str | None) -> bool:
        self.write(text)
        return self.service.reload()

    def backend(self, label: str):
        [backend] = [b for b in self.service.registry.live if b.label == label]
        return backend

    def route(self, line: bytes) -> list[bytes]:
        out: list[bytes] = []
        self.service.engine.route(parse_request(line), out.append)
        return out

    def accept(self, backend) -> tuple:
        """Complete the backend's connect attempt and validate it."""
        [factory] = [f for _h, _p, f, _t, _b in self.reactor.tcpClients
                     if f.backend is backend]
        proto = factory.buildProtocol(None)
        transport = TCPTransport()
        proto.makeConnection(transport)
        assert transport.value() == VALIDATE_REQUEST
        transport.clear()
        proto.dataReceived(b"VERSION 1.6.18\r\n")
        assert backend.state == "connected"
        return proto, transport

    def dialled(self, port: int) -> bool:
        return any(p == port for _h, p, *_ in self.reactor.tcpClients)

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path, TWO)
    yield h
    h.service.stopService()


@pytest.mark.parametrize("name, text, error", BROKEN, ids=[b[0] for b in BROKEN])
def test_failed_reload_changes_nothing(harness, name, text, error):
    service = harness.service
    routes = service.engine.routes
    backends = service.registry.live
    assert harness.reload(text) is False
    assert service.engine.routes is routes
    assert harness.route(b"get k\r\n") == []  # still routed, to b
    assert (service.stats.config_reloads, service.stats.config_reload_fails) == (1, 1)
    assert service.tunables.active_req_limit == 0
    assert service.registry.live == backends
    assert service.stats.backend_total == 2
    assert not harness.dialled(1009)
    [event] = harness.events[-1:]
    assert event["status"] == "failed"
    message = formatEvent(event)
    assert str(harness.path) in message and error in message
    assert "old routes kept" in message


def test_successful_reload_logs_its_start_and_its_end(harness):
    assert harness.reload(ONE) is True
    assert (harness.service.stats.config_reloads,
            harness.service.stats.config_reload_fails) == (1, 0)
    reload_events = [e for e in harness.events if e.get("type") == "proxy_conf"]
    assert [e["status"] for e in reload_events] == ["done", "start", "done"]  # startup, reload
    assert "reloaded route config " + str(harness.path) in formatEvent(reload_events[-1])


def test_removed_backend_closes_after_its_last_request(harness):
    service = harness.service
    a = harness.backend("a")
    out = harness.route(b"get a/k\r\n")
    old = weakref.ref(service.engine.routes)
    old_host = weakref.ref(service.engine.routes.host)  # held by its Lua states
    assert harness.reload(ONE)
    # The old routes live on while their request does; a stays open.
    gc.collect()
    assert old() is not None and old_host() is not None
    harness.reactor.advance(1)
    assert a.state != "closed" and a.depth == 1
    assert service.stats.backend_total == 2
    # New requests take the new routes.
    assert harness.route(b"get a/other\r\n") == []
    assert harness.backend("b").depth == 1
    proto, transport = harness.accept(a)
    assert transport.value() == b"get a/k\r\n"
    proto.dataReceived(b"END\r\n")
    assert out == [b"END\r\n"]
    gc.collect()
    assert old() is None and old_host() is None
    harness.reactor.advance(service.registry.DRAIN_INTERVAL)
    assert a.state == "closed" and transport.disconnecting
    assert service.registry.live == [harness.backend("b")]
    assert service.stats.backend_total == 1
    assert any("backend a (127.0.0.1:1001) closed" in m for m in harness.messages())


def test_removed_backend_waits_for_background_requests(harness):
    service = harness.service
    a = harness.backend("a")
    assert harness.route(b"get bg/k\r\n") == [b"HD\r\n"]
    old = weakref.ref(service.engine.routes)
    assert harness.reload(ONE)
    assert old() is None  # nobody waits for the background answer
    harness.reactor.advance(1)
    assert a.state != "closed" and a.depth == 1
    proto, transport = harness.accept(a)
    proto.dataReceived(b"END\r\n")
    harness.reactor.advance(service.registry.DRAIN_INTERVAL)
    assert a.state == "closed" and transport.disconnecting
    assert service.stats.backend_total == 1


def test_unused_backend_closes_at_once(harness):
    a = harness.backend("a")
    assert harness.reload(ONE)
    assert a.state == "closed"
    assert harness.service.stats.backend_total == 1


def test_backend_removed_and_added_back_before_closing_is_reused(harness):
    a = harness.backend("a")
    out = harness.route(b"get a/k\r\n")
    assert harness.reload(ONE)
    assert harness.reload(TWO)
    assert harness.service.engine.routes.backends[0] is a
    assert harness.service.stats.backend_total == 2
    proto, _transport = harness.accept(a)
    proto.dataReceived(b"END\r\n")
    assert out == [b"END\r\n"]
    harness.reactor.advance(1)
    assert a.state == "connected"
    assert sum(f.backend is a for _h, _p, f, _t, _b in harness.reactor.tcpClients) == 1


def test_unchanged_backend_keeps_connection_and_queue(harness):
    b = harness.backend("b")
    proto, transport = harness.accept(b)
    out = harness.route(b"get k\r\n")
    assert transport.value() == b"get k\r\n"
    assert harness.reload(ONE)
    assert harness.backend("b") is b
    assert b.depth == 1 and not transport.disconnecting
    proto.dataReceived(b"VALUE k 0 1\r\nv\r\nEND\r\n")
    assert out == [b"VALUE k 0 1\r\nv\r\nEND\r\n"]
    assert harness.route(b"get k2\r\n") == []
    assert transport.value() == b"get k\r\nget k2\r\n"


def test_user_stats_keep_their_values(harness):
    b = harness.backend("b")
    proto, _transport = harness.accept(b)
    for _ in range(3):
        harness.route(b"get k\r\n")
    proto.dataReceived(b"END\r\n" * 3)
    assert not harness.reload("function mcp_config_pools() mcp.add_stat(1, 'x') error() end")
    assert harness.reload(ONE)
    harness.route(b"get k\r\n")
    proto.dataReceived(b"END\r\n")
    reply = harness.service.stats_reply([b"proxy"])
    assert reply.startswith(b"STAT user_hits 4\r\nSTAT user_more 0\r\n")


def test_hup_only_queues_a_reload_and_coalesces(harness):
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGHUP)
    assert harness.service.stats.config_reloads == 0
    assert len(harness.reactor.from_thread) == 1
    harness.reactor.run_from_thread()
    assert harness.service.stats.config_reloads == 1


def test_hup_during_a_reload_causes_exactly_one_more(harness, monkeypatch):
    engine = harness.service.engine
    load = engine.load
    calls = []

    def load_while_hupped(path, arg=None):
        calls.append(path)
        if len(calls) == 1:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGHUP)
        return load(path, arg)

    monkeypatch.setattr(engine, "load", load_while_hupped)
    os.kill(os.getpid(), signal.SIGHUP)
    harness.reactor.run_from_thread()
    assert len(calls) == 2
    assert harness.service.stats.config_reloads == 2


def test_stop_restores_the_previous_handler(tmp_path):
    def previous(signum, frame):
        pass

    original = signal.signal(signal.SIGHUP, previous)
    try:
        h = Harness(tmp_path, TWO)
        assert signal.getsignal(signal.SIGHUP) == h.service._hup
        h.service.stopService()
        assert signal.getsignal(signal.SIGHUP) is previous
        os.kill(os.getpid(), signal.SIGHUP)  # after stop: no reload queued
        assert h.reactor.from_thread == []
    finally:
        signal.signal(signal.SIGHUP, original)


# -- check mode ------------------------------------------------------------------


def test_check_config(tmp_path):
    path = tmp_path / "route.lua"
    path.write_text(TWO)
    assert check_config(str(path)) is None
    for _name, text, error in BROKEN[1:]:
        path.write_text(text)
        assert error in check_config(str(path))
    assert "cannot open" in check_config(str(tmp_path / "missing.lua"))


def test_check_command_connects_nowhere(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    good = tmp_path / "route.lua"
    good.write_text(TWO.replace('"1001"', f'"{port}"'))
    bad = tmp_path / "bad.lua"
    bad.write_text(BROKEN[3][1])
    with listener:
        ok, failed = (subprocess.run([sys.executable, "-m", "mcproxy", "check", name],
                                     cwd=tmp_path, capture_output=True, text=True)
                      for name in (good.name, bad.name))
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "OK\n", "")
    assert (failed.returncode, failed.stdout, failed.stderr) == (
        1, "", "failed to execute mcp_config_pools: bad.lua:4: no pools today\n")


def test_check_command_checks_a_route_library_file(tmp_path):
    """``mcproxy check routelib --config-arg=FILE``, as twistd takes it."""
    pools = 'pools{ main = { backends = { "127.0.0.1:11211" } } }\n'
    (tmp_path / "good.lua").write_text(pools + 'routes{ default = route_direct{ child = "main" } }')
    (tmp_path / "bad.lua").write_text(pools + 'routes{ default = route_direct{ child = "x" } }')
    ok, failed, missing = (
        subprocess.run([sys.executable, "-m", "mcproxy", "check", "routelib", *arg],
                       cwd=tmp_path, capture_output=True, text=True)
        for arg in (["--config-arg=good.lua"], ["--config-arg=bad.lua"], []))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "OK\n", "")
    assert failed.returncode == 1 and "no pool matching: x" in failed.stderr
    assert (missing.returncode, missing.stderr) == (
        1, "mcproxy check routelib needs --config-arg=FILE\n")


# -- end to end: twistd -n mcproxy and real memcached servers ----------------------


def proxy_stats(proxy: Proxy, args: bytes = b"") -> dict[str, str]:
    reply = proxy.call(b"stats" + args + b"\r\n", b"END\r\n")
    fields = (line.split(b" ", 2) for line in reply.split(b"\r\n") if line.startswith(b"STAT "))
    return {name.decode(): value.decode() for _, name, value in fields}


def hup(proxy: Proxy, text: str | None) -> dict[str, str]:
    """Replace (or delete) the config, SIGHUP, wait for the reload; stats."""
    path = Path(proxy.config)
    reloads = int(proxy_stats(proxy)["proxy_config_reloads"])
    if text is None:
        path.unlink()
    else:
        fresh = path.with_suffix(".new")
        fresh.write_text(text)
        os.replace(fresh, path)
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = proxy_stats(proxy)
        if int(stats["proxy_config_reloads"]) > reloads:
            assert int(stats["proxy_config_reloads"]) == reloads + 1
            return stats
        time.sleep(0.005)
    raise AssertionError(f"no reload: {proxy.log()}")


def wait_for_stat(proxy: Proxy, name: str, value: str) -> None:
    deadline = time.monotonic() + 10
    while proxy_stats(proxy)[name] != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.02)


MARKED = """
function mcp_config_pools()
    return { main = mcp.pool({ mcp.backend("m1", "127.0.0.1", "%(m1)d") }) }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        if r:key() == "which" then
            return "SERVER_ERROR routes %(mark)s\\r\\n"
        end
        return p.main(r)
    end)
end
"""


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A proxy whose routes answer ``get which`` with their name."""
    m1 = Memcached().start()
    proxy = Proxy(None, config_text=MARKED % {"m1": m1.port, "mark": "one"}).start()
    yield proxy, m1
    proxy.stop()
    m1.stop()


@pytest.mark.parametrize("name, text, error", BROKEN, ids=[b[0] for b in BROKEN])
def test_twistd_survives_a_broken_reload(marked, name, text, error):
    proxy, m1 = marked
    pid = proxy_stats(proxy)["pid"]
    fails = int(proxy_stats(proxy)["proxy_config_reload_fails"])
    stats = hup(proxy, text)
    assert int(stats["proxy_config_reload_fails"]) == fails + 1
    assert stats["pid"] == pid and proxy.proc.poll() is None
    with proxy.connect() as s:
        s.sendall(b"get which\r\nset k 0 0 2\r\nhi\r\nget k\r\n")
        assert read_until(s, b"END\r\n") == (
            b"SERVER_ERROR routes one\r\nSTORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\n")
    log = proxy.log()
    [line] = [x for x in log.splitlines() if "old routes kept" in x][-1:]
    assert str(proxy.config) in line and error in line
    # Back to a good config, which is taken.
    stats = hup(proxy, MARKED % {"m1": m1.port, "mark": "one"})
    assert int(stats["proxy_config_reload_fails"]) == fails + 1
    assert "Traceback" not in proxy.log()


SLOW_AND_MAIN = """
function mcp_config_pools()
    return { main = mcp.pool({ mcp.backend("main", "127.0.0.1", "%(main)d") }),
             slow = mcp.pool({ mcp.backend("slow", "127.0.0.1", "%(slow)d") }) }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        if string.find(r:key(), "^slow/") then
            return p.slow(r)
        end
        return p.main(r)
    end)
end
"""

MAIN_ONLY = """
function mcp_config_pools()
    return { main = mcp.pool({ mcp.backend("main", "127.0.0.1", "%(main)d") }) }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p.main(r) end)
end
"""


def test_reload_removing_a_backend_with_requests_in_flight(memcached_factory):
    main, slow = memcached_factory(), memcached_factory()
    ports = {"main": main.port, "slow": slow.port}
    proxy = Proxy(None, config_text=SLOW_AND_MAIN % ports).start()
    try:
        with proxy.connect() as s:
            s.sendall(b"set slow/k 0 0 4\r\nslow\r\n")
            assert read_until(s, b"\r\n") == b"STORED\r\n"
        assert proxy_stats(proxy)["proxy_backend_total"] == "2"
        connections = int(slow.call(b"stats\r\n", b"END\r\n").split(
            b"STAT curr_connections ")[1].split()[0])
        slow.pause()
        try:
            in_flight = proxy.connect()
            in_flight.sendall(b"get slow/k\r\nget slow/k slow/k\r\n")
            time.sleep(0.1)
            stats = hup(proxy, MAIN_ONLY % ports)
            assert stats["proxy_backend_total"] == "2"  # slow is draining
            with proxy.connect() as s:  # new requests take the new routes
                s.sendall(b"get slow/k\r\n")
                assert read_until(s, b"END\r\n") == b"END\r\n"
        finally:
            slow.resume()
        with in_flight:
            expected = b"VALUE slow/k 0 4\r\nslow\r\nEND\r\n" + (
                b"VALUE slow/k 0 4\r\nslow\r\n" * 2 + b"END\r\n")
            assert read_until(in_flight, expected) == expected
        wait_for_stat(proxy, "proxy_backend_total", "1")
        deadline = time.monotonic() + 5
        while b"STAT curr_connections %d\r\n" % (connections - 1) not in slow.call(
                b"stats\r\n", b"END\r\n"):
            assert time.monotonic() < deadline, "slow's connection was not closed"
            time.sleep(0.02)
        assert f"backend slow (127.0.0.1:{slow.port}) closed" in proxy.log()
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()


# Two valid configs over the same two servers (so every key stays where it
# is), written differently; B adds a third backend. Both count routed
# requests in user stat 1. The broken one fails in its last phase, after
# making a backend that must never connect.
LOAD_A = """
function mcp_config_pools()
    mcp.add_stat(1, "routed")
    return { main = mcp.pool({ mcp.backend("m1", "127.0.0.1", "%(m1)d"),
                               mcp.backend("m2", "127.0.0.1", "%(m2)d") }) }
end

function mcp_config_routes(p)
    local main = p.main
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        mcp.stat(1, 1)
        return main(r)
    end)
end
"""

LOAD_B = """
local function backend(label, port)
    return mcp.backend{ label = label, host = "127.0.0.1", port = port }
end

function mcp_config_pools()
    mcp.add_stat(1, "routed")
    return {
        main = mcp.pool({ backend("m1", "%(m1)d"), backend("m2", "%(m2)d") }),
        spare = mcp.pool({ backend("m3", "%(m3)d") }),
    }
end

function mcp_config_routes(pools)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        mcp.stat(1, 1)
        if string.find(r:key(), "^spare/") then
            return pools.spare(r)
        end
        local res = pools.main(r)
        return res
    end)
end
"""

LOAD_BROKEN = """
function mcp_config_pools()
    mcp.add_stat(1, "broken")
    local ghost = mcp.backend("ghost", "127.0.0.1", "%(ghost)d")
    return { ghost = mcp.pool({ ghost }) }
end

function mcp_config_routes(p)
    error("this config is broken")
end
"""

CLIENTS = 4
BATCH = 10


class LoadClient(threading.Thread):
    """One connection sending pipelined batches of set, get and mg on its own
    keys until stopped, checking every reply byte for byte."""

    def __init__(self, proxy: Proxy, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.index = index
        self.stop = stop
        self.batches = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.proxy.connect() as s:
                while not self.stop.is_set():
                    self.batch(s)
        except Exception as e:
            self.error = repr(e)

    def batch(self, s: socket.socket) -> None:
        request, expected = [], []
        for j in range(BATCH):
            key = b"load/%d/%d" % (self.index, j)
            value = b"%d.%d.%d" % (self.index, self.batches, j)
            request.append(b"set %s 0 0 %d\r\n%s\r\nget %s\r\nmg %s v\r\n"
                           % (key, len(value), value, key, key))
            expected.append(b"STORED\r\nVALUE %s 0 %d\r\n%s\r\nEND\r\nVA %d\r\n%s\r\n"
                            % (key, len(value), value, len(value), value))
        want = b"".join(expected)
        s.sendall(b"".join(request))
        got = b""
        while len(got) < len(want):
            chunk = s.recv(len(want) - len(got))
            if not chunk:
                break
            got += chunk
        if got != want:
            raise AssertionError(f"batch {self.batches}: {got[:200]!r}")
        self.batches += 1


def test_twenty_reloads_under_load(memcached_factory):
    servers = {name: memcached_factory() for name in ("m1", "m2", "m3")}
    ports = {name: m.port for name, m in servers.items()}
    ghost = socket.create_server(("127.0.0.1", 0))
    ghost.setblocking(False)
    ports["ghost"] = ghost.getsockname()[1]
    configs = [LOAD_B % ports, LOAD_BROKEN % ports, LOAD_A % ports]
    proxy = Proxy(None, config_text=LOAD_A % ports).start()
    stop = threading.Event()
    clients = [LoadClient(proxy, i, stop) for i in range(CLIENTS)]
    try:
        pid = proxy_stats(proxy)["pid"]
        for client in clients:
            client.start()
        time.sleep(0.1)
        for n in range(20):
            hup(proxy, configs[n % 3])
            time.sleep(0.05)
            assert all(c.error is None and c.is_alive() for c in clients), \
                [c.error for c in clients]
        stop.set()
        for client in clients:
            client.join(10)
        assert [c.error for c in clients] == [None] * CLIENTS
        batches = sum(c.batches for c in clients)
        assert batches > 20
        stats = proxy_stats(proxy)
        assert stats["pid"] == pid and proxy.proc.poll() is None
        assert stats["proxy_config_reloads"] == "20"
        assert stats["proxy_config_reload_fails"] == "7"
        assert stats["proxy_req_active"] == "0"
        wait_for_stat(proxy, "proxy_backend_total", "3")  # B is active: m1 m2 m3
        commands = proxy_stats(proxy, b" proxy")
        assert commands["user_routed"] == str(3 * BATCH * batches)
        assert "user_broken" not in commands
        for name in ("cmd_set", "cmd_get", "cmd_mg"):
            assert commands[name] == str(BATCH * batches), name
        with pytest.raises(BlockingIOError):
            ghost.accept()
        log = proxy.log()
        assert log.count("reloaded route config") == 13
        assert log.count("old routes kept") == 7
        assert "route.lua:9: this config is broken" in log
        assert "Traceback" not in log
    finally:
        stop.set()
        proxy.stop()
        ghost.close()


def test_reload_gives_a_kept_backend_the_new_options(tmp_path):
    """Timeouts changed by a reload apply to a backend that keeps its
    connection; a failed reload changes nothing."""
    from mcproxy.backends.pool import BackendRegistry
    from mcproxy.counters import ProxyStats
    from mcproxy.routing.engine import ConfigError, RouteEngine
    from mcproxy.routing.tunables import Tunables
    from mcproxy.routing.userstats import UserStats

    stats = ProxyStats()
    engine = RouteEngine(stats, BackendRegistry(stats, reactor=MemoryReactorClock()),
                         Tunables(), UserStats())
    path = tmp_path / "route.lua"

    def load(read_timeout, broken=False):
        path.write_text(f"""
        function mcp_config_pools()
            return mcp.pool({{ mcp.backend{{ label = "b", host = "127.0.0.1", port = 1,
                                             readtimeout = {read_timeout} }} }})
        end
        function mcp_config_routes(p) {"error('x')" if broken else ""} end
        """)
        return engine.load(str(path))

    first = load(1.5).backends[0]
    assert load(0.25).backends[0] is first
    assert first.options.read_timeout == 0.25
    with pytest.raises(ConfigError):
        load(9, broken=True)
    assert first.options.read_timeout == 0.25
