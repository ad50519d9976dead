"""``--wire``: which wire behaviour clients get, over the config's own."""

from __future__ import annotations

import pytest
from twisted.python import usage

from mcproxy.app.tap import Options, makeService
from mcproxy.app.workers import worker_arguments
from mcproxy.wire.behaviour import WIRE_1_6_15, WIRE_1_6_45

V1 = """
function mcp_config_pools() return mcp.pool({ mcp.backend("b", "127.0.0.1", 11211) }) end
function mcp_config_routes(p) mcp.attach(mcp.CMD_GET, function(r) return p(r) end) end
"""


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_auto_by_default():
    assert parse()["wire"] == "auto"


def test_an_unknown_release_is_refused():
    with pytest.raises(usage.UsageError, match="--wire must be one of 1.6.15, 1.6.45, auto"):
        parse("--wire=1.6.30")


@pytest.mark.parametrize("args, want", [((), WIRE_1_6_15), (("--wire=1.6.45",), WIRE_1_6_45),
                                        (("--wire=1.6.15",), WIRE_1_6_15)])
def test_the_service_gets_it(tmp_path, args, want):
    config = tmp_path / "route.lua"
    config.write_text(V1)
    process = makeService(parse(f"--config={config}", "--listen=tcp:0:interface=127.0.0.1",
                                *args))
    assert process.proxy.engine.wire is want


def test_workers_get_it():
    assert "--wire=1.6.45" in worker_arguments(parse("--wire=1.6.45", "--workers=2"))
    assert not [a for a in worker_arguments(parse("--workers=2")) if a.startswith("--wire")]
