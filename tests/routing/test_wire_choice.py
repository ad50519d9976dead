"""Which wire behaviour (mcproxy.wire.behaviour) the engine gives clients:
1.6.45's for a config that attaches a function generator or a router (the
V2 API, every route library config), 1.6.15's for any other, unless the
engine was built with one (``--wire``)."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet.testing import MemoryReactorClock

from mcproxy.backends.pool import BackendRegistry
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import ROUTELIB_PATH, RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.wire.behaviour import WIRE_1_6_15, WIRE_1_6_45

POOLS = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", 11211) })
end
"""

V1 = POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p(r) end)
end
"""

FUNCGEN = POOLS + """
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    local h = fgen:new_handle(p)
    fgen:ready({ n = "d", f = function(rctx)
        return function(r) return rctx:enqueue_and_wait(r, h) end
    end })
    mcp.attach(mcp.CMD_GET, fgen)
    -- a V1 function beside it does not make the config V1
    mcp.attach(mcp.CMD_SET, function(r) return p(r) end)
end
"""

ROUTER = POOLS + """
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    local h = fgen:new_handle(p)
    fgen:ready({ n = "d", f = function(rctx)
        return function(r) return rctx:enqueue_and_wait(r, h) end
    end })
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({ map = { a = fgen } }))
end
"""

# A funcgen made but never attached: the routes that serve are V1 ones.
UNATTACHED = POOLS + """
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    fgen:new_handle(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p(r) end)
end
"""

ROUTELIB = """
pools{ main = { backends = { "127.0.0.1:11211" } } }
routes{ default = route_direct{ child = "main" } }
"""


def engine(wire: str = "auto") -> RouteEngine:
    stats = ProxyStats()
    return RouteEngine(stats, BackendRegistry(stats, reactor=MemoryReactorClock()),
                       Tunables(), UserStats(), wire=wire)


def load(engine: RouteEngine, tmp_path, text: str, name: str = "route.lua"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    if text is ROUTELIB:
        return engine.load(ROUTELIB_PATH, str(path))
    return engine.load(str(path))


@pytest.mark.parametrize("text, v2", [
    (V1, False), (FUNCGEN, True), (ROUTER, True), (UNATTACHED, False), (ROUTELIB, True),
])
def test_the_config_api_picks_the_behaviour(tmp_path, text, v2):
    routing = engine()
    routes = load(routing, tmp_path, text)
    assert routes.v2 is v2
    assert routing.wire is (WIRE_1_6_45 if v2 else WIRE_1_6_15)


def test_before_any_config_clients_get_1_6_15():
    assert engine().wire is WIRE_1_6_15
    assert engine("1.6.45").wire is WIRE_1_6_45


@pytest.mark.parametrize("wire, want", [("1.6.15", WIRE_1_6_15), ("1.6.45", WIRE_1_6_45)])
def test_a_named_behaviour_holds_for_every_config(tmp_path, wire, want):
    routing = engine(wire)
    for text in (V1, FUNCGEN, ROUTELIB):
        load(routing, tmp_path, text)
        assert routing.wire is want


def test_a_reload_to_another_api_changes_the_behaviour(tmp_path):
    routing = engine()
    load(routing, tmp_path, V1)
    assert routing.wire is WIRE_1_6_15
    load(routing, tmp_path, FUNCGEN)
    assert routing.wire is WIRE_1_6_45
    load(routing, tmp_path, V1)
    assert routing.wire is WIRE_1_6_15
