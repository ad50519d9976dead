"""``twistd mcproxy`` options: defaults, validation, and the service built."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from mcproxy.app import process as process_module
from mcproxy.app.process import GC_THRESHOLD, ProxyProcess
from mcproxy.app.service import ProxyService
from mcproxy.app.tap import Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults():
    options = parse()
    assert options["listen"] == ["tcp:11211"]
    assert options["config"] is None
    assert options["memory"] == 64


def test_listen_is_repeatable():
    options = parse("--listen=tcp:1234:interface=127.0.0.1", "-l", "unix:/tmp/mcp.sock")
    assert options["listen"] == ["tcp:1234:interface=127.0.0.1", "unix:/tmp/mcp.sock"]


@pytest.mark.parametrize("args, message", [
    (["--listen=bogus:1"], "bad --listen endpoint"),
    (["--listen=tcp:notaport"], "bad --listen endpoint"),
    (["--config=/nonexistent/route.lua"], "no such file"),
    (["--memory=0"], "--memory"),
])
def test_usage_errors(args, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_make_service_builds_a_multiservice_with_the_listeners(tmp_path):
    config = tmp_path / "route.lua"
    config.write_text("function mcp_config_pools() return {} end\n"
                      "function mcp_config_routes() end\n")
    process = makeService(parse(f"--config={config}", "--listen=tcp:0:interface=127.0.0.1"))
    assert isinstance(process, ProxyProcess)
    assert list(process) == [process.proxy]
    service = process.proxy
    assert isinstance(service, ProxyService)
    assert len(list(service)) >= 1
    assert service.engine.routes is not None


def test_building_changes_nothing_in_the_process_starting_does(monkeypatch):
    """makeService builds; the ProxyProcess, once started, raises the GC
    threshold and adopts the epoll reactor; an embedding app decides."""
    before = gc.get_threshold()
    adopted = []
    monkeypatch.setattr(process_module, "adopt", adopted.append)
    try:
        ProxyService(None, ["tcp:0:interface=127.0.0.1"])
        process = makeService(parse("--listen=tcp:0:interface=127.0.0.1"))
        assert gc.get_threshold() == before and not adopted
        reactor = MemoryReactorClock()
        process.reactor = reactor
        process.proxy.startService = lambda: None  # no listening, no signals
        process.startService()
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
        assert adopted == [reactor]
    finally:
        gc.set_threshold(*before)


def test_a_broken_config_stops_make_service(tmp_path):
    config = tmp_path / "route.lua"
    config.write_text("function mcp_config_pools()\n  error('boom')\nend\n")
    with pytest.raises(SystemExit, match=r"route\.lua:2: boom"):
        makeService(parse(f"--config={config}"))
