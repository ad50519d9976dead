"""The route library (``require("mcproxy.routes")``) and ``mcp.pool_backend``,
on a network-free engine: what each route sends where, in what order, and
what the client gets, with backends answered (or failed) by the test."""

from __future__ import annotations

import time

import pytest
from lupa.lua54 import LuaError

from mcproxy.backends.pool import Pool
from mcproxy.routing.engine import ConfigError
from mcproxy.routing.shapes import Shape
from mcproxy.wire import errors
from mcproxy.wire.request import COMMANDS, parse_request
from mcproxy.wire.response import Response
from tests.enginekit import FakeBackends, run, start

#: Four single-backend pools a..d (backends labelled like their pool), and
#: a pool "ring" of three backends r1..r3.
POOLS = """
local routes = require("mcproxy.routes")
function mcp_config_pools()
    local p = {}
    for i, name in ipairs({ "a", "b", "c", "d" }) do
        p[name] = mcp.pool({ mcp.backend(name, "127.0.0.1", tostring(i)) })
    end
    p.ring = mcp.pool({ mcp.backend("r1", "127.0.0.1", "11"),
                        mcp.backend("r2", "127.0.0.1", "12"),
                        mcp.backend("r3", "127.0.0.1", "13") })
    return p
end
"""

HIT = b"VALUE k 0 1\r\nx\r\nEND\r\n"
MISS = b"END\r\n"


def config(route: str) -> str:
    """A config whose every storage command takes ``route`` (Lua, over the
    pools ``p`` and the library ``routes``), with introspection."""
    return POOLS + f"""
function mcp_config_routes(p)
    routes.bind(p)
    mcp.attach(mcp.CMD_ANY_STORAGE, routes.introspect({route}))
end
"""


class Fakes(FakeBackends):
    """FakeBackends whose ``down`` labels fail every request at once."""

    def __init__(self, engine, replies=None, hold=False, down=()):
        self.down = set(down)
        super().__init__(engine, replies, hold)

    def sender(self, label):
        send = super().sender(label)

        def maybe_fail(req, callback):
            if label in self.down:
                self.sent.append((label, req.wire()))
                callback(Response.failure("markedbad"))
            else:
                send(req, callback)
        return maybe_fail

    def fail(self, label: str) -> None:
        """Fail the oldest pending request of ``label`` (a timeout)."""
        for i, (pending_label, callback) in enumerate(self.pending):
            if pending_label == label:
                del self.pending[i]
                callback(Response.failure("timeout"))
                return
        raise AssertionError(f"nothing pending for {label}")

    def labels(self) -> list[str]:
        return [label for label, _ in self.sent]


def lua_errors(engine) -> list[str]:
    seen: list[str] = []
    engine._route_error = lambda req, msg: seen.append(msg.decode())
    return seen


# -- mcp.pool_backend ----------------------------------------------------------

def test_pool_backend_names_the_backend_a_key_goes_to(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r)
            local label = mcp.pool_backend(p.ring, r:key())
            local res = p.ring(r)
            return label .. "\\r\\n"
        end)
    end
    """)
    fake = Fakes(engine)
    for key in (b"a", b"foo", b"key:1", b"{x}", b"zz" * 50):
        label = run(engine, b"get " + key + b"\r\n")
        assert label == fake.sent[-1][0].encode() + b"\r\n"
    assert len(set(fake.labels())) == 3


@pytest.mark.parametrize("call, message", [
    ("mcp.pool_backend('a', 'k')", "mcp.pool_backend: first argument must be a pool"),
    ("mcp.pool_backend(p.a, 5)", "mcp.pool_backend: key must be a string"),
    ("mcp.pool_backend(p.a)", "mcp.pool_backend: key must be a string"),
])
def test_pool_backend_misuse(engine, load, call, message):
    load(POOLS + f"""
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, function(r) return {call} end)
    end
    """)
    seen = lua_errors(engine)
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE
    assert message in seen[0]


def test_pool_backend_is_routes_phase_only(load):
    with pytest.raises(ConfigError, match="mcp.pool_backend can only be called from "
                                          "mcp_config_routes or a route"):
        load("""
        function mcp_config_pools()
            local p = mcp.pool({ mcp.backend("a", "127.0.0.1", "1") })
            return mcp.pool_backend(p, "k")
        end
        function mcp_config_routes(p) end
        """)


# -- the module itself ---------------------------------------------------------

def test_require_leaks_no_globals(engine, load):
    load("""
    local before = {}
    for k in pairs(_G) do before[k] = true end
    local routes = require("mcproxy.routes")
    local leaked = {}
    for k in pairs(_G) do
        if not before[k] then leaked[#leaked + 1] = tostring(k) end
    end
    local api = {}
    for k in pairs(routes) do api[#api + 1] = k end
    table.sort(api)
    function mcp_config_pools() return {} end
    function mcp_config_routes()
        mcp.attach(mcp.CMD_GET, function(r)
            return "leaked=" .. table.concat(leaked, ",") .. " api="
                .. table.concat(api, ",") .. "\\r\\n"
        end)
    end
    """)
    assert run(engine, b"get k\r\n") == (
        b"leaked= api=all_async,all_fastest,all_sync,as_route,bind,broadcast,by_command,config,"
        b"define,describe,direct,failover,introspect,named,null,prefix_router,split,"
        b"ttl_cap,warmup,zfailover\r\n")


# -- direct and failover --------------------------------------------------------

def test_direct_and_as_route(engine, load):
    load(config("routes.failover{ routes.direct(p.a), routes.as_route(p.b) }"))
    fake = Fakes(engine, {"a": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.labels() == ["a"]


def test_failover_moves_on_after_an_error_not_after_a_miss(engine, load):
    load(config("routes.failover{ p.a, p.b, p.c }"))
    fake = Fakes(engine, {"c": HIT}, down={"a"})
    assert run(engine, b"get k\r\n") == MISS  # b's miss is an answer
    assert fake.labels() == ["a", "b"]


def test_failover_on_miss(engine, load):
    load(config("routes.failover({ p.a, p.b, p.c }, { miss = true })"))
    fake = Fakes(engine, {"c": HIT}, down={"a"})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.labels() == ["a", "b", "c"]


def test_failover_answers_the_best_answer_seen(engine, load):
    load(config("routes.failover({ p.a, p.b, p.c }, { miss = true })"))
    fake = Fakes(engine, down={"a", "c"})
    assert run(engine, b"get k\r\n") == MISS  # b's miss beats a's and c's failure
    fake.down.add("b")
    assert run(engine, b"get k\r\n") == errors.BACKEND_FAILURE


def test_failover_count_limits_the_tries(engine, load):
    load(config("routes.failover({ p.a, p.b, p.c }, { count = 2 })"))
    fake = Fakes(engine, {"c": b"STORED\r\n"}, down={"a", "b"})
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == errors.BACKEND_FAILURE
    assert fake.labels() == ["a", "b"]


def test_failover_shuffle_spreads_the_first_try(engine, load):
    load(config("routes.failover({ p.a, p.b, p.c }, { shuffle = true })"))
    fake = Fakes(engine, {"a": HIT, "b": HIT, "c": HIT})
    for _ in range(60):
        assert run(engine, b"get k\r\n") == HIT
    assert set(fake.labels()) == {"a", "b", "c"}
    assert len(fake.sent) == 60


def test_failover_waits_for_a_slow_child_before_moving_on(engine, load):
    load(config("routes.failover{ p.a, p.b }"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    assert fake.labels() == ["a"]
    fake.fail("a")  # the read timeout
    assert fake.labels() == ["a", "b"] and out == []
    fake.answer("b", HIT)
    assert out == [HIT]


# -- all_sync, all_fastest, all_async -----------------------------------------

def test_all_sync_waits_for_every_pool(engine, load):
    load(config("routes.all_sync{ p.a, p.b, p.c }"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"set k 0 0 1\r\n", b"x\r\n")
    assert sorted(fake.labels()) == ["a", "b", "c"]
    fake.answer("b", b"STORED\r\n")
    fake.answer("a", b"NOT_STORED\r\n")
    assert out == []
    fake.fail("c")
    assert out == [b"STORED\r\n"]  # the first good answer, in arrival order


def test_all_sync_prefers_a_hit_and_survives_failures(engine, load):
    load(config("routes.all_sync{ p.a, p.b, p.c }"))
    Fakes(engine, {"c": HIT}, down={"a"})
    assert run(engine, b"get k\r\n") == HIT


def test_all_sync_strict_answers_a_failure(engine, load):
    load(config("routes.all_sync({ p.a, p.b }, { strict = true })"))
    Fakes(engine, {"b": b"STORED\r\n"}, down={"a"})
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == errors.BACKEND_FAILURE


@pytest.mark.parametrize("route", ["routes.all_sync{ p.a, p.b, p.c }",
                                   "routes.all_fastest{ p.a, p.b, p.c }"])
@pytest.mark.parametrize("line", [b"gets k\r\n", b"gats 10 k\r\n", b"mg k v c\r\n"])
def test_replicated_reads_of_a_cas_unique_go_to_the_primary(engine, load, route, line):
    """Each replica has its own cas uniques: a gets answered by one of
    several would be checked by a cas on all of them."""
    load(config(route))
    fake = Fakes(engine, {"a": HIT, "b": HIT, "c": HIT})
    run(engine, line)
    assert fake.labels() == ["a"]


@pytest.mark.parametrize("route, wait", [("routes.all_sync{ p.a, p.b, p.c }", True),
                                         ("routes.all_fastest{ p.a, p.b, p.c }", False),
                                         ("routes.all_async{ p.a, p.b, p.c }", False)])
def test_replicated_cas_is_decided_by_the_primary_and_copied(engine, load, route, wait):
    load(config(route))
    fake = Fakes(engine, {"a": b"STORED\r\n", "b": b"STORED\r\n", "c": b"STORED\r\n"})
    assert run(engine, b"cas k 5 100 2 77\r\n", b"hi\r\n") == b"STORED\r\n"
    assert fake.sent[0] == ("a", b"cas k 5 100 2 77\r\nhi\r\n")
    assert sorted(fake.sent[1:]) == [("b", b"set k 5 100 2\r\nhi\r\n"),
                                     ("c", b"set k 5 100 2\r\nhi\r\n")]


def test_replicated_cas_that_fails_at_the_primary_changes_nothing_else(engine, load):
    load(config("routes.all_sync{ p.a, p.b }"))
    fake = Fakes(engine, {"a": b"EXISTS\r\n"})
    assert run(engine, b"cas k 0 0 1 9\r\n", b"x\r\n") == b"EXISTS\r\n"
    assert fake.labels() == ["a"]


def test_replicated_meta_compare_drops_its_cas_in_the_copies(engine, load):
    load(config("routes.all_sync{ p.a, p.b }"))
    fake = Fakes(engine, {"a": b"HD\r\n", "b": b"HD\r\n"})
    assert run(engine, b"ms k 2 C77 T10\r\n", b"hi\r\n") == b"HD\r\n"
    assert fake.sent == [("a", b"ms k 2 C77 T10\r\nhi\r\n"), ("b", b"ms k 2 T10\r\nhi\r\n")]
    fake.sent.clear()
    assert run(engine, b"md k C77\r\n") == b"HD\r\n"
    assert fake.sent == [("a", b"md k C77\r\n"), ("b", b"md k\r\n")]


def test_replicated_cas_strict_answers_a_failed_copy(engine, load):
    load(config("routes.all_sync({ p.a, p.b }, { strict = true })"))
    Fakes(engine, {"a": b"STORED\r\n"}, down={"b"})
    assert run(engine, b"cas k 0 0 1 9\r\n", b"x\r\n") == errors.BACKEND_FAILURE


def test_all_fastest_answers_the_first_ok(engine, load):
    load(config("routes.all_fastest{ p.a, p.b, p.c }"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.fail("a")
    assert out == []
    fake.answer("c", MISS)
    assert out == [MISS]
    fake.answer("b", HIT)  # too late
    assert out == [MISS] and engine.stats.req_active == 0


def test_all_fastest_miss_waits_for_a_hit(engine, load):
    load(config("routes.all_fastest({ p.a, p.b, p.c }, { miss = true })"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    assert out == []
    fake.answer("c", HIT)
    assert out == [HIT]
    fake.answer("b", HIT)  # late: dropped
    out = start(engine, b"get k\r\n")
    for label in ("a", "b", "c"):
        fake.answer(label, MISS)
    assert out == [MISS]


def test_all_async_answers_from_the_first_only(engine, load):
    load(config("routes.all_async{ routes.failover{ p.a, p.d }, p.b, p.c }"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"set k 0 0 1\r\n", b"x\r\n")
    assert sorted(fake.labels()) == ["a", "b", "c"]
    fake.answer("a", b"STORED\r\n")
    assert out == [b"STORED\r\n"]
    fake.fail("b")  # ignored
    fake.answer("c", b"NOT_STORED\r\n")
    assert out == [b"STORED\r\n"]


# -- split -----------------------------------------------------------------------

def test_split_shadows_and_ignores_the_shadow(engine, load):
    load(config("routes.split(p.a, p.b)"))
    fake = Fakes(engine, {"a": b"STORED\r\n"}, down={"b"})
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert sorted(fake.sent) == [("a", b"set k 0 0 1\r\nx\r\n"), ("b", b"set k 0 0 1\r\nx\r\n")]


def test_split_does_not_wait_for_a_slow_shadow(engine, load):
    load(config("routes.split(p.a, { p.b, p.c })"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", HIT)
    assert out == [HIT]
    assert sorted(fake.labels()) == ["a", "b", "c"]


def test_split_fraction_shadows_the_same_keys_every_time(engine, load):
    load(config("routes.split(p.a, p.b, { fraction = 0.3 })"))
    fake = Fakes(engine)
    keys = [b"key%d" % i for i in range(300)]
    shadowed = []
    for _ in range(2):
        for key in keys:
            fake.sent.clear()
            run(engine, b"get " + key + b"\r\n")
            if "b" in fake.labels():
                shadowed.append(key)
    first, second = shadowed[: len(shadowed) // 2], shadowed[len(shadowed) // 2:]
    assert first == second
    assert 60 < len(first) < 120


def test_split_fraction_zero_never_shadows(engine, load):
    load(config("routes.split(p.a, p.b, { fraction = 0 })"))
    fake = Fakes(engine)
    for i in range(50):
        run(engine, b"get k%d\r\n" % i)
    assert set(fake.labels()) == {"a"}


# -- zfailover ---------------------------------------------------------------------

ZONES = "routes.zfailover({ z1 = p.a, z2 = p.b, z3 = p.c }, 'z1')"


def test_zfailover_local_hit_stays_local(engine, load):
    load(config(ZONES))
    fake = Fakes(engine, {"a": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.labels() == ["a"]


def test_zfailover_fans_out_to_the_other_zones_at_once(engine, load):
    load(config(ZONES))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    assert sorted(fake.labels()[1:]) == ["b", "c"]  # both sent before any answer
    fake.answer("c", HIT)
    assert out == [HIT]


@pytest.mark.parametrize("down, replies, expected", [
    ({"a"}, {}, MISS),                    # local down, others miss: a miss
    ({"b", "c"}, {}, MISS),               # local miss, others down: the local miss
    ({"a", "b", "c"}, {}, errors.BACKEND_FAILURE),
    ({"a"}, {"b": HIT}, HIT),
])
def test_zfailover_answers(engine, load, down, replies, expected):
    load(config(ZONES))
    Fakes(engine, replies, down=down)
    assert run(engine, b"get k\r\n") == expected


def test_zfailover_without_miss_fails_over_on_errors_only(engine, load):
    load(config("routes.zfailover({ z1 = p.a, z2 = p.b }, 'z1', { miss = false })"))
    fake = Fakes(engine, {"b": HIT})
    assert run(engine, b"get k\r\n") == MISS
    assert fake.labels() == ["a"]
    fake.down.add("a")
    assert run(engine, b"get k\r\n") == HIT


def test_zfailover_unknown_local_zone(load):
    with pytest.raises(ConfigError, match="routes.zfailover: no zone named 'z9'"):
        load(config("routes.zfailover({ z1 = p.a }, 'z9')"))


# -- warmup -----------------------------------------------------------------------

WARM_HIT = b"VA 5 f7 t100\r\nhello\r\n"


def test_warmup_fills_cold_from_warm(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"get k\r\n")
    fake.answer("a", MISS)
    fake.answer("b", WARM_HIT)
    fake.answer("a", b"STORED\r\n")
    fake.answer("a", b"VALUE k 7 5\r\nhello\r\nEND\r\n")
    assert out == [b"VALUE k 7 5\r\nhello\r\nEND\r\n"]
    assert fake.sent == [
        ("a", b"get k\r\n"),
        ("b", b"mg k f t v\r\n"),
        ("a", b"add k 7 100 5\r\nhello\r\n"),
        ("a", b"get k\r\n"),
    ]


def test_warmup_gets_answers_with_colds_cas(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"gets k\r\n")
    fake.answer("a", MISS)
    fake.answer("b", b"VA 2 f0 t-1\r\nhi\r\n")
    fake.answer("a", b"STORED\r\n")
    fake.answer("a", b"VALUE k 0 2 99\r\nhi\r\nEND\r\n")
    assert out == [b"VALUE k 0 2 99\r\nhi\r\nEND\r\n"]
    assert fake.sent[2] == ("a", b"add k 0 0 2\r\nhi\r\n")  # t-1: never expires
    assert fake.sent[3] == ("a", b"gets k\r\n")


def test_warmup_mg_rereads_with_the_clients_flags(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, hold=True)
    out = start(engine, b"mg k v c O5 k\r\n")
    fake.answer("a", b"EN O5 kk\r\n")
    fake.answer("b", WARM_HIT)
    fake.answer("a", b"STORED\r\n")
    fake.answer("a", b"VA 5 c3 O5 kk\r\nhello\r\n")
    assert out == [b"VA 5 c3 O5 kk\r\nhello\r\n"]
    assert fake.sent[3] == ("a", b"mg k v c O5 k\r\n")


def test_warmup_fixed_ttl_and_long_ttls(engine, load):
    load(config("routes.warmup(p.a, p.b, { ttl = 60 })"))
    fake = Fakes(engine, {"b": WARM_HIT, "a": MISS})
    run(engine, b"get k\r\n")
    assert fake.sent[2] == ("a", b"add k 7 60 5\r\nhello\r\n")


def test_warmup_carries_a_ttl_over_30_days_as_absolute_time(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"b": b"VA 5 f7 t5000000\r\nhello\r\n", "a": MISS})
    before = int(time.time())
    run(engine, b"get k\r\n")
    exptime = int(fake.sent[2][1].split()[3])
    assert before + 5000000 <= exptime <= int(time.time()) + 5000000


def test_warmup_warm_miss_answers_colds_miss(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"b": b"EN\r\n"})
    assert run(engine, b"get k\r\n") == MISS
    assert fake.labels() == ["a", "b"]


def test_warmup_cold_down_reads_warm(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"b": HIT}, down={"a"})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.sent == [("a", b"get k\r\n"), ("b", b"get k\r\n")]


def test_warmup_cold_hit_never_reaches_warm(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"a": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.labels() == ["a"]


def test_warmup_writes_go_to_cold_deletes_to_both(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"a": b"STORED\r\n", "b": b"DELETED\r\n"})
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert fake.labels() == ["a"]
    fake.sent.clear()
    assert run(engine, b"delete k\r\n") == b"STORED\r\n"  # cold's answer
    assert sorted(fake.labels()) == ["a", "b"]


def test_warmup_delete_warm_false(engine, load):
    load(config("routes.warmup(p.a, p.b, { delete_warm = false })"))
    fake = Fakes(engine, {"a": b"DELETED\r\n"})
    run(engine, b"delete k\r\n")
    assert fake.labels() == ["a"]


def test_warmup_mg_with_base64_key_reads_cold_only(engine, load):
    load(config("routes.warmup(p.a, p.b)"))
    fake = Fakes(engine, {"a": b"EN\r\n"})
    assert run(engine, b"mg aw== b v\r\n") == b"EN\r\n"
    assert fake.labels() == ["a"]


# -- prefix_router and by_command -----------------------------------------------

def test_prefix_router_with_stop(engine, load):
    load(config("""routes.prefix_router{
        stop = "/",
        map = { foo = p.a, bar = "b", [""] = p.c },
        default = p.d,
    }"""))
    fake = Fakes(engine)
    for key in (b"foo/1", b"bar/x/y", b"/z", b"foo", b"baz/1", b"foobar/1"):
        run(engine, b"get " + key + b"\r\n")
    assert fake.labels() == ["a", "b", "c", "d", "d", "d"]


def test_prefix_router_longest_prefix_and_no_route(engine, load):
    load(config("routes.prefix_router{ map = { f = p.a, foo = p.b, foobar = p.c } }"))
    fake = Fakes(engine)
    for key in (b"fx", b"foo", b"foob", b"foobarbaz"):
        run(engine, b"get " + key + b"\r\n")
    assert fake.labels() == ["a", "b", "b", "c"]
    assert run(engine, b"get x\r\n") == b"SERVER_ERROR no route\r\n"


def test_prefix_router_command_maps(engine, load):
    load(config("""routes.prefix_router{
        stop = ":",
        map = { t = { reads = p.a, writes = p.b, delete = p.c } },
    }"""))
    fake = Fakes(engine)
    run(engine, b"get t:1\r\n")
    run(engine, b"mg t:1 v\r\n")
    run(engine, b"set t:1 0 0 1\r\n", b"x\r\n")
    run(engine, b"ms t:1 1\r\n", b"x\r\n")
    run(engine, b"delete t:1\r\n")
    assert fake.labels() == ["a", "a", "b", "b", "c"]


def test_by_command_precedence(engine, load):
    load(config("routes.by_command{ [mcp.CMD_GETS] = p.b, get = p.c, reads = p.a, default = p.d }"))
    fake = Fakes(engine)
    for line in (b"get k\r\n", b"gets k\r\n", b"gat 1 k\r\n", b"incr k 1\r\n"):
        run(engine, line)
    assert fake.labels() == ["c", "b", "a", "d"]


def test_by_command_without_default(engine, load):
    load(config("routes.by_command{ writes = p.a }"))
    Fakes(engine)
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR no route\r\n"


def test_by_command_unknown_key(load):
    with pytest.raises(ConfigError, match="routes.by_command: unknown command 'fetch'"):
        load(config("routes.by_command{ fetch = p.a }"))


# -- ttl_cap -------------------------------------------------------------------------

def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize("line, value, sent", [
    (b"set k 0 0 1\r\n", b"x\r\n", b"set k 0 100 1\r\nx\r\n"),
    (b"set k 0 50 1\r\n", b"x\r\n", b"set k 0 50 1\r\nx\r\n"),
    (b"add k 3 500 1\r\n", b"x\r\n", b"add k 3 100 1\r\nx\r\n"),
    (b"replace k 0 101 1 noreply\r\n", b"x\r\n", b"replace k 0 100 1\r\nx\r\n"),
    (b"cas k 0 0 1 7\r\n", b"x\r\n", b"cas k 0 100 1 7\r\nx\r\n"),
    (b"set k 0 -1 1\r\n", b"x\r\n", b"set k 0 -1 1\r\nx\r\n"),
    (b"append k 0 0 1\r\n", b"x\r\n", b"append k 0 0 1\r\nx\r\n"),
    (b"touch k 0\r\n", None, b"touch k 100\r\n"),
    (b"gat 0 k\r\n", None, b"gat 100 k\r\n"),
    (b"gats 99 k\r\n", None, b"gats 99 k\r\n"),
    (b"incr k 1\r\n", None, b"incr k 1\r\n"),
    (b"ms k 1 T0\r\n", b"x\r\n", b"ms k 1 T100\r\nx\r\n"),
    (b"ms k 1 F5\r\n", b"x\r\n", b"ms k 1 F5 T100\r\nx\r\n"),
    (b"ms k 1\r\n", b"x\r\n", b"ms k 1 T100\r\nx\r\n"),
    (b"ms k 1 T30 F1\r\n", b"x\r\n", b"ms k 1 T30 F1\r\nx\r\n"),
    (b"mg k v T500\r\n", None, b"mg k v T100\r\n"),
    (b"mg k v\r\n", None, b"mg k v\r\n"),
    (b"mg k v N0 t\r\n", None, b"mg k v N100 t\r\n"),
    (b"ma k N1000 T5\r\n", None, b"ma k N100 T5\r\n"),
])
def test_ttl_cap(engine, load, line, value, sent):
    load(config("routes.ttl_cap(p.a, 100)"))
    fake = Fakes(engine, {"a": b"STORED\r\n"})
    start(engine, line, value)
    assert fake.sent == [("a", sent)]


def test_ttl_cap_absolute_times(engine, load):
    load(config("routes.ttl_cap(p.a, 100)"))
    fake = Fakes(engine, {"a": b"STORED\r\n"})
    far, near, past = _now() + 10000, _now() + 50, 1000000000
    for exptime in (far, near, past):
        run(engine, b"set k 0 %d 1\r\n" % exptime, b"x\r\n")
    assert [wire.split()[3] for _, wire in fake.sent] == [
        b"100", str(near).encode(), str(past).encode()]


@pytest.mark.parametrize("seconds", ["0", "-5", "2592001", "1.5", "'10'"])
def test_ttl_cap_bad_seconds(load, seconds):
    with pytest.raises(ConfigError, match="routes.ttl_cap: seconds must be an integer"):
        load(config(f"routes.ttl_cap(p.a, {seconds})"))


# -- null --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, value, reply", [
    (b"get k\r\n", None, b"END\r\n"),
    (b"gets k\r\n", None, b"END\r\n"),
    (b"gat 10 k\r\n", None, b"END\r\n"),
    (b"set k 0 0 1\r\n", b"x\r\n", b"STORED\r\n"),
    (b"cas k 0 0 1 5\r\n", b"x\r\n", b"STORED\r\n"),
    (b"set k 0 0 1 noreply\r\n", b"x\r\n", b""),
    (b"delete k\r\n", None, b"NOT_FOUND\r\n"),
    (b"delete k noreply\r\n", None, b""),
    (b"incr k 1\r\n", None, b"NOT_FOUND\r\n"),
    (b"touch k 1\r\n", None, b"NOT_FOUND\r\n"),
    (b"mg k v\r\n", None, b"EN\r\n"),
    (b"mg k v O123 k\r\n", None, b"EN O123 kk\r\n"),
    (b"mg aw== b k v\r\n", None, b"EN kaw== b\r\n"),
    (b"mg k v q O1\r\n", None, b""),
    (b"ms k 1 T0 q\r\n", b"x\r\n", b""),
    (b"ms k 1 O9\r\n", b"x\r\n", b"HD O9\r\n"),
    (b"md k q\r\n", None, b"NF\r\n"),
    (b"ma k\r\n", None, b"NF\r\n"),
    (b"me k\r\n", None, b"EN\r\n"),
])
def test_null(engine, load, line, value, reply):
    load(config("routes.null()"))
    fake = Fakes(engine)
    assert start(engine, line, value) == [reply]
    assert fake.sent == []


def test_null_inside_a_multiget_adds_no_end(engine, load):
    load(config("routes.null()"))
    req = parse_request(b"get k\r\n")
    req.multiget = True
    out: list[bytes] = []
    engine.route(req, out.append)
    assert out == [b""]


def test_null_as_the_last_failover(engine, load):
    load(config("routes.failover{ p.a, routes.null() }"))
    Fakes(engine, down={"a"})
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == b"STORED\r\n"
    assert run(engine, b"get k\r\n") == b"END\r\n"


# -- introspection and describe ------------------------------------------------------

def introspect(engine, command: str, key: str) -> list[str]:
    name = f"__mcproxy__.route({command},{key})".encode()
    reply = run(engine, b"get " + name + b"\r\n")
    header, _, rest = reply.partition(b"\r\n")
    assert header.startswith(b"VALUE " + name + b" 0 "), reply
    length = int(header.split()[-1])
    assert rest[length:] == b"\r\nEND\r\n"
    return rest[:length].decode().split("\r\n")


def test_introspection_lists_the_path_and_backends(engine, load):
    load(config("""routes.prefix_router{
        stop = "/",
        map = {
            w = routes.warmup(p.ring, p.a),
            g = routes.failover({ p.ring, routes.ttl_cap(p.b, 10) }, { miss = true }),
            z = routes.zfailover({ z1 = p.a, z2 = p.b, z3 = p.c }, "z2"),
            t = { reads = routes.all_fastest{ p.a, p.b }, writes = routes.all_sync{ p.c } },
            s = routes.split(p.a, p.b),
            x = routes.all_async{ p.a, p.b },
            n = routes.null(),
            h = function(r) return p.a(r) end,
            d = routes.define(function(r) return p.a(r) end, "mine", { p.a, p.b }),
        },
    }"""))
    fake = Fakes(engine)
    backend = fake_backend_for(engine, b"g/k1")
    assert introspect(engine, "get", "g/k1") == [
        f"prefix_router[g] > failover[1] > ring > {backend}",
        "prefix_router[g] > failover[2] > ttl_cap[10] > b > b",
    ]
    assert introspect(engine, "get", "w/k") == [
        f"prefix_router[w] > warmup[cold] > ring > {fake_backend_for(engine, b'w/k')}",
        "prefix_router[w] > warmup[warm] > a > a",
    ]
    assert introspect(engine, "set", "w/k") == [
        f"prefix_router[w] > warmup[cold] > ring > {fake_backend_for(engine, b'w/k')}",
    ]
    assert introspect(engine, "mg", "z/1") == [
        "prefix_router[z] > zfailover[local:z2] > b > b",
        "prefix_router[z] > zfailover[z1] > a > a",
        "prefix_router[z] > zfailover[z3] > c > c",
    ]
    assert introspect(engine, "ms", "t/1") == ["prefix_router[t] > by_command[writes] > "
                                               "all_sync[1] > c > c"]
    assert introspect(engine, "gets", "t/1") == [
        "prefix_router[t] > by_command[reads] > all_fastest[1] > a > a",
        "prefix_router[t] > by_command[reads] > all_fastest[2] > b > b",
    ]
    assert introspect(engine, "delete", "s/1") == ["prefix_router[s] > split[primary] > a > a",
                                                   "prefix_router[s] > split[shadow] > b > b"]
    assert introspect(engine, "incr", "x/1") == [
        "prefix_router[x] > all_async[1] > a > a",
        "prefix_router[x] > all_async[background] > b > b"]
    assert introspect(engine, "touch", "n/1") == ["prefix_router[n] > null"]
    assert introspect(engine, "add", "h/1") == ["prefix_router[h] > route"]
    assert introspect(engine, "cas", "d/1") == ["prefix_router[d] > mine[1] > a > a",
                                                "prefix_router[d] > mine[2] > b > b"]
    assert introspect(engine, "get", "q/(1,2)") == ["prefix_router[default] > no_route"]
    assert fake.sent == []


def fake_backend_for(engine, key: bytes) -> str:
    """The ring backend a key goes to, computed in Python."""
    ring = [b for b in engine.registry.live if b.label in ("r1", "r2", "r3")]
    return Pool(sorted(ring, key=lambda b: b.label), {}).select(key).label


@pytest.mark.parametrize("key", [
    b"__mcproxy__.route(fetch,k)", b"__mcproxy__.route(get,)", b"__mcproxy__.route(get,k",
])
def test_bad_introspection_requests(engine, load, key):
    load(config("p.a"))
    fake = Fakes(engine)
    assert run(engine, b"get " + key + b"\r\n") == (
        b"CLIENT_ERROR bad route introspection request\r\n")
    assert fake.sent == []


def test_introspection_is_only_for_get(engine, load):
    load(config("p.a"))
    fake = Fakes(engine)
    run(engine, b"mg __mcproxy__.route(get,k) v\r\n")
    assert fake.labels() == ["a"]


def test_describe_from_a_route(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        local route = routes.failover{ p.a, p.b }
        mcp.attach(mcp.CMD_GET, function(r)
            return table.concat(routes.describe(route, r), ";") .. "\\r\\n"
        end)
    end
    """)
    assert run(engine, b"get k\r\n") == b"failover[1] > pool > a;failover[2] > pool > b\r\n"


# -- pool names and the declarative form -----------------------------------------------

DECLARATIVE = """
local routes = require("mcproxy.routes")
mcp_config_pools, mcp_config_routes = routes.config{
    tunables = { backend_read_timeout = 0.25 },
    pools = {
        main = { backends = { "127.0.0.1:1", { label = "m2", host = "127.0.0.1", port = 2 } },
                 backend_options = { failurelimit = 7 } },
        zones = { z1 = { backends = { "127.0.0.1:3" } }, z2 = { backends = { "127.0.0.1:4" } } },
    },
    %s
}
"""


def test_config_builds_pools_and_routes_from_names(engine, load):
    load(DECLARATIVE % """routes = routes.prefix_router{
        stop = "/",
        map = { z = routes.zfailover("zones", "z2"), one = "zones.z1" },
        default = routes.failover{ "main", "zones.z2" },
    }""")
    labels = sorted(b.label for b in engine.registry.live)
    assert labels == ["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:4", "m2"]
    assert {b.options.failure_limit for b in engine.registry.live if b.port in ("1", "2")} == {7}
    assert {b.options.read_timeout for b in engine.registry.live} == {0.25}
    fake = Fakes(engine, {"127.0.0.1:3": HIT})
    assert run(engine, b"get z/k\r\n") == HIT
    assert fake.labels() == ["127.0.0.1:4", "127.0.0.1:3"]
    assert introspect(engine, "get", "one/k") == ["prefix_router[one] > zones.z1 > 127.0.0.1:3"]
    assert introspect(engine, "set", "k")[1] == "prefix_router[default] > failover[2] > " \
                                                "zones.z2 > 127.0.0.1:4"


def test_config_routes_as_a_function_of_the_pools(engine, load):
    load(DECLARATIVE % """routes = function(p)
        return { get = routes.all_sync(p.zones), default = p.main }
    end""")
    fake = Fakes(engine)
    run(engine, b"get k\r\n")
    assert sorted(fake.labels()) == ["127.0.0.1:3", "127.0.0.1:4"]


def test_config_pool_name_as_the_whole_route_and_no_introspection(engine, load):
    load(DECLARATIVE % """routes = "zones.z1", introspect = false""")
    fake = Fakes(engine)
    run(engine, b"get __mcproxy__.route(get,k)\r\n")
    assert fake.labels() == ["127.0.0.1:3"]


@pytest.mark.parametrize("routes_field, message", [
    ('routes = routes.failover{ "main", "nope" }', "routes.failover: no pool named 'nope'"),
    ('routes = routes.all_sync{ routes.null() }', "routes.all_sync: needs pools here"),
    ('routes = routes.all_sync("nope")', "routes.all_sync: no pool named 'nope'"),
    ('routes = "zones"', "routes.config: expected a route, a pool or a pool name, got table"),
    ('routes = 5', "routes.config: expected a route, a pool or a pool name, got number"),
    ('routes = "main", tunables = { attach = 1 }', "routes.config: unknown tunable 'attach'"),
    ('routes = routes.zfailover("zones", "z7")', "routes.zfailover: no zone named 'z7'"),
])
def test_config_errors_fail_the_load(load, routes_field, message):
    with pytest.raises(ConfigError) as e:
        load(DECLARATIVE % routes_field)
    assert message in str(e.value)


def test_route_where_a_pool_is_needed_points_at_the_line(load):
    with pytest.raises(ConfigError, match=r"route\.lua:\d+: routes\.split: needs pools here"):
        load(POOLS + """
function mcp_config_routes(p)
    routes.bind(p)
    local shadow = routes.direct(p.b)
    local r = routes.split(p.a, shadow)
end
""")


def test_names_without_bind_fail_clearly(engine, load):
    load(POOLS + """
    local early = routes.failover{ "a", "b" }
    local parallel = routes.all_sync{ "a", "b" }
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_GET, early)
        mcp.attach(mcp.CMD_SET, parallel)
    end
    """)
    Fakes(engine)
    seen = lua_errors(engine)
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE
    assert run(engine, b"set k 0 0 1\r\n", b"x\r\n") == errors.LUA_FAILURE
    assert "routes.failover: pool 'a' is not bound" in seen[0]
    assert "routes.all_sync: pool 'a' is not bound" in seen[1]


def test_named_pools_in_describe(engine, load):
    load(POOLS + """
    function mcp_config_routes(p)
        routes.named({ left = p.a, deep = { right = p.b } })
        local route = routes.all_sync{ p.a, p.b, p.c }
        mcp.attach(mcp.CMD_GET, routes.introspect(route))
    end
    """)
    assert introspect(engine, "get", "k") == [
        "all_sync[1] > left > a", "all_sync[2] > deep.right > b", "all_sync[3] > pool > c"]


@pytest.mark.parametrize("route, message", [
    ("routes.failover({ p.a }, { count = 0 })", "routes.failover: count must be a positive"),
    ("routes.failover({ x = p.a })", "routes.failover: expected a list of children"),
    ("routes.failover(p.a, 5)", "routes.failover: options must be a table"),
    ("routes.split(p.a, p.b, { fraction = 2 })", "routes.split: fraction must be a number"),
    ("routes.warmup(p.a, p.b, { ttl = -1 })", "routes.warmup: ttl must be an integer"),
    ("routes.all_async{}", "routes.all_async: expected a list of at least one child"),
    ("routes.prefix_router{ map = { [1] = p.a } }", "routes.prefix_router: map keys must be"),
    ("routes.prefix_router{ map = {}, stop = '' }", "routes.prefix_router: stop must be"),
    ("routes.direct(42)", "routes.direct: expected a route, a pool or a pool name, got number"),
    ("routes.zfailover({ z1 = p.a }, 1)", "routes.zfailover: local_zone must be a zone name"),
])
def test_constructor_misuse(load, route, message):
    with pytest.raises(ConfigError) as e:
        load(config(route))
    assert message in str(e.value)
    assert "route.lua:" in str(e.value)  # at the config's line, not the library's


# -- shapes: what the library's routes declare to the engine ---------------------

#: One route of each constructor, by the command it is attached to.
DECLARING = {
    "get": ("routes.failover{ p.a, p.b }", "failover",
            {"children": {1: "a", 2: "b"}, "miss": False, "shuffle": False}),
    "set": ("routes.all_sync{ p.a, p.b }", "all_sync",
            {"children": {1: "a", 2: "b"}, "strict": False}),
    "add": ("routes.all_fastest({ p.a, p.b }, { miss = true })", "all_fastest",
            {"children": {1: "a", 2: "b"}, "miss": True}),
    "replace": ("routes.all_async{ p.a, p.b }", "all_async",
                {"children": {1: "a"}, "background": {1: "b"}}),
    "append": ("routes.split(p.a, p.b, { fraction = 0.5 })", "split",
               {"children": {1: "a"}, "shadows": {1: "b"}, "fraction": 0.5}),
    "prepend": ('routes.zfailover({ east = p.a, west = p.b }, "east")', "zfailover",
                {"children": {b"east": "a", b"west": "b"}, "local_zone": b"east",
                 "miss": True}),
    "cas": ("routes.warmup(p.a, p.b, { ttl = 5 })", "warmup",
            {"cold": {1: "a"}, "warm": {1: "b"}, "ttl": 5, "delete_warm": True}),
    "incr": ('routes.prefix_router{ map = { x = "a" }, stop = "/" }', "prefix_router",
             {"children": {b"x": "a"}, "default": {1: "no_route"}, "stop": b"/"}),
    "decr": ("routes.ttl_cap(p.a, 60)", "ttl_cap", {"children": {1: "a"}, "seconds": 60}),
    "touch": ("routes.null()", "null", {}),
    "delete": ('routes.broadcast{ "a", "b" }', "broadcast", {"children": {1: "a", 2: "b"}}),
    "mg": ("routes.by_command{ mg = p.a }", "by_command", None),
    "ms": ("routes.introspect(p.a)", "introspect",
           {"children": {1: "a"}, "command": 7, "prefix": b"__mcproxy__.route("}),
    "md": ("routes.as_route(p.a)", "direct", {"children": {1: "a"}}),
    "ma": ('routes.direct("b")', "direct", {"children": {1: "b"}}),
}


def plain(value, pools):
    """A Shape's field as the DECLARING table writes it: pools by name,
    routes by kind."""
    if isinstance(value, dict):
        return {k: plain(v, pools) for k, v in value.items()}
    if isinstance(value, Pool):
        return pools[value]
    if isinstance(value, Shape):
        return value.kind
    return value


def test_every_route_of_the_library_declares_its_shape(engine, load):
    attach = "\n".join(f"    mcp.attach(mcp.CMD_{command.upper()}, {route})"
                       for command, (route, _, _) in DECLARING.items())
    routes = load(POOLS + f"""
function mcp_config_routes(p)
    routes.bind(p)
{attach}
end
""")
    pools = {pool: name for name, pool in zip("abcd", routes.host.pools, strict=False)}
    for command, (_, kind, fields) in DECLARING.items():
        shape = routes.shapes[COMMANDS[command.encode()]]
        assert shape.kind == kind, command
        if fields is not None:
            assert plain(shape.fields, pools) == fields, command
    by_command = routes.shapes[COMMANDS[b"mg"]]
    assert plain(by_command.children, pools) == {COMMANDS[b"mg"]: "a"}
    assert by_command.fields["choice"] == {COMMANDS[b"mg"]: COMMANDS[b"mg"]}


def test_a_route_written_by_hand_declares_nothing(engine, load):
    """routes.define names a function for describe; the library did not
    build its body, so it declares no shape, whatever the name."""
    routes = load(POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, routes.define(function(r) return p.a(r) end, "direct", { p.a }))
    mcp.attach(mcp.CMD_SET, routes.direct(routes.define(function(r) return p.a(r) end, "x")))
end
""")
    assert routes.shapes[COMMANDS[b"get"]].kind == "lua"
    assert plain(routes.shapes[COMMANDS[b"set"]].children, {}) == {1: "lua"}
    assert routes.direct.pools.keys() == {COMMANDS[b"flush_all"]}


def test_a_route_declares_the_children_its_body_calls_once_bound(engine, load):
    """Built before its pool names are bound, a route declares the very
    table its body will call: bound, both reach the pool; never bound,
    both reach the stand-in that fails."""
    routes = load(POOLS + """
local bound = routes.direct("b")
function mcp_config_routes(p)
    routes.bind(p)
    mcp.attach(mcp.CMD_GET, bound)
end
""")
    assert routes.direct.pools[COMMANDS[b"get"]] is routes.host.pools[1]
    fake = Fakes(engine, {"b": HIT})
    assert run(engine, b"get k\r\n") == HIT and fake.labels() == ["b"]
    routes = load(POOLS + """
local never = routes.direct("b")
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, never)
end
""")
    assert COMMANDS[b"get"] not in routes.direct.pools
    seen = lua_errors(engine)
    assert run(engine, b"get k\r\n") == errors.LUA_FAILURE
    assert "pool 'b' is not bound" in seen[0]


def test_configs_cannot_reach_the_engines_declare(engine, load):
    """Only the library's chunk is handed declare: it is in no table a
    config sees (mcp, the globals, the loaded modules, the library's
    table), and the engine takes a route's declaration once."""
    routes = load(POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, routes.direct(p.a))
end
""")
    declare = routes.state.engine.declare
    find = routes.state.runtime.eval("""function(f)
        local seen, found = {}, {}
        local function walk(t, path, depth)
            if seen[t] or depth > 3 then return end
            seen[t] = true
            for k, v in pairs(t) do
                if v == f then found[#found + 1] = path .. "." .. tostring(k) end
                if type(v) == "table" then walk(v, path .. "." .. tostring(k), depth + 1) end
            end
        end
        walk(_G, "_G", 0)
        walk(mcp, "mcp", 0)
        walk(require("mcproxy.routes"), "routes", 0)
        return #found
    end""")
    assert find(declare) == 0
    route = routes.hooks[COMMANDS[b"get"]]
    with pytest.raises(LuaError, match="declared once"):
        declare(route, routes.state.runtime.table_from({b"kind": b"direct"}))
