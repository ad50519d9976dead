"""Listener tags in the route engine: ``mcp.attach(cmd, f, tag)`` (V1
functions, V2 funcgens and routers), routelib's ``routes{ tag = ... }``, and
the engine's view per tag (RouteEngine.view). What 1.6.45 answers through
real listeners is held by tests/e2e/test_tags_e2e.py."""

from __future__ import annotations

import textwrap

import pytest

from mcproxy.routing.engine import ROUTELIB_PATH, ConfigError
from mcproxy.units import KeyBatch, KeyFetch
from mcproxy.wire import request as rq
from tests.enginekit import FakeBackends, engine, load, run  # noqa: F401

TWO_POOLS = """
function mcp_config_pools()
    return { a = mcp.pool({ mcp.backend("a", "127.0.0.1", 1) }),
             b = mcp.pool({ mcp.backend("b", "127.0.0.1", 2) }) }
end
"""
V1 = TWO_POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, function(r) return p.b(r) end, "x")
    mcp.attach(mcp.CMD_SET, function(r) return "SERVER_ERROR x set\\r\\n" end, "x")
    mcp.attach(mcp.CMD_GET, function(r) return p.a(r) end)
    mcp.attach(mcp.CMD_MG, function(r) return "SERVER_ERROR untagged mg\\r\\n" end)
    mcp.attach(mcp.CMD_DELETE, function(r) return "SERVER_ERROR y delete\\r\\n" end, "y")
end
"""
HIT_A = b"VALUE k 0 1\r\na\r\nEND\r\n"
HIT_B = b"VALUE k 0 1\r\nb\r\nEND\r\n"
REPLIES = {"a": HIT_A, "b": HIT_B}


def test_a_tagged_listener_gets_its_routes_and_the_untagged_for_the_rest(engine, load):  # noqa: F811
    """As memcached 1.6.45: per command, the tag's route, else the
    untagged one (the mg), else nothing (answered locally)."""
    load(V1)
    FakeBackends(engine, REPLIES)
    x = engine.view("x")
    assert run(x, b"get k\r\n") == HIT_B
    assert run(x, b"set k 0 0 1\r\n", b"v\r\n") == b"SERVER_ERROR x set\r\n"
    assert run(x, b"mg k v\r\n") == b"SERVER_ERROR untagged mg\r\n"
    assert not x.hooked(rq.CMD_DELETE)
    assert run(engine, b"get k\r\n") == HIT_A
    assert not engine.hooked(rq.CMD_SET) and not engine.hooked(rq.CMD_DELETE)
    assert engine.view("y").hooked(rq.CMD_DELETE)


def test_a_tag_no_route_names_gets_the_untagged_routes(engine, load):  # noqa: F811
    load(V1)
    FakeBackends(engine, REPLIES)
    other = engine.view("other")
    assert run(other, b"get k\r\n") == HIT_A
    assert not other.hooked(rq.CMD_SET)


def test_views_are_kept_and_share_the_counters(engine, load):  # noqa: F811
    load(V1)
    FakeBackends(engine, REPLIES)
    x = engine.view("x")
    assert engine.view("x") is x and engine.view(None) is engine
    run(x, b"get k\r\n")
    run(engine, b"get k\r\n")
    assert x.stats is engine.stats and engine.stats.conn_requests == 2
    assert x.view("y") is engine.view("y")


def test_a_view_made_before_the_load_routes_once_it_is_loaded(engine, load):  # noqa: F811
    x = engine.view("x")
    assert not x.hooked(rq.CMD_GET)
    load(V1)
    FakeBackends(engine, REPLIES)
    assert run(x, b"get k\r\n") == HIT_B


def test_a_reload_swaps_every_tag_at_once(engine, load):  # noqa: F811
    x, y = engine.view("x"), engine.view("y")
    load(V1)
    old = engine.routes
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return p.a(r) end, "y")
        mcp.attach(mcp.CMD_GET, function(r) return p.b(r) end)
    end
    """)
    FakeBackends(engine, REPLIES)
    assert x.routes is y.routes is engine.routes is not old
    assert run(y, b"get k\r\n") == HIT_A
    # x's routes are gone with the old config: it gets the untagged ones
    assert run(x, b"get k\r\n") == HIT_B
    assert not x.hooked(rq.CMD_SET) and not y.hooked(rq.CMD_DELETE)


def test_a_tagged_pool_call_is_still_the_direct_path(engine, load):  # noqa: F811
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        local a, b = p.a, p.b
        mcp.attach(mcp.CMD_GET, function(r) return b(r) end, "x")
        mcp.attach(mcp.CMD_GET, function(r) local res = a(r) return res end)
    end
    """)
    x = engine.view("x")
    assert engine.routes.for_tag("x").shapes[rq.CMD_GET].kind == "direct"
    assert engine.routes.shapes[rq.CMD_GET].kind == "lua"
    # runs of gets: the tag's direct, the untagged ones' routed in Lua
    assert x.plain_runs is not None and not x._lua_runs and engine._lua_runs
    sent = []
    for backend in engine.registry.live:
        backend.send_unit = sent.append
    assert x.route_keys(rq.parse_request(b"get k j\r\n"), [b"k", b"j"], [].append)
    assert [type(unit) for unit in sent] == [KeyBatch]
    assert engine.route_keys(rq.parse_request(b"get k j\r\n"), [b"k", b"j"], [].append)
    assert [type(unit) for unit in sent] == [KeyBatch, KeyFetch]


def test_flush_all_by_default_per_tag(engine, load):  # noqa: F811
    """Every tag gets the default flush_all (all pools) unless it attaches
    one of its own."""
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return p.b(r) end, "x")
        mcp.attach(mcp.CMD_FLUSH_ALL, function(r) return "OK\\r\\n" end, "y")
    end
    """)
    routes = engine.routes
    assert rq.CMD_FLUSH_ALL in routes.for_tag("x").direct.pools
    assert rq.CMD_FLUSH_ALL not in routes.for_tag("y").direct.pools
    assert run(engine.view("y"), b"flush_all\r\n") == b"OK\r\n"


def test_funcgens_and_routers_attach_per_tag(engine, load):  # noqa: F811
    load(TWO_POOLS + """
    local function answer(s)
        local fg = mcp.funcgen_new()
        fg:ready{ n = s, f = function(rctx)
            return function(r) return "SERVER_ERROR " .. s .. "\\r\\n" end
        end }
        return fg
    end
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY_STORAGE,
                   mcp.router_new{ map = { foo = answer("x-foo") }, default = answer("x") },
                   "x")
        mcp.attach(mcp.CMD_ANY_STORAGE, answer("untagged"))
    end
    """)
    x = engine.view("x")
    assert run(x, b"get foo/k\r\n") == b"SERVER_ERROR x-foo\r\n"
    assert run(x, b"get k\r\n") == b"SERVER_ERROR x\r\n"
    assert run(engine, b"get foo/k\r\n") == b"SERVER_ERROR untagged\r\n"


@pytest.mark.parametrize(("tag", "message"), [
    ('""', "mcp.attach: tag must be 1 to 8 characters"),
    ('"abcdefghi"', "mcp.attach: tag must be 1 to 8 characters"),
    ("true", "mcp.attach: tag must be a string, not a boolean"),
    ("{}", "mcp.attach: tag must be a string, not a table"),
])
def test_a_bad_tag_fails_the_load(load, tag, message):  # noqa: F811
    """1.6.45 refuses the lengths with these words; a tag that is not a
    string it ignores (the route serves every listener), mcproxy refuses."""
    with pytest.raises(ConfigError, match=message):
        load(TWO_POOLS + f"""
        function mcp_config_routes(p)
            mcp.attach(mcp.CMD_GET, function(r) return p.a(r) end, {tag})
        end
        """)


def test_a_number_is_a_tag_as_lua_reads_it(engine, load):  # noqa: F811
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return "SERVER_ERROR five\\r\\n" end, 5)
    end
    """)
    assert run(engine.view("5"), b"get k\r\n") == b"SERVER_ERROR five\r\n"
    assert set(engine.routes.tagged) == {"5"}


def test_every_tag_names_its_pools(engine, load):  # noqa: F811
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        local only_x = p.b
        mcp.attach(mcp.CMD_GET, function(r) return only_x(r) end, "x")
    end
    """)
    assert [name for name, _ in engine.routes.pools] == ["only_x"]


# -- the route library ------------------------------------------------------------

POOLS = """
pools{ a = { backends = { "127.0.0.1:1 a" } }, b = { backends = { "127.0.0.1:2 b" } } }
"""


@pytest.fixture
def routelib(engine, tmp_path):  # noqa: F811
    def load_routelib(text: str):
        path = tmp_path / "routes.lua"
        path.write_text(textwrap.dedent(text))
        return engine.load(ROUTELIB_PATH, str(path))
    return load_routelib


def test_routelib_tagged_route_trees(engine, routelib):  # noqa: F811
    routelib(POOLS + """
    routes{ tag = "x", map = { foo = route_direct{ child = "b" } },
            default = route_direct{ child = "b" } }
    routes{ default = route_direct{ child = "a" } }
    """)
    fake = FakeBackends(engine, REPLIES)
    x = engine.view("x")
    assert run(x, b"get foo/k\r\n") == HIT_B
    assert run(x, b"get k\r\n") == HIT_B
    assert run(engine, b"get foo/k\r\n") == HIT_A
    assert run(engine.view("y"), b"get k\r\n") == HIT_A
    assert [label for label, _ in fake.sent] == ["b", "b", "a", "a"]
    # alone, an untagged route_direct is still the direct path
    assert engine.routes.shapes[rq.CMD_GET].kind == "direct"


def test_routelib_a_tagged_tree_alone_leaves_untagged_listeners_local(engine, routelib):  # noqa: F811,E501
    """As 1.6.45: untagged listeners are served by the embedded cache; a
    tagged tree takes every storage command of its listeners."""
    routelib(POOLS + 'routes{ tag = "x", cmap = { [mcp.CMD_MG] = route_direct{ child = "b" } } }')
    assert not engine.hooked(rq.CMD_GET)
    x = engine.view("x")
    assert x.hooked(rq.CMD_GET) and x.hooked(rq.CMD_MG)


@pytest.mark.parametrize(("text", "message"), [
    ('routes{ tag = "x", default = route_direct{ child = "a" } }\n'
     'routes{ tag = "x", default = route_direct{ child = "b" } }',
     "routes: two route trees for tag 'x'"),
    ('routes{ default = route_direct{ child = "a" } }\n'
     'routes{ default = route_direct{ child = "b" } }',
     "routes: only one untagged route tree"),
    ('routes{ tag = 1, default = route_direct{ child = "a" } }', "routes: tag must be a string"),
    ('routes{ tag = "toolongtag", default = route_direct{ child = "a" } }',
     "mcp.attach: tag must be 1 to 8 characters"),
])
def test_routelib_refuses_what_1_6_45_would_take_silently(routelib, text, message):
    """1.6.45 keeps the last of two trees for one tag; mcproxy refuses."""
    with pytest.raises(ConfigError, match=message):
        routelib(POOLS + text)


def test_a_refused_attach_leaves_no_tag_behind(engine, load):  # noqa: F811
    load(TWO_POOLS + """
    function mcp_config_routes(p)
        assert(not pcall(mcp.attach, 99, function(r) return p.a(r) end, "ghost"))
        assert(not pcall(mcp.attach, mcp.CMD_GET, 42, "ghost"))
    end
    """)
    assert engine.routes.tagged == {}
