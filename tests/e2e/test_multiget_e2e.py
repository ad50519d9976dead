"""Client multigets through real memcached servers: keys routed together
per backend (a route that only calls a pool) answer byte for byte as keys
routed one by one (any other route), hits, misses, failures and all."""

from __future__ import annotations

import re

import pytest

from mcproxy.wire import errors
from tests.servers import Memcached, Proxy, read_until

CONFIG = """
function mcp_config_pools()
    return mcp.pool({
        mcp.backend("b1", "127.0.0.1", "%(b1)d"),
        mcp.backend("b2", "127.0.0.1", "%(b2)d"),
        mcp.backend("b3", "127.0.0.1", "%(b3)d"),
        mcp.backend("down", "127.0.0.1", "%(down)d"),
    })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, %(route)s)
end
"""
#: Routed together: the route engine sees a direct pool call.
TOGETHER = "function(r) return pool(r) end"
#: Routed key by key: the same answer, through Lua.
KEY_BY_KEY = "function(r) local res = pool(r) return res end"

KEYS = [b"k%d" % i for i in range(60)]


@pytest.fixture(scope="module")
def proxies():
    servers = {name: Memcached().start() for name in ("b1", "b2", "b3")}
    ports = {name: s.port for name, s in servers.items()}
    ports["down"] = Memcached().port  # nothing listens there
    together = Proxy(None, config_text=CONFIG % {**ports, "route": TOGETHER}).start()
    one_by_one = Proxy(None, config_text=CONFIG % {**ports, "route": KEY_BY_KEY}).start()
    with together.connect() as s:
        for key in KEYS[::2]:  # odd keys miss
            s.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(key), key))
            read_until(s, b"\r\n")
    yield together, one_by_one
    for proxy in (together, one_by_one):
        proxy.stop()
    for server in servers.values():
        server.stop()


def proxy_stats(proxy) -> dict[bytes, bytes]:
    """``stats`` and ``stats proxy`` together."""
    reply = proxy.call(b"stats\r\n", b"END\r\n") + proxy.call(b"stats proxy\r\n", b"END\r\n")
    return dict(re.findall(rb"STAT (\S+) (\S+)\r\n", reply))


@pytest.mark.parametrize("line", [
    b"get " + b" ".join(KEYS) + b"\r\n",
    b"gets " + b" ".join(KEYS) + b"\r\n",
    b"get k2 k2 k3 k2 k1 k0 k0\r\n",
    b"get k4 \r\n",
    b"get k0 " + b"x" * 251 + b" k2 k3\r\n",
    b"get  k0 k2\r\n",
    b"gat 0 k0 k1 k2\r\n",
])
def test_multiget_routed_together_answers_as_key_by_key(proxies, line):
    together, one_by_one = proxies
    replies = []
    for proxy in proxies:
        with proxy.connect() as s:
            # pipelined between two single gets, so its reply must keep its place
            s.sendall(b"get k0\r\n" + line + b"get k2\r\nmn\r\n")
            replies.append(read_until(s, b"MN\r\n"))
    assert replies[0] == replies[1]
    reply = replies[0]
    assert reply.startswith(b"VALUE k0 0 2\r\nk0\r\nEND\r\n")
    assert reply.endswith(b"VALUE k2 0 2\r\nk2\r\nEND\r\nMN\r\n")
    assert reply.count(b"END\r\n") == 3
    if b"x" * 251 in line:
        assert errors.KEY_TOO_LONG in reply


def test_every_key_counts_and_a_down_backend_fails_only_its_keys(proxies):
    together, one_by_one = proxies
    before = [proxy_stats(p) for p in proxies]
    line = b"get " + b" ".join(KEYS) + b"\r\n"
    replies = [p.call(line, b"END\r\n") for p in proxies]
    assert replies[0] == replies[1]
    failed = replies[0].count(errors.BACKEND_FAILURE)
    hits = replies[0].count(b"VALUE ")
    assert 0 < failed < len(KEYS) and 0 < hits < len(KEYS) // 2
    after = [proxy_stats(p) for p in proxies]
    for old, new in zip(before, after, strict=True):
        assert int(new[b"cmd_get"]) - int(old[b"cmd_get"]) == len(KEYS)
        assert int(new[b"proxy_conn_requests"]) - int(old[b"proxy_conn_requests"]) == len(KEYS)
        assert new[b"proxy_req_active"] == b"0"


def test_pipelined_plain_requests_answer_as_routed_one_by_one(proxies):
    """Runs of plain gets and sets (RouteEngine.route_run), cut per backend,
    down backend and all, answer and count as requests routed one by one."""
    keys = [b"p%d" % i for i in range(40)]
    stream = b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(key), key) for key in keys[::2])
    stream += b"".join(b"get %s\r\n" % key for key in keys)
    stream += b"get p0 p1 p2\r\n" + b"".join(b"get %s\r\n" % key for key in keys[::-3])
    count = len(keys) // 2 + len(keys) + 3 + len(keys[::-3])
    replies, grown = pipelined(proxies, stream)
    assert replies[0] == replies[1]
    assert 0 < replies[0].count(errors.BACKEND_FAILURE) < count
    assert replies[0].count(b"STORED\r\n") + replies[0].count(b"VALUE p") > count // 3
    for counts in grown:
        assert counts[b"proxy_conn_requests"] == count
        assert counts[b"cmd_set"] == len(keys) // 2


def pipelined(proxies, stream: bytes) -> tuple[list[bytes], list[dict[bytes, int]]]:
    """Each proxy's replies to ``stream`` sent on one connection (then
    ``mn``), and how much its request counters grew; none may be left
    active."""
    before = [proxy_stats(p) for p in proxies]
    replies = []
    for proxy in proxies:
        with proxy.connect() as s:
            s.sendall(stream + b"mn\r\n")
            replies.append(read_until(s, b"MN\r\n"))
    grown = []
    for proxy, old in zip(proxies, before, strict=True):
        new = proxy_stats(proxy)
        assert new[b"proxy_req_active"] == b"0"
        grown.append({name: int(new[name]) - int(old[name])
                      for name in (b"proxy_conn_requests", b"cmd_get", b"cmd_set")})
    return replies, grown


ONE_BACKEND = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", "%(port)d") })
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, %(route)s)
end
"""


@pytest.fixture(scope="module", params=["up", "down"])
def one_backend(request):
    """Proxies whose pool is one memcached (up, or nothing listening):
    their runs of plain requests hold multigets too."""
    server = Memcached()
    if request.param == "up":
        server.start()
    pair = [Proxy(None, config_text=ONE_BACKEND % {"port": server.port, "route": route}).start()
            for route in (TOGETHER, KEY_BY_KEY)]
    yield request.param, pair
    for proxy in pair:
        proxy.stop()
    if request.param == "up":
        server.stop()


def test_pipelined_multigets_to_one_backend_answer_as_routed_one_by_one(one_backend):
    """Multigets in runs (passed on as memcached answers them), among gets
    and sets, with values large enough to arrive in many chunks, answer and
    count as keys routed one by one."""
    state, proxies = one_backend
    big = b"v" * 300_000
    keys = [b"q%d" % i for i in range(30)] + [b"x" * 250]
    stream = b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(key), key) for key in keys[::2])
    stream += b"set big 3 0 %d\r\n%s\r\n" % (len(big), big)
    stream += b"get " + b" ".join(keys) + b"\r\nget q0\r\n"
    stream += b"get q1 big q2 big q0 q0\r\nget q1 q3\r\nget q2 q4\r\n"
    stream += b"get q5 q6 q7\r\n" * 50 + b"get " + b" ".join(keys[::-1]) + b"\r\n"
    gets = len(keys) + 1 + 6 + 2 + 2 + 150 + len(keys)
    sets = len(keys[::2]) + 1
    replies, grown = pipelined(proxies, stream)
    assert replies[0] == replies[1]
    if state == "up":
        assert replies[0].count(b"VALUE big 3 %d\r\n" % len(big)) == 2
    else:
        assert replies[0].count(errors.BACKEND_FAILURE) == gets + sets
    assert grown == [{b"proxy_conn_requests": gets + sets, b"cmd_get": gets, b"cmd_set": sets}] * 2
