"""End to end: V2 route configs (funcgens, request contexts, routers) through
``twistd -n mcproxy`` in front of real memcached servers, with what mcproxy
adds to every config: user stats and ``stats proxy``, reload on SIGHUP, the
embedded cache, several workers, the status of the pools."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.servers import Memcached, Proxy, free_port

CONFIG = """
function mcp_config_pools()
    mcp.add_stat(1, "v2_requests")
    local function pool(label, port)
        return mcp.pool({ mcp.backend({ label = label, host = "127.0.0.1", port = port,
                                        connecttimeout = 0.5, retrytimeout = 0.2 }) })
    end
    return { a = pool("a", %(a)d), b = pool("b", %(b)d), down = pool("down", %(down)d) }
end

local function funcgen(name, pools, make)
    local fgen = mcp.funcgen_new()
    local handles = {}
    for i, pool in ipairs(pools) do
        handles[i] = fgen:new_handle(pool)
    end
    fgen:ready({ n = name, a = handles, f = make })
    return fgen
end

function mcp_config_routes(p)
    local map = {
        direct = funcgen("direct", { p.a }, function(rctx, h)
            return function(r)
                mcp.stat(1, 1)
                return rctx:enqueue_and_wait(r, h[1])
            end
        end),
        -- all servers written; the answer of the first
        both = funcgen("both", { p.a, p.b }, function(rctx, h)
            return function(r)
                rctx:enqueue(r, h)
                rctx:wait_cond(#h, mcp.WAIT_ANY)
                return rctx:res_any(h[1])
            end
        end),
        -- the first server that answers at all, then the next on a miss
        fo = funcgen("fo", { p.down, p.a, p.b }, function(rctx, h)
            return function(r)
                local res
                for i = 1, #h do
                    res = rctx:enqueue_and_wait(r, h[i])
                    if res:hit() then
                        return res
                    end
                end
                return res
            end
        end),
        -- answer from a, copy to b in the background
        bg = funcgen("bg", { p.a, p.b }, function(rctx, h)
            return function(r)
                rctx:enqueue(r, h[2])
                rctx:wait_cond(0)
                return rctx:enqueue_and_wait(r, h[1])
            end
        end),
        cache = funcgen("cache", {}, function(rctx)
            return function(r)
                return mcp.internal(r)
            end
        end),
        mark = funcgen("mark", {}, function(rctx)
            return function(r)
                return "SERVER_ERROR %(mark)s\\r\\n"
            end
        end),
    }
    mcp.attach(mcp.CMD_ANY_STORAGE, mcp.router_new({ map = map }))
end
"""


@pytest.fixture(scope="module")
def servers():
    a, b = Memcached().start(), Memcached().start()
    yield a, b
    a.stop()
    b.stop()


def config_text(servers, mark: str = "first") -> str:
    a, b = servers
    return CONFIG % {"a": a.port, "b": b.port, "down": free_port(), "mark": mark}


@pytest.fixture(scope="module")
def proxy(servers):
    proxy = Proxy(None, config_text=config_text(servers)).start()
    yield proxy
    proxy.stop()


def stats(proxy: Proxy, args: bytes = b"") -> dict[str, str]:
    reply = proxy.call(b"stats" + args + b"\r\n", b"END\r\n")
    fields = (line.split(b" ", 2) for line in reply.split(b"\r\n") if line.startswith(b"STAT "))
    return {name.decode(): value.decode() for _, name, value in fields}


def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.02)


def test_direct(proxy, servers):
    a, _ = servers
    assert proxy.call(b"set direct/k 0 0 2\r\nhi\r\n") == b"STORED\r\n"
    assert a.get(b"direct/k") == b"hi"
    assert proxy.call(b"get direct/k direct/nope\r\n", b"END\r\n") == \
        b"VALUE direct/k 0 2\r\nhi\r\nEND\r\n"


def test_replication_writes_every_server(proxy, servers):
    a, b = servers
    assert proxy.call(b"set both/k 0 0 3\r\ntwo\r\n") == b"STORED\r\n"
    assert (a.get(b"both/k"), b.get(b"both/k")) == (b"two", b"two")
    assert proxy.call(b"delete both/k\r\n") == b"DELETED\r\n"
    assert (a.get(b"both/k"), b.get(b"both/k")) == (None, None)


def test_failover_past_a_down_server_and_a_miss(proxy, servers):
    a, b = servers
    b.call(b"set fo/k 0 0 1\r\nb\r\n")
    assert proxy.call(b"get fo/k\r\n", b"END\r\n") == b"VALUE fo/k 0 1\r\nb\r\nEND\r\n"
    a.call(b"set fo/k 0 0 1\r\na\r\n")
    assert proxy.call(b"get fo/k\r\n", b"END\r\n") == b"VALUE fo/k 0 1\r\na\r\nEND\r\n"


def test_background_copy(proxy, servers):
    a, b = servers
    assert proxy.call(b"set bg/k 0 0 2\r\nbg\r\n") == b"STORED\r\n"
    assert a.get(b"bg/k") == b"bg"
    eventually(lambda: b.get(b"bg/k") == b"bg")


def test_embedded_cache(proxy, servers):
    assert proxy.call(b"set cache/k 0 0 2\r\nec\r\n") == b"STORED\r\n"
    assert proxy.call(b"get cache/k\r\n", b"END\r\n") == b"VALUE cache/k 0 2\r\nec\r\nEND\r\n"
    assert [s.get(b"cache/k") for s in servers] == [None, None]


def test_stats(proxy):
    before = stats(proxy, b" proxy")
    for _ in range(3):
        proxy.call(b"get direct/counted\r\n", b"END\r\n")
    after = stats(proxy, b" proxy")
    assert int(after["user_v2_requests"]) == int(before["user_v2_requests"]) + 3
    assert int(after["cmd_get"]) == int(before["cmd_get"]) + 3


def test_router_without_a_route(proxy):
    assert proxy.call(b"get nowhere/k\r\n") == b"SERVER_ERROR lua start failure\r\n"


def test_reload_on_sighup(servers):
    proxy = Proxy(None, config_text=config_text(servers, "first")).start()
    try:
        assert proxy.call(b"get mark/k\r\n") == b"SERVER_ERROR first\r\n"
        Path(proxy.config).write_text(config_text(servers, "second"))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        eventually(lambda: proxy.call(b"get mark/k\r\n") == b"SERVER_ERROR second\r\n")
        assert stats(proxy)["proxy_config_reloads"] == "1"
        # a broken config keeps the running routes
        Path(proxy.config).write_text(
            "function mcp_config_pools() return {} end\n"
            "function mcp_config_routes(p) mcp.funcgen_new():ready({}) end\n")
        os.kill(proxy.proc.pid, signal.SIGHUP)
        eventually(lambda: stats(proxy)["proxy_config_reload_fails"] == "1")
        assert proxy.call(b"get mark/k\r\n") == b"SERVER_ERROR second\r\n"
        assert "Must specify generator function ('f') to fgen:ready" in proxy.log()
    finally:
        proxy.stop()


def test_two_workers(servers):
    a, _ = servers
    proxy = Proxy(None, "--workers=2", config_text=config_text(servers)).start()
    try:
        eventually(lambda: proxy.log().count("ProxyServerFactory starting") >= 2, 10)
        for i in range(8):
            key = b"direct/w%d" % i
            assert proxy.call(b"set " + key + b" 0 0 1\r\nw\r\n") == b"STORED\r\n"
            assert a.get(key) == b"w"
    finally:
        proxy.stop()
