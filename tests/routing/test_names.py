"""memcached 1.6.45's remaining proxy API names: tunables, backend options,
crons, rate limits, several config files, V2 sleeps and wait timeouts, and
the names mcproxy refuses (each refusal names what it refuses)."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from mcproxy.backends.options import BackendLog
from mcproxy.backends.pool import BackendRegistry
from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import ConfigError, RouteEngine
from mcproxy.routing.ratelimits import TokenBucket
from mcproxy.routing.tunables import Tunables, waittime
from mcproxy.routing.userstats import UserStats
from tests.enginekit import FakeBackends, run, start

ONE_POOL = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", 11211) })
end
"""


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def engine(clock):
    stats = ProxyStats()
    registry = BackendRegistry(stats, reactor=MemoryReactorClock())
    return RouteEngine(stats, registry, Tunables(), UserStats(), store=Store(), clock=clock)


@pytest.fixture
def load(engine, tmp_path):
    def load(text: str, name: str = "route.lua"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return engine.load(str(path))
    return load


@pytest.fixture
def events():
    caught: list[dict] = []
    globalLogPublisher.addObserver(caught.append)
    yield caught
    globalLogPublisher.removeObserver(caught.append)


def user_logs(events) -> list[str]:
    return [e["msg"] for e in events if e.get("type") == "proxy_user"]


# -- tunables ------------------------------------------------------------------


@pytest.mark.parametrize("seconds, whole", [(0.2, 1), (1.4, 1), (1.5, 2), (3, 3), (2.7, 3)])
def test_retry_waittime_is_whole_seconds(seconds, whole):
    assert waittime(seconds) == whole


def test_retry_waittime_tunable_and_backend_option(engine, load):
    routes = load("""
    mcp.backend_retry_waittime(1.6)
    function mcp_config_pools()
        return { a = mcp.pool({ mcp.backend("a", "127.0.0.1", 1) }),
                 b = mcp.pool({ mcp.backend{ label = "b", host = "127.0.0.1", port = 2,
                                             retrywaittime = 0.3 } }) }
    end
    function mcp_config_routes(p) end
    """)
    assert [o.retry_timeout for o in routes.host.options] == [2.0, 1.0]
    assert engine.tunables.defaults.retry_timeout == 2.0


def test_use_iothread_is_recorded_and_shown(engine, load):
    load("""
    mcp.backend_use_iothread(true)
    function mcp_config_pools() return {} end
    function mcp_config_routes(p) end
    """)
    assert engine.tunables.use_iothread is True
    assert ("backend_use_iothread", True) in engine.tunables.settings()


def test_use_iothread_takes_a_boolean(load):
    with pytest.raises(ConfigError, match="backend_use_iothread must be a boolean"):
        load("""
        mcp.backend_use_iothread(1)
        function mcp_config_pools() return {} end
        function mcp_config_routes(p) end
        """)


def test_stat_limit_bounds_add_stat(load):
    with pytest.raises(ConfigError, match=r"stat index must be 4 or less \(mcp.stat_limit\)"):
        load("""
        function mcp_config_pools()
            mcp.stat_limit(4)
            mcp.add_stat(5, "five")
            return {}
        end
        function mcp_config_routes(p) end
        """)


def test_stat_limit_above_what_mcproxy_keeps_is_refused(load):
    with pytest.raises(ConfigError, match="stat_limit: mcproxy keeps at most 1024"):
        load("""
        mcp.stat_limit(2000)
        function mcp_config_pools() return {} end
        function mcp_config_routes(p) end
        """)


@pytest.mark.parametrize("call", [
    "mcp.backend_flap_time(3)", "mcp.backend_flap_backoff_ramp(1.5)",
    "mcp.backend_flap_backoff_max(60)", "mcp.luagc_ratio(2)",
    "mcp.buffer_memory_limit(100)", "mcp.server_stats()",
])
def test_refused_config_names_say_what_they_refuse(load, call):
    name = call.split("(")[0]
    with pytest.raises(ConfigError, match=f"{name} is not supported by mcproxy"):
        load(f"""
        function mcp_config_pools() {call} return {{}} end
        function mcp_config_routes(p) end
        """)


@pytest.mark.parametrize("name", ["req_inspector_new", "res_inspector_new",
                                  "req_mutator_new", "res_mutator_new"])
def test_refused_route_names_fail_the_load(load, name):
    with pytest.raises(ConfigError, match=f"mcp.{name} is not supported by mcproxy"):
        load(ONE_POOL + f"""
        function mcp_config_routes(p) mcp.{name}() end
        """)


# -- backend options -------------------------------------------------------------


def backend_with(load, options: str):
    routes = load(f"""
    function mcp_config_pools()
        return mcp.pool({{ mcp.backend{{ label = "b", host = "127.0.0.1", port = 1, {options} }} }})
    end
    function mcp_config_routes(p) end
    """)
    return routes.host.options[0]


@pytest.mark.parametrize("log, expected", [
    ("{}", BackendLog(0, 1, False, "")),
    ("{ errors = true }", BackendLog(0, 0, True, "")),
    ("{ deadline = 250, tag = 'slow' }", BackendLog(250_000, 0, False, "slow")),
    ("{ rate = 100, errors = true }", BackendLog(0, 100, True, "")),
])
def test_backend_log_option(load, log, expected):
    assert backend_with(load, f"log = {log}").log == expected


@pytest.mark.parametrize("options, message", [
    ("log = 1", "backend log option must be a table"),
    ("log = { deadline = -1 }", "backend log deadline must be >= 0"),
    ("log = { rate = -1 }", "backend log sample rate must be >= 0"),
    ("log = { errors = 1 }", "backend log errors must be a boolean"),
    ("log = { level = 1 }", "unknown backend log option 'level'"),
    ("connections = 2", "'connections' above 1 is not supported"),
    ("connections = 9", "'connections' must be 1 to 8"),
    ("flaptime = 3", "option 'flaptime' is not supported: mcproxy has no flap detection"),
    ("flapbackofframp = 2", "option 'flapbackofframp' is not supported"),
    ("flapbackoffmax = 60", "option 'flapbackoffmax' is not supported"),
])
def test_backend_options_refused_by_name(load, options, message):
    with pytest.raises(ConfigError, match=message):
        backend_with(load, options)


def test_one_connection_is_what_mcproxy_has(load):
    assert backend_with(load, "connections = 1").log is None


V2_LOGGED = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend{ label = "b1", host = "127.0.0.1", port = 11211,
                                   log = { errors = true, tag = "be1" } } })
end
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    local h = fgen:new_handle(p)
    fgen:ready({ f = function(rctx)
        return function(r)
            local res = rctx:enqueue_and_wait(r, h)
            return res
        end
    end })
    mcp.attach(mcp.CMD_GET, fgen)
end
"""


def test_backend_log_logs_failed_requests_of_v2_handles(engine, load, events):
    load(V2_LOGGED)
    FakeBackends(engine, {"b1": b"END\r\n"})
    assert run(engine, b"get hit\r\n") == b"END\r\n"
    assert not [e for e in events if e.get("type") == "proxy_req"]
    backends = FakeBackends(engine, hold=True)
    out = start(engine, b"get lost\r\n")
    [(_, callback)] = backends.pending
    from mcproxy.wire.response import Response
    callback(Response.failure("timeout"))
    assert out == [b"SERVER_ERROR backend failure\r\n"]
    [event] = [e for e in events if e.get("type") == "proxy_req"]
    assert (event["key"], event["detail"], event["backend"]) == (b"lost", "be1",
                                                                 "127.0.0.1:11211")


def test_a_direct_funcgen_to_a_logging_backend_stays_in_lua(engine, load, events):
    from mcproxy.wire.request import CMD_GET
    routes = load(V2_LOGGED.replace("""            local res = rctx:enqueue_and_wait(r, h)
            return res""", "            return rctx:enqueue_and_wait(r, h)"))
    assert routes.shapes[CMD_GET].kind == "lua"
    backends = FakeBackends(engine, hold=True)
    out = start(engine, b"get gone\r\n")
    from mcproxy.wire.response import Response
    backends.pending[0][1](Response.failure("timeout"))
    assert out == [b"SERVER_ERROR backend failure\r\n"]
    assert [e["detail"] for e in events if e.get("type") == "proxy_req"] == ["be1"]
    assert load(V2_LOGGED.replace("log = { errors = true, tag = \"be1\" }", "")
                .replace("""            local res = rctx:enqueue_and_wait(r, h)
            return res""", "            return rctx:enqueue_and_wait(r, h)")
                ).shapes[CMD_GET].kind == "direct"


# -- crons ---------------------------------------------------------------------------

CRONS = ONE_POOL.replace("function mcp_config_pools()", """function mcp_config_pools()
    mcp.register_cron("every2", { every = 2, func = function() mcp.log("every2") end })
    mcp.register_cron("once", { every = 1, rerun = false,
                                func = function() mcp.log("once") end })
    mcp.register_cron("broken", { every = 3, func = function() error("boom") end })""") + """
function mcp_config_routes(p) end
"""


def test_crons_run_every_so_often_and_once(clock, load, events):
    load(CRONS)
    assert user_logs(events) == []
    clock.advance(1)
    assert user_logs(events) == ["once"]
    for _ in range(5):
        clock.advance(1)
    assert user_logs(events) == ["once", "every2", "every2", "every2"]


def test_a_failing_cron_is_logged_and_keeps_running(clock, load, events):
    load(CRONS)
    for _ in range(6):
        clock.advance(1)
    errors = [e for e in events if e.get("type") == "proxy_error"]
    assert len(errors) == 2
    assert errors[0]["name"] == "broken" and "boom" in errors[0]["msg"]


def test_a_reload_replaces_the_crons_and_keeps_a_schedule(clock, load, events):
    load(CRONS)
    clock.advance(1.5)
    load(ONE_POOL.replace("function mcp_config_pools()", """function mcp_config_pools()
        mcp.register_cron("every2", { every = 2, func = function() mcp.log("new2") end })
        mcp.register_cron("fresh", { every = 2, func = function() mcp.log("fresh") end })""")
         + "function mcp_config_routes(p) end")
    clock.advance(0.5)  # t=2: every2 keeps its schedule, with the new function
    assert user_logs(events) == ["once", "new2"]
    clock.advance(1.5)  # t=3.5: "fresh" runs 2s after the reload; "broken" is gone
    assert user_logs(events) == ["once", "new2", "fresh"]
    assert not [e for e in events if e.get("type") == "proxy_error"]


def test_a_changed_every_restarts_the_schedule(clock, load, events):
    load(CRONS)
    clock.advance(1.5)
    load(ONE_POOL.replace("function mcp_config_pools()", """function mcp_config_pools()
        mcp.register_cron("every2", { every = 3, func = function() mcp.log("every3") end })""")
         + "function mcp_config_routes(p) end")
    clock.advance(2.9)
    assert user_logs(events) == ["once"]
    clock.advance(0.1)
    assert user_logs(events) == ["once", "every3"]


def test_a_stopped_engine_runs_no_crons(clock, engine, load, events):
    load(CRONS)
    engine.stop()
    clock.advance(10)
    assert user_logs(events) == []


def test_schedule_config_reload_asks_the_engine_owner(clock, engine, load):
    asked = []
    engine.schedule_reload = lambda: asked.append(True)
    load(ONE_POOL.replace("function mcp_config_pools()", """function mcp_config_pools()
        mcp.register_cron("r", { every = 1, func = function()
            mcp.schedule_config_reload() end })""") + "function mcp_config_routes(p) end")
    assert asked == []
    clock.advance(1)
    assert asked == [True]


@pytest.mark.parametrize("opts, message", [
    ("{ every = 1 }", "proxy cron entry missing 'func' field"),
    ("{ func = function() end }", "proxy cron entry missing 'every' field"),
    ("{ every = 0, func = function() end }", "proxy cron entry 'every' must be > 0"),
    ("{ every = 1, func = 3 }", "proxy cron entry 'func' must be a function"),
    ("{ every = 1, func = function() end, interval = 1 }",
     "mcp.register_cron: unknown option 'interval'"),
])
def test_register_cron_checks_its_entry(load, opts, message):
    with pytest.raises(ConfigError, match=message):
        load(ONE_POOL.replace("function mcp_config_pools()", f"""function mcp_config_pools()
            mcp.register_cron("c", {opts})""") + "function mcp_config_routes(p) end")


def test_register_cron_is_for_the_config_phase(load):
    with pytest.raises(ConfigError, match="mcp.register_cron can only be called from "
                                          "mcp_config_pools"):
        load(ONE_POOL + """function mcp_config_routes(p)
            mcp.register_cron("c", { every = 1, func = function() end })
        end""")


# -- rate limits --------------------------------------------------------------------


def test_token_bucket_counts_as_memcached():
    now = [1000]
    bucket = TokenBucket(50, 4, 500, lambda: now[0])
    assert [bucket.take(15) for _ in range(4)] == [True, True, True, False]
    now[0] += 500  # not more than one tick: nothing added
    assert not bucket.take(5)
    now[0] += 1  # one tick: 4 more, 9 in all
    assert bucket.take(8) and not bucket.take(1)
    now[0] += 500 * 100
    assert bucket.take(48) and bucket.bucket == 2 and bucket.take(1)
    assert bucket.take(0) and not bucket.take(1)


RATELIM = ONE_POOL + """
function mcp_config_routes(p)
    local tbf = mcp.ratelim_tbf({ limit = 50, fillrate = 4, tickrate = 500 })
    mcp.attach(mcp.CMD_MG, function(r)
        if tbf(15) then return "HD\\r\\n" end
        return "SERVER_ERROR slow down\\r\\n"
    end)
end
"""


def test_ratelim_tbf_in_a_route(clock, engine, load):
    load(RATELIM)
    replies = [run(engine, b"mg k\r\n") for _ in range(4)]
    assert replies == [b"HD\r\n"] * 3 + [b"SERVER_ERROR slow down\r\n"]
    clock.advance(0.5 * 4 + 0.001)  # 4 ticks: 16 tokens, 21 in all
    assert run(engine, b"mg k\r\n") == b"HD\r\n"
    assert run(engine, b"mg k\r\n") == b"SERVER_ERROR slow down\r\n"


GLOBAL_RATELIM = """
function mcp_config_pools()
    return { lim = mcp.ratelim_global_tbf({ limit = 3, fillrate = 1, tickrate = 1000 }) }
end
function mcp_config_routes(c)
    mcp.attach(mcp.CMD_MG, function(r)
        return c.lim(1) and "HD\\r\\n" or "SERVER_ERROR slow down\\r\\n"
    end)
    mcp.attach(mcp.CMD_MD, function(r)
        return c.lim(1) and "HD\\r\\n" or "SERVER_ERROR slow down\\r\\n"
    end)
end
"""


def test_ratelim_global_tbf_is_shared_by_every_route(clock, engine, load):
    load(GLOBAL_RATELIM)
    assert run(engine, b"mg a\r\n") == b"HD\r\n"
    assert run(engine, b"md b\r\n") == b"HD\r\n"
    assert run(engine, b"mg c\r\n") == b"SERVER_ERROR slow down\r\n"
    clock.advance(1.002)
    assert run(engine, b"md d\r\n") == b"HD\r\n"


@pytest.mark.parametrize("opts, message", [
    ("{ limit = -1, fillrate = 1, tickrate = 1 }", "arguments must be unsigned 32 bit integer"),
    ("{ limit = 1, fillrate = 1 }", "tickrate must be at least 1 millisecond"),
    ("{ limit = 1, fillrate = 1, tickrate = 1, burst = 2 }", "unknown option 'burst'"),
    ("3", "argument must be a table"),
])
def test_ratelim_arguments_are_checked(load, opts, message):
    with pytest.raises(ConfigError, match=f"mcp.ratelim_tbf: {message}"):
        load(ONE_POOL + f"function mcp_config_routes(p) mcp.ratelim_tbf({opts}) end")


def test_a_bad_take_is_a_route_error(engine, load):
    load(ONE_POOL + """function mcp_config_routes(p)
        local tbf = mcp.ratelim_tbf({ limit = 5, fillrate = 1, tickrate = 1 })
        mcp.attach(mcp.CMD_MG, function(r) return tbf("x") and "HD\\r\\n" end)
    end""")
    assert run(engine, b"mg k\r\n") == b"SERVER_ERROR lua failure\r\n"


# -- several config files ---------------------------------------------------------


def test_a_config_of_several_files(engine, tmp_path):
    first = tmp_path / "pools.lua"
    first.write_text(ONE_POOL)
    second = tmp_path / "routes.lua"
    second.write_text("function mcp_config_routes(p)\n"
                      "    mcp.attach(mcp.CMD_MG, function(r) return p(r) end)\nend\n")
    engine.load(f"{first}:{second}")
    FakeBackends(engine, {"b1": b"HD\r\n"})
    assert run(engine, b"mg k\r\n") == b"HD\r\n"


def test_an_error_in_the_second_file_names_it(engine, tmp_path):
    first = tmp_path / "pools.lua"
    first.write_text(ONE_POOL)
    second = tmp_path / "routes.lua"
    second.write_text("error('broken')\n")
    with pytest.raises(ConfigError, match=f"error running {second}: .*broken"):
        engine.load(f"{first}:{second}")


# -- V2: sleep and wait timeouts ------------------------------------------------------

V2_TIMEOUTS = ONE_POOL + """
local function funcgen(p, body)
    local fgen = mcp.funcgen_new()
    local h = fgen:new_handle(p)
    fgen:ready({ f = function(rctx) return function(r) return body(rctx, h, r) end end })
    return fgen
end

function mcp_config_routes(p)
    mcp.attach(mcp.CMD_MG, mcp.router_new({ map = {
        sleep = funcgen(p, function(rctx, h, r)
            local slept = rctx:sleep(0.5)
            local res = rctx:enqueue_and_wait(r, h)
            return "HD s" .. tostring(slept) .. " " .. res:line() .. "\\r\\n"
        end),
        cond = funcgen(p, function(rctx, h, r)
            rctx:enqueue(r, h)
            local done, timeout = rctx:wait_cond(1, mcp.WAIT_GOOD, 0.5)
            if timeout then
                local again = rctx:wait_cond(1, mcp.WAIT_ANY)
                return "HD late " .. done .. " " .. again .. "\\r\\n"
            end
            return "HD done " .. done .. " " .. tostring(timeout) .. "\\r\\n"
        end),
        handle = funcgen(p, function(rctx, h, r)
            local res, timeout = rctx:enqueue_and_wait(r, h, 0.25)
            if timeout then
                return rctx:wait_handle(h)
            end
            return res
        end),
        slept = funcgen(p, function(rctx, h, r)
            return "HD " .. tostring(rctx:sleep("x")) .. "\\r\\n"
        end),
    } }))
end
"""


def test_rctx_sleep_resumes_by_the_clock(clock, engine, load):
    load(V2_TIMEOUTS)
    backends = FakeBackends(engine, {"b1": b"HD t1\r\n"})
    out = start(engine, b"mg sleep/k t\r\n")
    assert out == [] and backends.sent == []
    clock.advance(0.49)
    assert out == []
    clock.advance(0.01)
    assert out == [b"HD strue t1\r\n"]


def test_rctx_sleep_takes_seconds(engine, load):
    load(V2_TIMEOUTS)
    assert run(engine, b"mg slept/k\r\n") == b"SERVER_ERROR lua failure\r\n"


def test_wait_cond_timeout(clock, engine, load):
    load(V2_TIMEOUTS)
    backends = FakeBackends(engine, hold=True)
    out = start(engine, b"mg cond/k\r\n")
    clock.advance(0.5)
    assert out == []  # timed out, and waits again without a timeout
    backends.answer("b1", b"EN\r\n")
    assert out == [b"HD late 0 1\r\n"]


def test_wait_cond_answered_before_its_timeout(clock, engine, load):
    load(V2_TIMEOUTS)
    backends = FakeBackends(engine, hold=True)
    out = start(engine, b"mg cond/k\r\n")
    backends.answer("b1", b"HD\r\n")
    assert out == [b"HD done 1 nil\r\n"]
    clock.advance(1)  # the stale timer does nothing
    assert out == [b"HD done 1 nil\r\n"]


def test_handle_timeout_then_wait_again(clock, engine, load):
    load(V2_TIMEOUTS)
    backends = FakeBackends(engine, hold=True)
    out = start(engine, b"mg handle/k\r\n")
    clock.advance(0.25)
    assert out == []
    backends.answer("b1", b"HD t5\r\n")
    assert out == [b"HD t5\r\n"]


@pytest.mark.parametrize("call", ["rctx:cfd()", "rctx:tls_peer_cn()",
                                  "rctx:request_new()", "rctx:response_new()"])
def test_refused_rctx_methods_name_themselves(engine, load, events, call):
    load(ONE_POOL + f"""
    function mcp_config_routes(p)
        local fgen = mcp.funcgen_new()
        fgen:ready({{ f = function(rctx) return function(r) return {call} end end }})
        mcp.attach(mcp.CMD_MG, fgen)
    end
    """)
    assert run(engine, b"mg k\r\n") == b"SERVER_ERROR lua failure\r\n"
    name = call.split("(")[0]
    assert any(f"{name} is not supported" in str(e.get("error", ""))
               for e in events if e.get("type") == "proxy_error")


# -- stats proxyfuncs ---------------------------------------------------------------


def test_funcgen_stats_count_funcgens_and_slots(engine, load):
    from mcproxy.routing.funcstats import funcgen_stats
    routes = load(ONE_POOL + """
    function mcp_config_routes(p)
        local function fg(name)
            local fgen = mcp.funcgen_new()
            local h = fgen:new_handle(p)
            fgen:ready({ n = name, f = function(rctx)
                return function(r)  -- not a direct funcgen: Lua runs it
                    local res = rctx:enqueue_and_wait(r, h)
                    return res
                end
            end })
            return fgen
        end
        mcp.attach(mcp.CMD_MG, mcp.router_new({ map = { a = fg("one"), b = fg("one"),
                                                        c = fg("two") } }))
    end
    """)
    assert funcgen_stats(routes) == [("funcs_one", 2), ("slots_one", 2),
                                     ("funcs_two", 1), ("slots_two", 1),
                                     ("funcs_mcp_router", 1), ("slots_mcp_router", 0)]
    backends = FakeBackends(engine, hold=True)
    start(engine, b"mg c/1\r\n")
    start(engine, b"mg c/2\r\n")  # the first slot is busy: a second one
    assert ("slots_two", 2) in funcgen_stats(routes)
    assert len(backends.pending) == 2
    assert funcgen_stats(None) == []


def test_a_handle_to_the_internal_handler_uses_the_embedded_cache(engine, load):
    load(ONE_POOL + """
    function mcp_config_routes(p)
        local fgen = mcp.funcgen_new()
        local h = fgen:new_handle(mcp.internal_handler)
        fgen:ready({ f = function(rctx) return function(r)
            local res = rctx:enqueue_and_wait(r, h)
            return res
        end end })
        mcp.attach(mcp.CMD_ANY_STORAGE, fgen)
    end
    """)
    backends = FakeBackends(engine)
    assert run(engine, b"set k 0 0 2\r\n", b"hi\r\n") == b"STORED\r\n"
    assert run(engine, b"get k\r\n") == b"VALUE k 0 2\r\nhi\r\nEND\r\n"
    assert backends.sent == []


# -- pool options -------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ("{ beprefix = 'x' }", "mcp.pool: option 'beprefix' is not supported: mcproxy keeps one "
                           "connection per backend"),
    ("{ distribution = 1 }", "mcp.pool: unknown option 'distribution'"),
    ("{ iothread = 1 }", "mcp.pool: 'iothread' must be a boolean"),
])
def test_pool_options_refused_by_name(load, options, message):
    with pytest.raises(ConfigError, match=message):
        load(f"""
        function mcp_config_pools()
            return mcp.pool({{ mcp.backend("b1", "127.0.0.1", 11211) }}, {options})
        end
        function mcp_config_routes(p) end
        """)


def test_pool_iothread_is_accepted(load):
    routes = load("""
    function mcp_config_pools()
        return mcp.pool({ mcp.backend("b1", "127.0.0.1", 11211) }, { iothread = true })
    end
    function mcp_config_routes(p) end
    """)
    assert len(routes.host.pools) == 1
