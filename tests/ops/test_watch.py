"""``watch proxyevents|proxyreqs|proxyuser``: rendering, the protocol hand-over
on a StringTransport, and the streams end to end against ``twistd -n mcproxy``."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher

from mcproxy.backends.backend import LOG_MARKED_BAD, LOG_RESET
from mcproxy.ops import watch
from mcproxy.ops.watch import MAX_WATCHERS, WatchRegistry, render
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire import errors
from mcproxy.wire.behaviour import WIRE_1_6_15
from tests.server.memorycore import MemoryCore
from tests.servers import Memcached, Proxy, read_until

# -- rendering -------------------------------------------------------------------

T = 1700000000.000123


@pytest.mark.parametrize(("event", "line"), [
    ({"type": "proxy_user", "msg": "hello world"},
     "type=proxy_user msg=hello world"),
    ({"type": "proxy_error", "error": "route.lua:3: boom", "line": b"get a\r\n"},
     "type=proxy_error msg=route.lua:3: boom"),
    ({"type": "proxy_conf", "status": "done", "path": "/x.lua"},
     "type=proxy_conf status=done"),
    ({"type": "proxy_backend", "log_format": LOG_RESET, "reason": "disconnected",
      "label": "b1", "host": "127.0.0.1", "port": "11212"},
     "type=proxy_backend error=disconnected name=127.0.0.1 port=11212 label=b1 depth=0 rbuf="),
    ({"type": "proxy_backend", "log_format": LOG_MARKED_BAD, "reason": "timeout",
      "label": "b1", "host": "h", "port": 1, "requests": 3},
     "type=proxy_backend error=markedbad name=h port=1 label=b1 depth=3 rbuf="),
    ({"type": "proxy_backend", "log_format": LOG_RESET, "reason": "parsing",
      "label": "b1", "host": "h", "port": 1, "requests": 1, "rbuf": b"VALUE x\r\ngarb"},
     "type=proxy_backend error=parsing name=h port=1 label=b1 depth=1 rbuf=VALUE x\\r\\ngarb"),
    ({"type": "proxy_conf", "status": "start", "path": "/x.lua"},
     "type=proxy_conf status=start"),
    ({"type": "proxy_req", "command": "mg", "key": b"foo", "status": "ok",
      "elapsed": 120, "code": 1, "detail": "d"},
     "type=proxy_req elapsed=120 code=1 status=ok detail=d req=mg foo"),
    ({"type": "proxy_user", "msg": "two\r\nlines"},
     "type=proxy_user msg=two\\r\\nlines"),
])
def test_render(event, line):
    assert render({**event, "log_time": T}, 7) == \
        f"ts=1700000000.000123 gid=7 {line}\n".encode()


def test_render_cuts_long_lines():
    line = render({"type": "proxy_user", "msg": "x" * 10000, "log_time": T}, 1)
    assert len(line) == watch.MAX_LINE and line.endswith(b"x\n")


def test_failed_reload_reports_its_error_first():
    gids = iter(range(1, 10))
    lines = watch.lines_of({"type": "proxy_conf", "status": "failed", "log_time": T,
                            "error": "route.lua:1: syntax"}, lambda: next(gids))
    assert lines == [b"ts=1700000000.000123 gid=1 type=proxy_error msg=route.lua:1: syntax\n",
                     b"ts=1700000000.000123 gid=2 type=proxy_conf status=failed\n"]


@pytest.mark.parametrize(("args", "flags"), [
    ([b"proxyevents"], watch.PROXYEVENTS),
    ([b"proxyuser", b"proxyreqs"], watch.PROXYUSER | watch.PROXYREQS),
    ([], None),
    ([b"fetchers"], None),
    ([b"proxyuser", b"bogus"], None),
])
def test_parse_streams(args, flags):
    assert watch.parse_streams(args) == flags


# -- the protocol hand-over ----------------------------------------------------------


class Unrouted:
    """Routes nothing: ``watch`` and the rest are answered locally."""

    plain_runs = None
    gathers = 0
    wire = WIRE_1_6_15

    def hooked(self, command):
        return False


def make_core() -> MemoryCore:
    """A core with a real watch registry on a private log publisher, and a
    logger that publishes there."""
    publisher = LogPublisher()
    core = MemoryCore(Unrouted(), watchers=WatchRegistry(reactor=object(),
                                                         publisher=publisher))
    core.publisher = publisher
    core.log = Logger(observer=publisher)
    return core


def connect(service):
    proto = ProxyServerProtocol(service)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def lines(transport) -> list[bytes]:
    data = transport.value()
    transport.clear()
    return re.sub(rb"ts=\d+\.\d{6} gid=\d+ ", b"", data).splitlines(keepends=True)


def test_watch_streams_only_its_types():
    service = make_core()
    proto, transport = connect(service)
    proto.dataReceived(b"version\r\nwatch proxyuser proxyevents\r\nversion\r\n")
    assert transport.value() == b"VERSION test\r\nOK\r\n"
    assert service.stats.curr_connections == 0
    transport.clear()
    service.log.info("{msg}", msg="hi", type="proxy_user")
    service.log.info("not for watchers")
    service.log.info("req", type="proxy_req", command="get", key=b"k")
    service.log.info("conf", type="proxy_conf", status="done")
    assert lines(transport) == [b"type=proxy_user msg=hi\n", b"type=proxy_conf status=done\n"]
    proto.dataReceived(b"get k\r\nversion\r\n")  # ignored from now on
    assert transport.value() == b""


def test_bad_watch_keeps_serving():
    service = make_core()
    proto, transport = connect(service)
    proto.dataReceived(b"watch bogus\r\nwatch\r\nversion\r\n")
    assert transport.value() == b"ERROR\r\nERROR\r\nVERSION test\r\n"
    assert not service.watchers.watchers


def test_gids_count_lines_across_watchers():
    service = make_core()
    (p1, t1), (p2, t2) = connect(service), connect(service)
    p1.dataReceived(b"watch proxyuser\r\n")
    p2.dataReceived(b"watch proxyuser\r\n")
    service.log.info("a", type="proxy_user", msg="a")
    service.log.info("b", type="proxy_user", msg="b")
    for t in (t1, t2):
        assert re.findall(rb"gid=(\d+)", t.value()) == [b"1", b"2"]


def test_slow_watcher_skips_and_says_how_many():
    service = make_core()
    proto, transport = connect(service)
    proto.dataReceived(b"watch proxyuser\r\n")
    transport.clear()
    transport.producer.pauseProducing()  # what Twisted does past its buffer limit
    for i in range(5):
        service.log.info("x", type="proxy_user", msg=str(i))
    assert transport.value() == b""
    transport.producer.resumeProducing()
    service.log.info("x", type="proxy_user", msg="back")
    assert lines(transport) == [b"skipped=5\n", b"type=proxy_user msg=back\n"]


def test_hang_up_removes_the_watcher_and_the_observer():
    service = make_core()
    proto, transport = connect(service)
    proto.dataReceived(b"watch proxyevents\r\n")
    assert service.watchers.observe in service.publisher._observers
    transport.producer.stopProducing()  # what the transport does on connectionLost
    proto.connectionLost()
    assert not service.watchers.watchers
    assert service.watchers.observe not in service.publisher._observers


def test_too_many_watchers():
    service = make_core()
    for _ in range(MAX_WATCHERS):
        connect(service)[0].dataReceived(b"watch proxyuser\r\n")
    proto, transport = connect(service)
    proto.dataReceived(b"watch proxyuser\r\nversion\r\n")
    assert transport.value() == \
        b"WATCHER_TOO_MANY log watcher limit reached\r\nVERSION test\r\n"


# -- end to end ----------------------------------------------------------------------

CONFIG = """
function mcp_config_pools()
    return {
        b = mcp.pool({ mcp.backend("b1", "127.0.0.1", "%(b)d") }),
        c = mcp.pool({ mcp.backend("c1", "127.0.0.1", "%(c)d") }),
    }
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        local key = r:key()
        if string.find(key, "^log/") then
            mcp.log("hello from " .. key)
            return "EN\\r\\n"
        elseif string.find(key, "^big/") then
            mcp.log(string.rep("x", 2000))
            return "EN\\r\\n"
        elseif string.find(key, "^error/") then
            error("deliberate failure")
        elseif string.find(key, "^req/") then
            local res = p.b(r)
            mcp.log_req(r, res, "logged")
            return res
        elseif string.find(key, "^c/") then
            return p.c(r)
        end
        return p.b(r)
    end)
end
"""

LINE = rb"ts=\d+\.\d{6} gid=\d+ "


@pytest.fixture(scope="module")
def cluster():
    b, c = Memcached().start(), Memcached().start()
    proxy = Proxy(None, config_text=CONFIG % {"b": b.port, "c": c.port}).start()
    yield proxy, b, c
    proxy.stop()
    b.stop()
    c.stop()


class Watcher:
    """A watching client connection, read line by line."""

    def __init__(self, proxy, *streams: str, rcvbuf: int | None = None) -> None:
        self.sock = s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(b"watch " + " ".join(streams).encode() + b"\r\n")
        self.buffer = b""
        assert self.readline() == b"OK\r\n"

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return b""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def drain(self) -> bytes:
        """Everything that arrives until the stream is quiet for 0.5 s."""
        self.sock.settimeout(0.5)
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                assert chunk
                self.buffer += chunk
        except TimeoutError:
            pass
        self.sock.settimeout(10)
        data, self.buffer = self.buffer, b""
        return data

    def expect(self, pattern: bytes) -> bytes:
        """Read lines until one is ``LINE + pattern``; return it."""
        seen = b""
        while line := self.readline():
            if re.fullmatch(LINE + pattern + rb"\n", line):
                return line
            seen += line
        pytest.fail(f"no {pattern!r} among {seen!r}")

    def close(self) -> None:
        self.sock.close()


def test_user_and_request_logs(cluster):
    proxy = cluster[0]
    w = Watcher(proxy, "proxyuser", "proxyreqs")
    with proxy.connect() as client:
        client.sendall(b"mg log/a v\r\n")
        assert read_until(client, b"\r\n") == b"EN\r\n"
        w.expect(rb"type=proxy_user msg=hello from log/a")
        client.sendall(b"mg req/b v\r\n")
        assert read_until(client, b"\r\n") == b"EN\r\n"
        w.expect(rb"type=proxy_req elapsed=\d+ code=\d+ status=ok detail=logged req=mg req/b")
    w.close()


def test_route_errors_backend_resets_and_reloads(cluster):
    proxy, _, c = cluster
    w = Watcher(proxy, "proxyevents")
    with proxy.connect() as client:
        client.sendall(b"mg error/a v\r\n")
        assert read_until(client, b"\r\n").startswith(b"SERVER_ERROR")
        w.expect(rb"type=proxy_error msg=.*deliberate failure")

        client.sendall(b"mg c/warm v\r\n")  # c1 is connected
        assert read_until(client, b"\r\n") == b"EN\r\n"
        c.stop()
        w.expect(rb"type=proxy_backend error=disconnected name=127.0.0.1 port=%d label=c1 "
                 rb"depth=0 rbuf=" % c.port)

    good = proxy.config.read_text()
    proxy.config.write_text("this is not lua")
    proxy.proc.send_signal(signal.SIGHUP)
    w.expect(rb"type=proxy_conf status=start")
    w.expect(rb"type=proxy_error msg=.*")
    w.expect(rb"type=proxy_conf status=failed")
    proxy.config.write_text(good)
    proxy.proc.send_signal(signal.SIGHUP)
    w.expect(rb"type=proxy_conf status=start")
    w.expect(rb"type=proxy_conf status=done")
    w.close()


def test_slow_watcher_is_skipped_while_others_are_served(cluster):
    proxy = cluster[0]
    stalled = Watcher(proxy, "proxyuser", rcvbuf=4096)
    requests = 1500
    with proxy.connect() as client:
        for start in range(0, requests, 100):
            batch = b"".join(b"mg big/%d v\r\n" % i for i in range(start, start + 100))
            client.sendall(batch)
            assert read_until(client, b"EN\r\n" * 100) == b"EN\r\n" * 100
        assert proxy.call(b"version\r\n").startswith(b"VERSION")
        # Catch up: everything buffered arrives, then a notice before the next line.
        drained = stalled.drain()
        assert drained.count(b"type=proxy_user") < requests
        client.sendall(b"mg log/after v\r\n")
        assert read_until(client, b"\r\n") == b"EN\r\n"
    notice = stalled.readline()
    skipped = int(re.fullmatch(rb"skipped=(\d+)\n", notice).group(1))
    # Every line is either delivered or counted in a notice (there may be
    # several: the watcher catches up a little whenever the kernel takes more).
    skipped += sum(map(int, re.findall(rb"^skipped=(\d+)$", drained, re.M)))
    assert skipped + drained.count(b"type=proxy_user") == requests
    stalled.expect(rb"type=proxy_user msg=hello from log/after")
    stalled.close()


def test_no_log_lines_per_request_by_default(cluster):
    """At default levels the log does not grow with traffic: only routes that
    call mcp.log/log_req log per request (and route errors once a second)."""
    proxy = cluster[0]
    before = proxy.log().count("\n")
    with proxy.connect() as client:
        for i in range(200):
            client.sendall(b"ms k%d 1\r\nx\r\nmg k%d v\r\nmg miss%d v\r\n" % (i, i, i))
            assert read_until(client, b"EN\r\n").endswith(b"EN\r\n")
        client.sendall(b"".join(b"mg error/%d v\r\n" % i for i in range(100)))
        assert read_until(client, errors.LUA_FAILURE * 100) == errors.LUA_FAILURE * 100
    time.sleep(0.2)
    assert proxy.log().count("\n") - before <= 3
