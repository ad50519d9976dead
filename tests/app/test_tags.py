"""Listener tags on the command line and in the service: ``--listen``'s
``tag_x_:`` / ``tag[x]:`` prefix, and the factory of a tagged listener,
whose connections route through the engine's view for the tag."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python import usage

from mcproxy.app.listen import Listener, parse_listen
from mcproxy.app.service import LOG_TAG_UNHEARD, LOG_TAG_UNROUTED, ProxyService
from mcproxy.app.tap import Options, makeService
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire.request import CMD_GET

ADDR = IPv4Address("TCP", "127.0.0.1", 50000)
CONFIG = """
function mcp_config_pools() return mcp.pool({ mcp.backend("a", "127.0.0.1", 1) }) end
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, function(r) return "SERVER_ERROR x\\r\\n" end, "x")
    mcp.attach(mcp.CMD_GET, function(r) return "SERVER_ERROR zzz\\r\\n" end, "zzz")
end
"""


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.mark.parametrize(("text", "listener"), [
    ("tcp:11211", Listener(None, "tcp:11211")),
    ("tag_x_:tcp:11212", Listener("x", "tcp:11212")),
    ("tag[api]:tcp:11212:interface=127.0.0.1", Listener("api", "tcp:11212:interface=127.0.0.1")),
    ("tag[a_b]:unix:/run/m.sock", Listener("a_b", "unix:/run/m.sock")),
    ("tag_abcdefgh_:tcp:1", Listener("abcdefgh", "tcp:1")),
    ("tag_a-b.c_:tcp:1", Listener("a-b.c", "tcp:1")),
])
def test_parse_listen(text, listener):
    assert parse_listen(text) == listener


@pytest.mark.parametrize(("text", "message"), [
    ("tag__:tcp:1", "listener tag '' must be 1 to 8 characters"),
    ("tag[]:tcp:1", "listener tag '' must be 1 to 8 characters"),
    ("tag_abcdefghi_:tcp:1", "listener tag 'abcdefghi' must be 1 to 8 characters"),
    ("tag_x:tcp:1", "bad listener tag in 'tag_x:tcp:1'"),
    ("tag[x:tcp:1", "bad listener tag in 'tag\\[x:tcp:1'"),
    ("tag_a_b_:tcp:1", "bad listener tag"),
    ("tag[a:b]:tcp:1", "listener tag 'a:b' may hold only printable characters"),
])
def test_parse_listen_refuses_a_malformed_tag(text, message):
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_listen_takes_tags_as_given():
    options = parse("--listen=tag_x_:tcp:1234", "-l", "tag[y]:unix:/tmp/m.sock", "-l", "tcp:1")
    assert options["listen"] == ["tag_x_:tcp:1234", "tag[y]:unix:/tmp/m.sock", "tcp:1"]


@pytest.mark.parametrize(("args", "message"), [
    (["--listen=tag_toolongtag_:tcp:1"], "bad --listen 'tag_toolongtag_:tcp:1': listener tag"),
    (["--listen=tag_x:tcp:1"], "bad --listen 'tag_x:tcp:1': bad listener tag"),
    (["--listen=tag_x_:bogus:1"], "bad --listen endpoint 'bogus:1'"),
    (["--listen=tag_x_:"], "bad --listen endpoint ''"),
    (["--workers=2", "--listen=tag_x_:unix:/tmp/m.sock"],
     "--workers needs TCP --listen endpoints .* not 'tag_x_:unix:/tmp/m.sock'"),
])
def test_usage_errors_name_the_listen(args, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_workers_take_tagged_tcp_listeners():
    options = parse("--workers=2", "--listen=tag_x_:tcp:0:interface=127.0.0.1")
    assert options["listen"] == ["tag_x_:tcp:0:interface=127.0.0.1"]


@pytest.fixture
def service(tmp_path):
    config = tmp_path / "route.lua"
    config.write_text(CONFIG)
    process = makeService(parse(f"--config={config}", "--max-connections=2",
                                "--listen=tag_x_:tcp:0:interface=127.0.0.1",
                                "--listen=tcp:0:interface=127.0.0.1",
                                "--listen=tag[x]:tcp:0:interface=127.0.0.1",
                                "--listen=tag_y_:tcp:0:interface=127.0.0.1"))
    return process.proxy


def test_a_tagged_listener_routes_through_the_view_of_its_tag(service):
    listeners = [child.factory for child in service]
    engine = service.engine
    assert listeners[1] is service.factory
    assert listeners[0] is listeners[2] is service.factory_for("x")
    assert listeners[0].router is engine.view("x")
    assert listeners[3].router is engine.view("y")
    proto = listeners[0].buildProtocol(ADDR)
    assert isinstance(proto, ProxyServerProtocol)
    assert proto.router is engine.view("x") and proto.factory is service.factory
    assert service.factory.buildProtocol(ADDR).router is engine


def test_tagged_listeners_share_the_connection_limit(service):
    """--max-connections counts every listener's clients together."""
    x, y = service.factory_for("x"), service.factory_for("y")
    for factory in (x, y):
        factory.buildProtocol(ADDR).makeConnection(_transport())
    refused = service.factory.buildProtocol(ADDR)
    assert not isinstance(refused, ProxyServerProtocol)
    assert service.factory.rejected == 1


def test_tags_only_the_routes_or_only_the_listeners_have_are_logged(service):
    with capturedLogs() as events:
        service._check_tags()
    warnings = [(e["log_format"], e["tag"]) for e in events if e["log_level"] == LogLevel.warn]
    assert warnings == [(LOG_TAG_UNHEARD, "zzz"), (LOG_TAG_UNROUTED, "y")]


def test_a_tagged_listener_without_a_config_is_served_locally():
    service = ProxyService(None, ["tag_x_:tcp:0:interface=127.0.0.1"])
    assert not service.factory_for("x").router.hooked(CMD_GET)
    service._check_tags()  # nothing loaded: nothing to compare


def _transport() -> StringTransport:
    return StringTransport(peerAddress=ADDR)


def test_a_tagged_connection_is_answered_by_its_tags_routes(service):
    answers = {}
    for tag in ("x", None):
        proto = service.factory_for(tag).buildProtocol(ADDR)
        transport = _transport()
        proto.makeConnection(transport)
        proto.dataReceived(b"get k\r\n")
        answers[tag] = transport.value()
    assert answers["x"] == b"SERVER_ERROR x\r\n"
    assert answers[None] == b"END\r\n"  # no untagged get: the embedded cache


def test_the_idle_sweep_runs_once_for_every_listener(tmp_path):
    clock = MemoryReactorClock()
    service = ProxyService(None, ["tag_x_:tcp:0", "tcp:0"], reactor=clock, idle_timeout=10)
    tagged, untagged = service.factory_for("x"), service.factory
    tagged.doStart()
    untagged.doStart()
    assert untagged.numPorts == 2 and len(clock.getDelayedCalls()) == 1
    tagged.doStop()
    assert len(clock.getDelayedCalls()) == 1
    untagged.doStop()
    assert clock.getDelayedCalls() == []
