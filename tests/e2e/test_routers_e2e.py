"""Routers run natively (routing/routerkey.py, routing/native/router.py)
through twistd against real memcached servers and a dead port: a V2
``mcp.router_new`` of direct funcgens (the direct path: multigets and
pipelined requests across both servers), one with a funcgen Lua runs, and a
routelib map whose routes are route_failover, route_allfastest and
route_zfailover. (tests/e2e/test_routelib_e2e.py compares such a map with
memcached 1.6.45's answers byte for byte.)"""

from __future__ import annotations

import textwrap

import pytest

from tests.servers import Memcached, Proxy, free_port


@pytest.fixture(scope="module")
def servers():
    a, b = Memcached().start(), Memcached().start()
    yield a, b
    a.stop()
    b.stop()


def _v2(a: int, b: int) -> str:
    return textwrap.dedent(f"""
        function mcp_config_pools()
            return {{ a = mcp.pool({{ mcp.backend("a", "127.0.0.1", {a}) }}),
                      b = mcp.pool({{ mcp.backend("b", "127.0.0.1", {b}) }}) }}
        end

        local function direct(p)
            local fgen = mcp.funcgen_new()
            local h = fgen:new_handle(p)
            fgen:ready{{ n = "direct", f = function(rctx)
                return function(r) return rctx:enqueue_and_wait(r, h) end
            end }}
            return fgen
        end

        local function marked(p)
            local fgen = mcp.funcgen_new()
            local h = fgen:new_handle(p)
            fgen:ready{{ n = "marked", f = function(rctx)
                return function(r)
                    local res = rctx:enqueue_and_wait(r, h)
                    if res:hit() then return res end
                    return "SERVER_ERROR marked miss\\r\\n"
                end
            end }}
            return fgen
        end

        function mcp_config_routes(p)
            mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new{{
                map = {{ foo = direct(p.a), bar = direct(p.b), lua = marked(p.a) }},
                default = direct(p.b) }})
        end
    """)


def test_v2_router_of_direct_funcgens(servers):
    a, b = servers
    for server in servers:
        assert server.call(b"flush_all\r\n") == b"OK\r\n"
    proxy = Proxy(None, config_text=_v2(a.port, b.port)).start()
    try:
        assert proxy.call(b"set foo/1 0 0 1\r\nA\r\nset bar/1 0 0 1\r\nB\r\n"
                          b"set k 0 0 1\r\nK\r\n", b"STORED\r\n" * 3) == b"STORED\r\n" * 3
        assert a.get(b"foo/1") == b"A" and b.get(b"bar/1") == b"B" and b.get(b"k") == b"K"
        assert a.get(b"bar/1") is None and a.get(b"k") is None
        assert proxy.call(b"get foo/1 bar/1 k foo/none foo/1\r\n", b"END\r\n") == (
            b"VALUE foo/1 0 1\r\nA\r\nVALUE bar/1 0 1\r\nB\r\nVALUE k 0 1\r\nK\r\n"
            b"VALUE foo/1 0 1\r\nA\r\nEND\r\n")
        assert proxy.call(b"get foo/1\r\nget bar/1\r\nmg k v\r\n", b"K\r\n") == (
            b"VALUE foo/1 0 1\r\nA\r\nEND\r\nVALUE bar/1 0 1\r\nB\r\nEND\r\nVA 1\r\nK\r\n")
        # the Lua route behind the router
        assert proxy.call(b"set lua/1 0 0 1\r\nL\r\n") == b"STORED\r\n"
        assert a.get(b"lua/1") == b"L"
        assert proxy.call(b"get lua/1 lua/none\r\n", b"END\r\n") == (
            b"VALUE lua/1 0 1\r\nL\r\nSERVER_ERROR marked miss\r\nEND\r\n")
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


ROUTELIB = """
pools{
    a = { backends = { "127.0.0.1:%(a)d" } },
    b = { backends = { "127.0.0.1:%(b)d" } },
    down = { backend_options = { connecttimeout = 1 }, backends = { "127.0.0.1:%(down)d" } },
    set_zones = { za = { backends = { "127.0.0.1:%(a)d" } },
                  zb = { backends = { "127.0.0.1:%(b)d" } } },
}
routes{
    map = {
        fo = route_failover{ children = { "down", "a" } },
        fast = route_allfastest{ children = { "down", "b" } },
        z = route_zfailover{ children = "set_zones", local_zone = "zb", miss = true },
    },
    default = route_direct{ child = "b" },
}
"""


def test_routelib_map_of_native_routes(servers, tmp_path):
    a, b = servers
    for server in servers:
        assert server.call(b"flush_all\r\n") == b"OK\r\n"
    path = tmp_path / "routes.lua"
    path.write_text(ROUTELIB % {"a": a.port, "b": b.port, "down": free_port()})
    proxy = Proxy("routelib", f"--config-arg={path}").start()
    try:
        # failover past the dead pool to a; allfastest: b, the dead one failing
        assert proxy.call(b"set fo/1 0 0 1\r\nF\r\n") == b"STORED\r\n"
        assert a.get(b"fo/1") == b"F"
        assert proxy.call(b"get fo/1 fo/2\r\n", b"END\r\n") == b"VALUE fo/1 0 1\r\nF\r\nEND\r\n"
        assert proxy.call(b"set fast/1 0 0 1\r\nQ\r\n") == b"STORED\r\n"
        assert b.get(b"fast/1") == b"Q"
        assert proxy.call(b"mg fast/1 v\r\n", b"Q\r\n") == b"VA 1\r\nQ\r\n"
        # zfailover on a miss in the local zone (b) reads the far one (a)
        assert a.call(b"set z/1 0 0 1\r\nZ\r\n") == b"STORED\r\n"
        assert proxy.call(b"get z/1\r\n", b"END\r\n") == b"VALUE z/1 0 1\r\nZ\r\nEND\r\n"
        assert proxy.call(b"get z/none\r\n", b"END\r\n") == b"END\r\n"
        assert proxy.call(b"get other\r\n", b"END\r\n") == b"END\r\n"
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()
