"""The route engine: config loading, copy rules, and running routes."""

from __future__ import annotations

from functools import partial

import pytest

from mcproxy.routing.engine import ConfigError
from mcproxy.units import KeyBatch
from mcproxy.wire import errors
from mcproxy.wire import request as rq
from mcproxy.wire.reader import ResponseReader
from tests.enginekit import FakeBackends, run, start

POOLS = """
function mcp_config_pools()
    local p = mcp.pool({ mcp.backend("b1", "127.0.0.1", "11211"),
                         mcp.backend("b2", "127.0.0.1", "11212") })
    return { main = p, n = 3, flag = true, list = { "x", "y" } }
end
"""


def test_attach_any_storage(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return "HIT\\r\\n" end)
    end
    """)
    assert all(engine.hooked(cmd) for cmd in range(1, 21))
    assert not engine.hooked(rq.CMD_VERSION)
    assert run(engine, b"get foo\r\n") == b"HIT\r\n"


def test_attach_any_includes_version_and_stats(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY, function(r) return "X\\r\\n" end)
    end
    """)
    assert engine.hooked(rq.CMD_VERSION) and engine.hooked(rq.CMD_STATS)


def test_route_results(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r)
            local k = r:key()
            if k == "nil" then return nil end
            if k == "num" then return 5 end
            if k == "tbl" then return {} end
            if k == "err" then error("boom") end
            if k == "cmd" then return tostring(r:command()) .. "\\r\\n" end
            return p.main(r)
        end)
    end
    """)
    FakeBackends(engine, {"b1": b"VALUE k 0 1\r\nx\r\nEND\r\n",
                          "b2": b"VALUE k 0 1\r\nx\r\nEND\r\n"})
    assert run(engine, b"get nil\r\n") == errors.BAD_RESPONSE
    assert run(engine, b"get num\r\n") == errors.BAD_RESPONSE
    assert run(engine, b"get tbl\r\n") == errors.BAD_RESPONSE
    assert run(engine, b"get err\r\n") == errors.LUA_FAILURE
    assert run(engine, b"get cmd\r\n") == b"7\r\n"
    assert run(engine, b"get k\r\n") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    assert engine.stats.req_active == 0
    assert engine.stats.commands[rq.CMD_GET] == 6


def test_each_route_runs_in_a_coroutine_of_its_own(engine, load):
    """Routes in flight at once each keep their own state; one that raised
    or yielded on its own disturbs none of them nor later requests; an
    error reads as in a coroutine of its own (a level-2 error adds no
    position)."""
    routes = load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r)
            local k = r:key()
            if k == "err" then error("boom") end
            if k == "lvl" then error("level two", 2) end
            if k == "yield" then coroutine.yield() end
            local res = p.main(r)
            if k == "after" then error("late") end
            if res:hit() then return "hit " .. k .. "\\r\\n" end
            return "miss " .. k .. "\\r\\n"
        end)
    end
    """)
    fake = FakeBackends(engine, hold=True)
    held = [start(engine, b"get k%d\r\n" % i) for i in range(3)]
    assert start(engine, b"get err\r\n") == [errors.LUA_FAILURE]
    assert start(engine, b"get yield\r\n") == [errors.LUA_FAILURE]
    late = start(engine, b"get after\r\n")
    hit = FakeBackends.parse(b"VALUE k 0 1\r\nx\r\nEND\r\n")
    miss = FakeBackends.parse(b"END\r\n")
    for (_, callback), res in zip(fake.pending, [hit, miss, hit, miss], strict=True):
        callback(res)
    assert held == [[b"hit k0\r\n"], [b"miss k1\r\n"], [b"hit k2\r\n"]]
    assert late == [errors.LUA_FAILURE]
    req = rq.parse_request(b"get lvl\r\n")
    assert routes.start(routes.hooks[rq.CMD_GET], req, req.key, req.command) \
        == (3, b"level two")
    fake.hold = False
    assert [run(engine, b"get k%d\r\n" % i) for i in range(3)] \
        == [b"miss k%d\r\n" % i for i in range(3)]
    assert engine.stats.req_active == 0


def test_failover_between_pools_in_one_route(engine, load):
    load("""
    function mcp_config_pools()
        return { near = mcp.pool({ mcp.backend("near", "127.0.0.1", "1") }),
                 far = mcp.pool({ mcp.backend("far", "127.0.0.1", "2") }) }
    end
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r)
            local res = p.near(r)
            if res:hit() then return res end
            return p.far(r)
        end)
    end
    """)
    fake = FakeBackends(engine, {"near": b"END\r\n", "far": b"VALUE k 0 1\r\nf\r\nEND\r\n"})
    assert run(engine, b"get k\r\n") == b"VALUE k 0 1\r\nf\r\nEND\r\n"
    assert fake.sent == [("near", b"get k\r\n"), ("far", b"get k\r\n")]


def test_same_key_same_backend_as_memcached(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return p.main(r) end)
    end
    """)
    fake = FakeBackends(engine, {})
    # section 7.5: jump hash over xxh3, 2 buckets
    for key in (b"a", b"foo", b"/foo/a1", b"hello world"):
        run(engine, b"get " + key + b"\r\n")
    from mcproxy.backends.hashing import jump_hash, xxh3_key_hash
    expected = [f"b{jump_hash(xxh3_key_hash(k, 0), 2) + 1}"
                for k in (b"a", b"foo", b"/foo/a1", b"hello world")]
    assert [label for label, _ in fake.sent] == expected


def test_config_values_are_copied(engine, load):
    load(POOLS + """
    function mcp_config_routes(c)
        mcp.attach(mcp.CMD_GET, function(r)
            return string.format("%d %s %s %s\\r\\n", c.n, tostring(c.flag), c.list[1], c.list[2])
        end)
    end
    """)
    assert run(engine, b"get k\r\n") == b"3 true x y\r\n"


def test_phases_have_separate_globals(engine, load):
    load("""
    secret = nil
    function mcp_config_pools()
        secret = "set in config"
        return {}
    end
    function mcp_config_routes(c)
        mcp.attach(mcp.CMD_GET, function(r) return tostring(secret) .. "\\r\\n" end)
    end
    """)
    assert run(engine, b"get k\r\n") == b"nil\r\n"


@pytest.mark.parametrize("text, message", [
    ("function mcp_config_routes() end", "missing 'mcp_config_pools' function"),
    ("function mcp_config_pools() return {} end", "missing 'mcp_config_routes' function"),
    ("function mcp_config_pools()\n  return {\nend", "route.lua:3:"),
    ("local x = nil\nx.y = 1", "route.lua:2: attempt to index a nil value"),
    ("function mcp_config_pools()\n  error('nope')\nend\nfunction mcp_config_routes() end",
     "route.lua:2: nope"),
    ("function mcp_config_pools() return {} end\n"
     "function mcp_config_routes()\n  error('bad routes')\nend", "route.lua:3: bad routes"),
    ("function mcp_config_pools() mcp.attach(mcp.CMD_GET, print) end",
     "mcp.attach can only be called from mcp_config_routes or a route"),
    ("function mcp_config_pools() return {} end\n"
     "function mcp_config_routes() mcp.backend('a', 'h', 1) end",
     "mcp.backend can only be called from mcp_config_pools"),
    ("function mcp_config_pools() return { f = print } end\nfunction mcp_config_routes() end",
     "unhandled data type in configuration table"),
    ("function mcp_config_pools() return { b = mcp.backend('a', '127.0.0.1', 1) } end\n"
     "function mcp_config_routes() end", "unhandled userdata type in configuration table"),
    ("function mcp_config_pools() return { [true] = 1 } end\nfunction mcp_config_routes() end",
     "configuration table keys must be strings or numbers"),
    ("function mcp_config_pools() local t = {} for i = 1, 100 do t = { t } end return t end\n"
     "function mcp_config_routes() end", "table recursion too deep"),
    ("function mcp_config_pools() return {} end\n"
     "function mcp_config_routes() mcp.attach(mcp.CMD_GET, 'x') end",
     "Must pass a function to mcp.attach"),
    ("function mcp_config_pools() return {} end\n"
     "function mcp_config_routes() mcp.attach(99, print) end",
     "mcp.attach: unknown command id 99"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend('a', '127.0.0.1', 1) }, { filter = 'nope' }) end\n"
     "function mcp_config_routes() end", "unknown hash filter specified: nope"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend('a', '127.0.0.1', 1) }, { dist = {} }) end\n"
     "function mcp_config_routes() end", "key distribution object missing 'new' function"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend('a', '127.0.0.1', 1) },\n"
     "    { dist = mcp.dist_ring_hash, omode = 'x' }) end\n"
     "function mcp_config_routes() end", "ring_hash: bad omode argument"),
    ("function mcp_config_pools() return mcp.pool({ 1 }) end\n"
     "function mcp_config_routes() end", "mcp.pool: element 1 is not an mcp.backend"),
    ("function mcp_config_pools() mcp.backend_failure_limit(-1) end\n"
     "function mcp_config_routes() end", "backend_failure_limit must be >= 0"),
    ("function mcp_config_pools() mcp.tcp_keepalive(1) end\n"
     "function mcp_config_routes() end", "tcp_keepalive must be a boolean"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend{ label = 'a', host = 'h', readtimeout = 0 } }) end\n"
     "function mcp_config_routes() end", "'readtimeout' must be > 0"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend{ label = 'a', host = 'h', failurelimit = -1 } }) end\n"
     "function mcp_config_routes() end", "'failurelimit' must be >= 0"),
    ("function mcp_config_pools()\n"
     "  return mcp.pool({ mcp.backend{ label = 'a', host = 'h', depthlimit = 'x' } }) end\n"
     "function mcp_config_routes() end", "'depthlimit' must be a number"),
    ("function mcp_config_pools() mcp.add_stat(0, 'x') end\nfunction mcp_config_routes() end",
     "stat index must be 1 or higher"),
    ("function mcp_config_pools() mcp.add_stat(1, 'a b') end\n"
     "function mcp_config_routes() end", "stat cannot contain spaces or newlines"),
])
def test_config_errors(load, text, message):
    with pytest.raises(ConfigError) as e:
        load(text)
    assert message in str(e.value)


def test_missing_file(engine, tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        engine.load(str(tmp_path / "nope.lua"))


def test_failed_load_keeps_the_active_routes(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return "OLD\\r\\n" end)
    end
    """)
    with pytest.raises(ConfigError):
        load("function mcp_config_pools() error('x') end")
    assert run(engine, b"get k\r\n") == b"OLD\r\n"


def test_backends_with_the_same_label_are_one_object(engine, load):
    routes = load("""
    function mcp_config_pools()
        local a = mcp.backend("same", "127.0.0.1", "11211")
        local b = mcp.backend("same", "127.0.0.1", 11211)
        local c = mcp.backend{ label = "other", host = "127.0.0.1", port = 11212,
                               readtimeout = 0.5, failurelimit = 7 }
        return { p = mcp.pool({ a, b, c }) }
    end
    function mcp_config_routes() end
    """)
    assert routes.backends[0] is routes.backends[1]
    other = routes.backends[2]
    assert (other.options.read_timeout, other.options.failure_limit) == (0.5, 7)
    assert len(engine.registry.live) == 2


def test_pool_called_with_keyless_request(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY, function(r) return p.main(r) end)
    end
    """)
    FakeBackends(engine, {})
    assert run(engine, b"get k\r\n") == b"END\r\n"


def test_user_stats(engine, load):
    load("""
    function mcp_config_pools()
        mcp.add_stat(1, "hits")
        mcp.add_stat(3, "other")
        return {}
    end
    function mcp_config_routes()
        mcp.attach(mcp.CMD_GET, function(r)
            mcp.stat(1, 2)
            return "OK\\r\\n"
        end)
    end
    """)
    run(engine, b"get a\r\n")
    run(engine, b"get b\r\n")
    assert engine.user_stats.lines() == [("user_hits", 4), ("user_other", 0)]


@pytest.mark.parametrize("route, direct", [
    # declared by the route library
    ("routes.direct(pool)", True),
    ("routes.as_route(pool)", True),
    ("routes.direct(routes.as_route(pool))", True),
    ("routes.introspect(pool)", True),
    ("routes.failover{ pool }", True),
    ("routes.failover({ routes.direct(pool) }, { miss = true, count = 1 })", True),
    ("routes.failover{ pool, pool }", False),
    ("routes.failover({ pool }, { shuffle = true })", False),
    ("routes.ttl_cap(pool, 60)", False),
    ("routes.direct(function(r) local res = pool(r) return res end)", False),
    ("routes.define(function(r) return pools.main(r) end, 'direct')", False),
    # written by hand: recognised from debug.getinfo and the source text
    ("function(r) return pool(r) end", True),
    ("function(req) return pool(req) end", True),
    ("function( r )\n        return pool( r ) ;\n    end", True),
    ("direct_route", True),
    ("function(r) local res = pool(r) return res end", False),
    ("function(r) return pools.main(r) end", False),
    ("function(r, extra) return pool(r) end", False),
    ("function(...) return pool(...) end", False),
    ("function(r) mcp.stat(1, 1) return pool(r) end", False),
    ("function(r) return pool(r) --[[ function ]] end", False),
    ("function(r) return other(r) end", False),
    ("load('local pool = ...; return function(r) return pool(r) end')(pool)", True),
    ("load('local pool = ...; return function(r) return pool(r) end', '=x')(pool)", False),
])
def test_routes_that_only_call_a_pool_skip_lua(engine, load, route, direct):
    routes = load(f"""
    local routes = require("mcproxy.routes")
    function mcp_config_pools()
        mcp.add_stat(1, "x")
        return {{ main = mcp.pool({{ mcp.backend("b1", "127.0.0.1", "1") }}) }}
    end
    function mcp_config_routes(pools)
        local pool = pools.main
        local function direct_route(r) return pool(r) end
        local other = function(r) return pool(r) end
        mcp.attach(mcp.CMD_GET, {route})
        mcp.attach(mcp.CMD_VERSION, {route})
    end
    """)
    assert (rq.CMD_GET in routes.direct.pools) is direct
    assert (rq.CMD_VERSION in routes.direct.pools) is direct
    fake = FakeBackends(engine, {"b1": b"VALUE k 0 1\r\nx\r\nEND\r\n"})
    assert run(engine, b"get k\r\n") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    assert fake.sent == [("b1", b"get k\r\n")]
    seen = []
    engine._route_error = lambda req, msg: seen.append(msg)
    assert run(engine, b"version\r\n") == errors.LUA_FAILURE
    assert b"cannot route commands without key" in seen[0]
    assert engine.stats.req_active == 0


def test_command_maps_are_direct_for_the_commands_they_send_to_one_pool(engine, load):
    routes = load("""
    local routes = require("mcproxy.routes")
    function mcp_config_pools()
        return { a = mcp.pool({ mcp.backend("b1", "127.0.0.1", "1") }),
                 b = mcp.pool({ mcp.backend("b2", "127.0.0.1", "2") }) }
    end
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_ANY_STORAGE, routes.by_command{
            reads = p.a, set = routes.direct(p.b), delete = routes.failover{ p.a, p.b },
            add = { default = p.b }, ms = routes.introspect(p.b) })
    end
    """)
    pools = routes.direct.pools
    a, b = pools[rq.CMD_GET], pools[rq.CMD_SET]
    assert a is not b
    assert {cmd: pools.get(cmd) for cmd in (rq.CMD_GET, rq.CMD_GETS, rq.CMD_MG, rq.CMD_SET,
                                            rq.CMD_ADD, rq.CMD_MS, rq.CMD_DELETE,
                                            rq.CMD_INCR)} == {
        rq.CMD_GET: a, rq.CMD_GETS: a, rq.CMD_MG: a, rq.CMD_SET: b, rq.CMD_ADD: b,
        rq.CMD_MS: b, rq.CMD_DELETE: None, rq.CMD_INCR: None}
    assert routes.direct.lua_keys == {}  # introspection is for get only
    assert routes.direct.plain_runs is False  # gets and sets go to different pools
    assert run(engine, b"incr k 1\r\n") == b"SERVER_ERROR no route\r\n"


def test_introspection_keeps_its_own_gets_in_lua(engine, load):
    routes = load("""
    local routes = require("mcproxy.routes")
    mcp_config_pools, mcp_config_routes = routes.config{
        pools = { main = { backends = { "127.0.0.1:1" } } }, routes = "main" }
    """)
    assert routes.direct.lua_keys == {rq.CMD_GET: b"__mcproxy__.route("}
    assert routes.direct.plain_runs is True
    fake = FakeBackends(engine)
    assert run(engine, b"get __mcproxy__.route(set,k)\r\n") == (
        b"VALUE __mcproxy__.route(set,k) 0 18\r\nmain > 127.0.0.1:1\r\nEND\r\n")
    assert run(engine, b"gets __mcproxy__.route(set,k)\r\n") == b"END\r\n"
    assert run(engine, b"get x__mcproxy__.route(set,k)\r\n") == b"END\r\n"
    assert fake.sent == [("127.0.0.1:1", b"gets __mcproxy__.route(set,k)\r\n"),
                         ("127.0.0.1:1", b"get x__mcproxy__.route(set,k)\r\n")]
    keys = [b"a", b"__mcproxy__.route(get,a)"]
    assert not engine.route_keys(rq.parse_request(b"get a __mcproxy__.route(get,a)\r\n"),
                                 keys, [].append)
    stream = b"get a\r\nget __mcproxy__.route(get,a)\r\n"
    assert not engine.route_run(stream, 0, *scanned(stream), [].append)
    assert len(fake.sent) == 2


# Client multigets routed whole (RouteEngine.route_keys)

SHARDED = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", "1"),
                      mcp.backend("b2", "127.0.0.1", "2"),
                      mcp.backend("b3", "127.0.0.1", "3") })
end
function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
"""


ONE_BACKEND = (SHARDED.replace('mcp.backend("b2", "127.0.0.1", "2"),', "")
               .replace('mcp.backend("b3", "127.0.0.1", "3")', ""))


def declining(engine, config: str, setup: str) -> str:
    """``config`` changed, or ``engine`` set, so that requests must go
    through the engine one by one: routes run in Lua (the engine's direct
    path off; for multigets also its batching of Lua keys), an active
    request limit, or a depth limit on backend b1."""
    if setup == "lua route":
        engine.direct_routes = False
        return config
    if setup == "lua keys one by one":
        engine.direct_routes = engine.batch_keys = False
        return config
    if setup == "request limit":
        return config.replace("function mcp_config_pools()",
                              "function mcp_config_pools()\n    mcp.active_req_limit(100)")
    assert setup == "depth limit"
    return config.replace('mcp.backend("b1", "127.0.0.1", "1")',
                          'mcp.backend{ label = "b1", host = "127.0.0.1", port = "1", '
                          'depthlimit = 5 }')


class BatchRecorder:
    """Replaces every backend's send_unit; keeps the units sent (and their
    ``done``), answered by hand."""

    def __init__(self, engine):
        self.sent = []
        for backend in engine.registry.live:
            backend.send_unit = partial(self.record, backend)

    def record(self, backend, unit):
        self.sent.append((backend, unit, unit.done))


def value(key: bytes) -> bytes:
    """A hit as a backend sends it in the reply to a multi-key get."""
    data = key[:2]
    return b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(data), data)


def answer(unit, reply: bytes) -> None:
    """Give ``unit`` the backend's ``reply`` and deliver its result."""
    reader = ResponseReader()
    reader.feed(reply)
    assert unit.read(reader) and not reader.buffered
    unit.deliver(0)


def wire(unit) -> bytes:
    """The bytes ``unit`` writes to its backend."""
    out: list[bytes] = []
    unit.write(out, [], 0)
    return b"".join(out)


def test_multiget_keys_go_to_their_backends_in_one_batch_each(engine, load):
    routes = load(SHARDED)
    pool = routes.direct.pools[rq.CMD_GET]
    recorder = BatchRecorder(engine)
    keys = [b"k%d" % i for i in range(30)] + [b"k3"]
    out = []
    assert engine.route_keys(rq.parse_request(b"get " + b" ".join(keys) + b"\r\n"),
                             keys, out.append)
    assert {b for b, _, _ in recorder.sent} == set(pool.backends)
    for backend, req, _ in recorder.sent:
        assert isinstance(req, KeyBatch)
        assert req.keys == [k for k in keys if pool.select(k) is backend]
        assert wire(req) == b"get " + b" ".join(req.keys) + b"\r\n"
    assert engine.stats.conn_requests == len(keys)
    assert engine.stats.commands[rq.CMD_GET] == len(keys)
    assert engine.stats.req_active == len(keys)
    # Backends answer in any order: odd keys hit; one backend fails, one
    # answers with an error line.
    failed, error, good = recorder.sent
    answer(good[1], b"".join(value(k) for k in good[1].keys if int(k[1:]) % 2) + b"END\r\n")
    failed[1].fail("timeout", 0)
    assert out == []
    answer(error[1], b"SERVER_ERROR out of memory\r\n")
    expected = []
    for k in keys:
        backend = pool.select(k)
        if backend is failed[0]:
            expected.append(errors.BACKEND_FAILURE)
        elif backend is error[0]:
            expected.append(b"SERVER_ERROR out of memory\r\n")
        elif int(k[1:]) % 2:
            expected.append(value(k))
    assert out == [b"".join(expected) + errors.END]
    assert engine.stats.req_active == 0


def test_multiget_on_one_backend_is_one_batch(engine, load):
    load(ONE_BACKEND)
    recorder = BatchRecorder(engine)
    keys = [b"a", b"b", b"a", b"c"]
    out = []
    assert engine.route_keys(rq.parse_request(b"gets a b a c\r\n"), keys, out.append)
    [(_, req, _)] = recorder.sent
    assert wire(req) == b"gets a b a c\r\n" and req.keys == keys
    answer(req, value(b"a") * 2 + b"END\r\n")
    assert out == [value(b"a") * 2 + b"END\r\n"]
    assert engine.stats.commands[rq.CMD_GETS] == 4 and engine.stats.req_active == 0


@pytest.mark.parametrize("setup", ["lua keys one by one", "request limit", "depth limit",
                                   "no backend"])
def test_multiget_routed_key_by_key_when_batching_does_not_apply(engine, load, setup):
    if setup == "no backend":
        load("""
        function mcp_config_pools() return mcp.pool({}) end
        function mcp_config_routes(pool)
            mcp.attach(mcp.CMD_GET, function(r) return pool(r) end)
        end
        """)
    else:
        load(declining(engine, SHARDED, setup))
    recorder = BatchRecorder(engine)
    keys = [b"k%d" % i for i in range(30)]
    assert not engine.route_keys(rq.parse_request(b"get " + b" ".join(keys) + b"\r\n"),
                                 keys, [].append)
    assert recorder.sent == []
    assert engine.stats.conn_requests == 0 and engine.stats.req_active == 0


# Runs of pipelined plain requests (RouteEngine.route_run)


def scanned(stream: bytes, multigets: int = 0):
    """``stream`` as ProxyServerProtocol hands it to route_run: all of it
    one run of plain requests."""
    stop, keys, ends, sets, widths = rq.scan_plain(stream, 0, True, 1 << 20,
                                                   multigets=multigets)
    assert stop == len(stream)
    return keys, ends, sets, widths


def test_run_is_cut_into_stretches_per_backend(engine, load):
    routes = load(SHARDED)
    pool = routes.direct.pools[rq.CMD_GET]
    recorder = BatchRecorder(engine)
    keys = [b"k%d" % i for i in range(30)]
    lines = [b"set %s 0 0 2\r\nxx\r\n" % k if i % 4 == 0 else b"get %s\r\n" % k
             for i, k in enumerate(keys)]
    stream = b"".join(lines)
    out = []
    assert engine.route_run(stream, 0, *scanned(stream), out.append)
    # Each stretch of consecutive keys of one backend went there as it came.
    stretches = []
    for key, line in zip(keys, lines, strict=True):
        backend = pool.select(key)
        if stretches and stretches[-1][0] is backend:
            stretches[-1][1].append(line)
        else:
            stretches.append((backend, [line]))
    assert len(stretches) > 3
    assert [(b, r.data, r.count) for b, r, _ in recorder.sent] == \
        [(b, b"".join(ls), len(ls)) for b, ls in stretches]
    assert engine.stats.conn_requests == engine.stats.req_active == len(keys)
    assert engine.stats.commands[rq.CMD_SET] == len(keys[::4])
    assert engine.stats.commands[rq.CMD_GET] == len(keys) - len(keys[::4])
    # Answered last to first; the client gets the replies in order, a
    # failed stretch a failure per request.
    for index, (_, unit, callback) in reversed(list(enumerate(recorder.sent))):
        assert out == []
        if index == 1:
            unit.fail("timeout", 0)
        else:
            callback(b"<%d>" % index)
    expected = [b"<%d>" % i for i in range(len(stretches))]
    expected[1] = errors.BACKEND_FAILURE * len(stretches[1][1])
    assert out == [b"".join(expected)]
    assert engine.stats.req_active == 0


def test_run_for_one_backend_is_one_plain_run(engine, load):
    load(ONE_BACKEND)
    recorder = BatchRecorder(engine)
    stream = b"xx" + b"get a\r\nget b c d\r\nset e 0 0 1\r\nx\r\nget f\r\n" + b"yy"
    keys, ends, sets, widths = scanned(stream[2:-2], multigets=10)
    ends = [end + 2 for end in ends]
    out = []
    assert engine.route_run(stream, 2, keys, ends, sets, widths, out.append)
    [(_, run, callback)] = recorder.sent
    assert (run.data, run.count, run.widths, run.size) == \
        (stream[2:-2], 4, {1: 3}, 6)
    assert engine.stats.conn_requests == engine.stats.req_active == 6
    callback(b"END\r\nEND\r\nSTORED\r\nEND\r\n")
    assert out == [b"END\r\nEND\r\nSTORED\r\nEND\r\n"]
    assert engine.stats.req_active == 0


@pytest.mark.parametrize(("setup", "config"), [
    ("lua keys one by one", SHARDED), ("request limit", SHARDED), ("depth limit", SHARDED),
    ("depth limit", ONE_BACKEND), ("multiget", SHARDED),
], ids=["lua keys one by one", "request limit", "depth limit", "depth limit on a pool of one",
        "multiget"])
def test_run_routed_one_by_one_when_it_does_not_apply(engine, load, setup, config):
    stream = b"".join(b"get k%d\r\n" % i for i in range(30))
    if setup == "multiget":
        stream += b"get a b\r\n"  # its keys may need two of the three backends
        load(config)
    else:
        load(declining(engine, config, setup))
    recorder = BatchRecorder(engine)
    assert not engine.route_run(stream, 0, *scanned(stream, multigets=10), [].append)
    assert recorder.sent == []
    assert engine.stats.conn_requests == 0 and engine.stats.req_active == 0
