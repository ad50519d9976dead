"""V2 routers (``mcp.router_new``, routelib's ``routes{ map = ... }``) run
natively: the route name of a key found in Python as v2.lua finds it, and
every client answered, every backend changed, every request counted as the
router's Lua body (``RouteEngine(direct=False)``) does."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lupa.lua54 import LuaRuntime

from fuzz.checks import chunked
from mcproxy.routing.engine import ROUTELIB_PATH
from mcproxy.routing.native import AllAsync, AllFastest, Fastest, LibZoneFailover, Router
from mcproxy.routing.routerkey import KeyRouter, prefix_name, route_name
from mcproxy.wire import request as rq
from mcproxy.wire.request import parse_request
from tests.routing.test_native import (
    LABELS,
    POOLS,
    PROPERTY,
    ScriptedProxy,
    config,
    modes,
    proxy,
)

V2_PATH = Path(ROUTELIB_PATH).parent / "v2.lua"
_LUA_ROUTE = None


def _lua_route():
    """v2.lua's own ``before`` and ``route``, over a router whose map
    records the name it is asked for."""
    global _LUA_ROUTE
    if _LUA_ROUTE is None:
        source = V2_PATH.read_text()
        start = source.index("    local function before(key, first, stop)")
        end = source.index("\n    end\n", start) + 9
        route = source.index("    local function route(router, r)")
        route_end = source.index("\n    end\n", route) + 9
        lua = LuaRuntime(encoding=None)
        _LUA_ROUTE = lua.execute(
            "local string_find, string_sub = string.find, string.sub\n"
            "local FUNCGEN = {}\nlocal mcp = { CMD_ANY_STORAGE = 37 }\n"
            "local R_KEY <const>, R_CMD <const> = 1, 2\n"
            + source[start:end] + source[route:route_end] + """
            return function(key, start, stop)
                local asked = false
                local map = setmetatable({}, { __index = function(_, name)
                    asked = name
                    return nil
                end })
                local router = { map = map, start = start, stop = stop, default = "default" }
                local got = route(router, { key, 7 })  -- a request's slots
                if asked then return asked end
                return got
            end""")
    return _LUA_ROUTE


_alphabet = st.sampled_from(list(b"/:ab-"))
_text = st.lists(_alphabet, max_size=12).map(bytes)
_sep = st.lists(_alphabet, min_size=1, max_size=5).map(bytes)


@given(key=_text.filter(bool), start=st.none() | _sep, stop=_sep)
def test_route_name_is_v2_luas(key, start, stop):
    """The route name of a key (None: the router's default), in Python as
    in v2.lua, for prefix mode (start None) and anchors of every length."""
    lua = _lua_route()(key, start, stop)
    expected = None if lua == b"default" else lua
    assert route_name(key, start, stop) == expected


def test_route_name_examples():
    assert route_name(b"foo/bar", None, b"/") == b"foo"
    assert route_name(b"/foo", None, b"/") is None  # an empty name
    assert route_name(b"foo", None, b"/") is None
    assert route_name(b"foo::", None, b"::") is None  # a long stop that ends the key
    assert route_name(b"/foo/x", b"/", b"/") == b"foo"
    assert route_name(b"foo/x", b"/", b"/") is None
    assert route_name(b"<<a>>x", b"<<", b">>") == b"a"


#: Keys with route names, and without.
KEYS = [b"foo/1", b"foo/2", b"bar/1", b"baz/1", b"k1", b"/foo", b"foo", b"/bar/x",
        b"bar/" + b"x" * 246]
_keys = st.sampled_from(KEYS)


@st.composite
def client_requests(draw) -> bytes:
    """Gets of one and several keys, writes, meta commands."""
    key = draw(_keys)
    kind = draw(st.integers(0, 9))
    value = draw(st.sampled_from([b"", b"v", b"value"]))
    if kind <= 1:
        return b"get %s\r\n" % key
    if kind <= 3:
        keys = draw(st.lists(_keys, min_size=2, max_size=6))
        return draw(st.sampled_from([b"get ", b"gets "])) + b" ".join(keys) + b"\r\n"
    if kind == 4:
        return b"set %s 5 0 %d\r\n%s\r\n" % (key, len(value), value)
    if kind == 5:
        return draw(st.sampled_from([b"delete %s\r\n", b"touch %s 10\r\n", b"gat 10 %s\r\n",
                                     b"incr %s 1\r\n", b"mn\r\n"])).replace(b"%s", key)
    if kind == 6:
        flags = draw(st.sampled_from([b" v", b" s t v c", b" k O1 q", b""]))
        return b"mg %s%s\r\n" % (key, flags)
    if kind == 7:
        return b"ms %s %d T0\r\n%s\r\n" % (key, len(value), value)
    if kind == 8:
        return draw(st.sampled_from([b"md %s q\r\n", b"ma %s N0 J5\r\n",
                                     b"add %s 0 0 1 noreply\r\nz\r\n"])) % key
    return INTROSPECTION  # routes.config's introspection (V1), a key like any other (V2)


INTROSPECTION = b"get __mcproxy__.route(get,foo/1)\r\n"


held = st.fixed_dictionaries({label: st.lists(_keys, unique=True) for label in LABELS})
streams = st.lists(client_requests(), max_size=10).map(b"".join)

#: routelib route trees run natively; the kind of their get route.
ROUTELIB_TREES = {
    "map of pools": ('map = { foo = route_direct{ child = "a" }, bar = route_direct{ '
                     'child = "c" } }, default = route_direct{ child = "b" }', KeyRouter),
    "map of routes": ('map = { foo = route_failover{ children = { "a", "b" } }, '
                      'bar = route_direct{ child = "c" }, baz = route_allsync{ children = '
                      '{ "a", "c" } } }, default = route_failover{ children = { "c", "a" }, '
                      'miss = true }', Router),
    "map without default": ('map = { foo = route_direct{ child = "a" }, bar = '
                            'route_split{ child_a = "c", child_b = "b" } }', Router),
    "map with a Lua route": ('map = { foo = route_ttl{ ttl = 5, child = "a" }, bar = '
                             'route_direct{ child = "c" } }, default = route_direct{ '
                             'child = "b" }', Router),
    "anchors": ('map = { foo = route_direct{ child = "a" }, bar = route_direct{ '
                'child = "c" } }, conf = { mode = "anchor", start = "/", stop = "/" }, '
                'default = route_failover{ children = { "b", "a" } }', Router),
    "map of cmdmaps": ('map = { foo = cmdmap{ [mcp.CMD_GET] = route_direct{ child = "a" }, '
                       '[mcp.CMD_SET] = route_allsync{ children = { "a", "b" } } }, '
                       'bar = route_direct{ child = "c" } }, '
                       'default = route_direct{ child = "b" }', KeyRouter),
    "fastest and zones": ('map = { foo = route_allfastest{ children = { "a", "b", "c" } }, '
                          'bar = route_zfailover{ children = "set_z", local_zone = "zb" }, '
                          'baz = route_zfailover{ children = "set_z", local_zone = "zc", '
                          'miss = true } }, default = route_allfastest{ children = '
                          '{ "c", "a" } }', Router),
    "route_allfastest": ('default = route_allfastest{ children = { "a", "b", "c" } }',
                         AllFastest),
    "route_zfailover": ('default = route_zfailover{ children = "set_z", local_zone = "zb" }',
                        LibZoneFailover),
    "route_zfailover on misses": ('default = route_zfailover{ children = "set_z", '
                                  'local_zone = "zc", miss = true }', LibZoneFailover),
    "cmap": ('cmap = { [mcp.CMD_SET] = route_allsync{ children = { "a", "b" } }, '
             '[mcp.CMD_GET] = route_failover{ children = { "b", "c" } } }, '
             'default = route_direct{ child = "c" }', Router),
}


#: A pool set of the three pools (zones za, zb, zc).
ZONES = """
    set_z = { za = { backends = { "127.0.0.1:1" } }, zb = { backends = { "127.0.0.1:2" } },
              zc = { backends = { "127.0.0.1:3", "127.0.0.1:4" } } },
"""


def routelib_file(tree: str) -> str:
    return "pools{" + POOLS + ZONES + "}\nroutes{ " + tree + " }\n"


def _check(native: ScriptedProxy, lua: ScriptedProxy, kind, mode_of, stock, stream, cuts,
           introspect: bool = False):
    """Both engines answer, store and count alike; a router of pools
    never enters Lua (but for introspection, with ``introspect``)."""
    get = native.routes.direct.pools.get(rq.CMD_GET) or native.routes.native.get(rq.CMD_GET)
    assert isinstance(get, kind)
    chunks = chunked(stream, cuts)
    started = native.started
    assert native.exchange(mode_of, stock, chunks, keys=KEYS) == \
        lua.exchange(mode_of, stock, chunks, keys=KEYS)
    if kind is KeyRouter:
        assert native.started - started == (stream.count(INTROSPECTION) if introspect else 0)
    for counter in ("conn_requests", "commands"):
        assert getattr(native.stats, counter) == getattr(lua.stats, counter)


@pytest.mark.parametrize("name", sorted(ROUTELIB_TREES))
@PROPERTY
@given(modes=modes, held=held, stream=streams, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_routelib_routers_answer_as_their_lua_bodies(tmp_path_factory, name, modes, held,
                                                    stream, cuts):
    """routelib route trees behind a router run without Lua (but the
    routes Lua runs) and answer as their V2 bodies do."""
    tree, kind = ROUTELIB_TREES[name]
    text = routelib_file(tree)
    native = proxy(tmp_path_factory, text, True, routelib=True)
    lua = proxy(tmp_path_factory, text, False, routelib=True)
    _check(native, lua, kind, modes, held, stream, cuts)


def _v2_config(body: str) -> str:
    return textwrap.dedent("""
        function mcp_config_pools()
            local b = {}
            for i = 1, 4 do
                b[i] = mcp.backend("127.0.0.1:" .. i, "127.0.0.1", tostring(i))
            end
            return { a = mcp.pool({ b[1] }), b = mcp.pool({ b[2] }),
                     c = mcp.pool({ b[3], b[4] }) }
        end

        local function direct(p)
            local fgen = mcp.funcgen_new()
            local h = fgen:new_handle(p)
            fgen:ready{ n = "direct", f = function(rctx)
                return function(r) return rctx:enqueue_and_wait(r, h) end
            end }
            return fgen
        end

        local function checked(p)
            local fgen = mcp.funcgen_new()
            local h = fgen:new_handle(p)
            fgen:ready{ n = "checked", f = function(rctx)
                return function(r)
                    local res = rctx:enqueue_and_wait(r, h)
                    if res:hit() then return res end
                    return "SERVER_ERROR missed\\r\\n"
                end
            end }
            return fgen
        end

        function mcp_config_routes(p)
    """) + textwrap.indent(textwrap.dedent(body), "    ") + "end\n"


#: V2 configs attaching routers; the kind of their get route.
V2_ROUTERS = {
    "prefix": ("""
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{
            map = { foo = direct(p.a), bar = direct(p.c) }, default = direct(p.b) })
        """, KeyRouter),
    "long stop": ("""
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{ mode = "prefix", stop = "o/",
            map = { f = direct(p.a), ba = direct(p.c) }, default = direct(p.b) })
        """, KeyRouter),
    "a Lua child": ("""
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{
            map = { foo = checked(p.a), bar = direct(p.c) }, default = direct(p.b) })
        """, Router),
    "command maps": ("""
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{
            map = { foo = { [mcp.CMD_GET] = direct(p.a), [mcp.CMD_ANY_STORAGE] = direct(p.b) },
                    bar = { [mcp.CMD_SET] = direct(p.c) } },
            default = direct(p.c) })
        """, KeyRouter),
    "anchors, no default": ("""
        mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{ mode = "anchor",
            map = { foo = direct(p.a), bar = direct(p.c) } })
        """, Router),
}


@pytest.mark.parametrize("name", sorted(V2_ROUTERS))
@PROPERTY
@given(modes=modes, held=held, stream=streams, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_v2_routers_answer_as_their_lua_bodies(tmp_path_factory, name, modes, held, stream,
                                              cuts):
    """Routers a V2 config attaches run without Lua where their routes
    are direct funcgens, and answer as their Lua bodies do."""
    body, kind = V2_ROUTERS[name]
    text = _v2_config(body)
    native = proxy(tmp_path_factory, text, True)
    lua = proxy(tmp_path_factory, text, False)
    _check(native, lua, kind, modes, held, stream, cuts)


#: routes.config routes of routes.prefix_router and routes.all_fastest;
#: the kind of their get route.
V1_ROUTES = {
    "prefix_router of pools": ('routes.prefix_router{ map = { foo = "a", bar = "c" }, '
                               'default = "b", stop = "/" }', KeyRouter),
    "prefix_router, longest prefix": ('routes.prefix_router{ map = { foo = "a", '
                                      '["foo/1"] = "c", b = routes.failover{ "a", "b" } }, '
                                      'default = "b" }', Router),
    "prefix_router, no default": ('routes.prefix_router{ map = { foo = routes.all_fastest{ '
                                  '"a", "b", "c" }, bar = { reads = "a", writes = '
                                  'routes.all_sync{ "a", "c" } } }, stop = "/" }', Router),
    "prefix_router of a Lua route": ('routes.prefix_router{ map = { foo = routes.ttl_cap('
                                     '"a", 100), bar = "c" }, default = "b", stop = "/" }',
                                     Router),
    "all_async": ('routes.all_async{ "a", "b", "c" }', AllAsync),
    "all_async behind a prefix router": ('routes.prefix_router{ map = { foo = '
                                         'routes.all_async{ "c", "a" } }, default = "b", '
                                         'stop = "/" }', Router),
    "all_fastest": ('routes.all_fastest{ "a", "b", "c" }', Fastest),
    "all_fastest on misses": ('routes.all_fastest({ "c", "a" }, { miss = true })', Fastest),
}


@pytest.mark.parametrize("name", sorted(V1_ROUTES))
@PROPERTY
@given(modes=modes, held=held, stream=streams, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_v1_routers_answer_as_their_lua_bodies(tmp_path_factory, name, modes, held, stream,
                                              cuts):
    """routes.prefix_router and routes.all_fastest run without Lua (but
    the routes Lua runs, and all_fastest's requests that use a cas unique)
    and answer as their Lua bodies do."""
    route, kind = V1_ROUTES[name]
    text = config(route)
    native = proxy(tmp_path_factory, text, True)
    lua = proxy(tmp_path_factory, text, False)
    _check(native, lua, kind, modes, held, stream, cuts, introspect=True)


@given(key=_text, prefixes=st.lists(_text, max_size=5), stop=st.none() | _sep)
def test_prefix_name_is_routes_luas(key, prefixes, stop):
    """routes.prefix_router's map key for a key, in Python as in Lua."""
    map_text = ", ".join(f'["{prefix.decode()}"] = "p"' for prefix in prefixes)
    stop_text = "nil" if stop is None else f'"{stop.decode()}"'
    found = _lua_prefix_of()(key, map_text.encode(), stop_text.encode())
    unique = frozenset(prefixes)
    assert prefix_name(key, unique, max(map(len, unique), default=0), stop) == found


_LUA_PREFIX = None


def _lua_prefix_of():
    """routes.prefix_router's own prefix_of, over a given map and stop."""
    global _LUA_PREFIX
    if _LUA_PREFIX is None:
        source = (V2_PATH.parent / "routes.lua").read_text()
        start = source.index("    local function prefix_of(key)")
        end = source.index("\n    end\n", start) + 9
        lua = LuaRuntime(encoding=None)
        body = source[start:end]
        _LUA_PREFIX = lua.eval("""function(key, map_text, stop_text)
            local string_find, string_sub = string.find, string.sub
            local slots = load("return {" .. map_text .. "}")()
            local stop = load("return " .. stop_text)()
            local longest = 0
            for prefix in pairs(slots) do
                if #prefix > longest then longest = #prefix end
            end
            """ + body + """
            return prefix_of(key)
        end""")
    return _LUA_PREFIX


def _scripted(tmp_path, tree: str) -> ScriptedProxy:
    path = tmp_path / "routes.lua"
    path.write_text(routelib_file(tree))
    return ScriptedProxy(ROUTELIB_PATH, True, str(path))


def test_router_of_pools_takes_plain_runs_and_batches(tmp_path):
    """A router whose routes are all pools is the direct path: runs of
    plain gets and sets, and a multiget's keys one backend multiget per
    backend, never Lua."""
    scripted = _scripted(tmp_path, ROUTELIB_TREES["map of pools"][0])
    assert scripted.routes.direct.plain_runs
    sent = []
    for backend in scripted.engine.registry.live:
        def send_unit(unit, settle=backend.send_unit, label=backend.label):
            out: list[bytes] = []
            unit.write(out, [unit], 0)
            sent.append((label, b"".join(out)))
            settle(unit)
        backend.send_unit = send_unit
    client, _ = scripted.exchange({}, {LABELS[0]: [b"foo/1"], LABELS[1]: [b"k1"]},
                                  [b"get foo/1 k1 foo/2\r\nget foo/1\r\nset k1 0 0 1\r\nz\r\n"],
                                  keys=KEYS)
    assert client == (b"VALUE foo/1 3 11\r\n127.0.0.1:1\r\nVALUE k1 3 11\r\n127.0.0.1:2\r\n"
                      b"END\r\nVALUE foo/1 3 11\r\n127.0.0.1:1\r\nEND\r\nSTORED\r\n")
    assert (LABELS[0], b"get foo/1 foo/2\r\n") in sent
    assert scripted.started == 0


def test_router_keys_to_one_runner_travel_together(tmp_path):
    """A multiget whose keys all go to one native runner (a failover) is
    that runner's multiget; keys for pools and runners at once go key by
    key."""
    scripted = _scripted(tmp_path, ROUTELIB_TREES["map of routes"][0])
    scripted.modes, scripted.stores = {}, {}
    units = []
    for backend in scripted.engine.registry.live:
        backend.send_unit = lambda unit, label=backend.label: units.append((label, unit))
    req = parse_request(b"get foo/1 foo/2\r\n")
    assert scripted.engine.route_keys(req, [b"foo/1", b"foo/2"], lambda reply: None)
    assert [(label, unit.keys) for label, unit in units] == [(LABELS[0], [b"foo/1", b"foo/2"])]
    req = parse_request(b"get foo/1 bar/1\r\n")
    assert not scripted.engine.route_keys(req, [b"foo/1", b"bar/1"], lambda reply: None)


def test_router_left_to_lua(tmp_path):
    """A router all of whose routes Lua runs is not native."""
    scripted = _scripted(tmp_path, 'map = { foo = route_ttl{ ttl = 5, child = "a" } }')
    assert rq.CMD_GET not in scripted.routes.native
    assert rq.CMD_GET not in scripted.routes.direct.pools


def _held_units(scripted: ScriptedProxy) -> list:
    """Hold what each backend is sent: (label, unit), to settle later."""
    held_units: list = []
    for backend in scripted.engine.registry.live:
        backend.send_unit = lambda unit, label=backend.label: held_units.append((label, unit))
    return held_units


@pytest.mark.parametrize("tree", ["route_allfastest", "route_zfailover",
                                  "route_zfailover on misses"])
@PROPERTY
@given(modes=modes, held=held, key=_keys, order=st.randoms(use_true_random=False))
def test_answers_in_any_order_as_lua(tmp_path_factory, tree, modes, held, key, order):
    """Backends that answer after the request went out, in any order: the
    native route_allfastest and route_zfailover answer as their bodies'
    waits would have (over at the first ok answer, or once all answered)."""
    text = routelib_file(ROUTELIB_TREES[tree][0])
    path = tmp_path_factory.mktemp("order") / "routes.lua"
    path.write_text(text)
    replies = []
    for direct in (True, False):
        scripted = ScriptedProxy(ROUTELIB_PATH, direct, str(path))
        assert (rq.CMD_GET in scripted.routes.native) is direct
        scripted.exchange(modes, held, [], keys=KEYS)  # the stores, the modes
        units = _held_units(scripted)
        out: list[bytes] = []
        scripted.engine.route(parse_request(b"get %s\r\n" % key), out.append)
        rounds = order.getstate()
        while units:
            order.shuffle(units)
            label, unit = units.pop()
            scripted._settle(label, unit)
        order.setstate(rounds)
        replies.append(out)
    assert replies[0] == replies[1] and len(replies[0]) == 1


def test_the_differential_routelib_file_runs_natively(monkeypatch):
    """tests/e2e/test_routelib_e2e.py compares this file's answers with
    memcached 1.6.45's byte for byte: behind its router, each route of
    those kinds runs natively (route_ttl and route_null in Lua)."""
    for name, port in (("RL_A", "1"), ("RL_B", "2"), ("RL_DOWN", "3")):
        monkeypatch.setenv(name, port)
    path = Path(__file__).resolve().parents[1] / "e2e" / "routelib" / "routes.lua"
    scripted = ScriptedProxy(ROUTELIB_PATH, True, str(path))
    router = scripted.routes.native[rq.CMD_GET]
    assert isinstance(router, Router)
    kinds = {name.decode(): type(target).__name__ for name, target in router.routes.items()}
    assert kinds == {
        "a": "Pool", "b": "Pool", "fo": "Failover", "fomiss": "Failover",
        "fonomiss": "Failover", "focount": "Failover", "sync": "AllSync",
        "syncdown": "AllSync", "fast": "AllFastest", "fastdown": "AllFastest",
        "fastnone": "AllFastest", "syncm": "AllSync", "split": "Split", "splitsub": "Split",
        "ttl": "NoneType", "null": "NoneType", "z": "LibZoneFailover", "cmd": "Pool"}
    assert type(router.default).__name__ == "Pool"
