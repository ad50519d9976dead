"""The route library (routing/routelib.lua) on a network-free engine: its
file is read through mcp.start_arg, its handlers route as memcached 1.6.45's
routelib does (the differential test, tests/e2e/test_routelib_e2e.py, holds
the bytes to it), and every unknown name or option fails the load."""

from __future__ import annotations

import textwrap

import pytest

from mcproxy.routing.engine import ROUTELIB_PATH, ConfigError
from mcproxy.wire import request as rq
from tests.enginekit import FakeBackends, engine, run, start  # noqa: F401

POOLS = """
pools{
    a = { backends = { "127.0.0.1:1" } },
    b = { backends = { { host = "127.0.0.1", port = 2, label = "b" } } },
    c = { backend_options = { connecttimeout = 2 }, backends = { "127.0.0.1:3 c" } },
    set_z = { za = { backends = { "127.0.0.1:1" } }, zb = { backends = { "127.0.0.1:2" } } },
}
"""
HIT = b"VALUE k 0 1\r\nv\r\nEND\r\n"
MISS = b"END\r\n"


@pytest.fixture
def routelib(engine, tmp_path):  # noqa: F811
    def load(text: str):
        path = tmp_path / "routes.lua"
        path.write_text(textwrap.dedent(text))
        return engine.load(ROUTELIB_PATH, str(path))
    return load


def test_a_lone_route_direct_takes_the_direct_path(engine, routelib):  # noqa: F811
    routes = routelib(POOLS + 'routes{ default = route_direct{ child = "b" } }')
    assert routes.shapes[rq.CMD_GET].kind == "direct"
    fake = FakeBackends(engine, {"b": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert fake.sent == [("b", b"get k\r\n")]


def test_map_by_prefix_cmdmap_and_cmap(engine, routelib):  # noqa: F811
    routelib(POOLS + """
    routes{
        cmap = { [mcp.CMD_SET] = route_direct{ child = "c" } },
        map = { x = route_direct{ child = "b" },
                y = cmdmap{ [mcp.CMD_GET] = route_direct{ child = "b" } } },
        default = route_direct{ child = "a" },
    }""")
    fake = FakeBackends(engine)
    for line in (b"get x/k\r\n", b"get y/k\r\n", b"get k\r\n", b"get z/k\r\n"):
        assert run(engine, line) == MISS
    start(engine, b"set k 0 0 1\r\n", b"v\r\n")
    start(engine, b"set y/k 0 0 1\r\n", b"v\r\n")
    assert [label for label, _ in fake.sent] == ["b", "b", "127.0.0.1:1", "127.0.0.1:1",
                                                  "c", "c"]


def test_failover_tries_failover_count_children(engine, routelib):  # noqa: F811
    routelib(POOLS + """routes{ default = route_failover{
        children = { "a", "b", "c" }, miss = true, failover_count = 2 } }""")
    fake = FakeBackends(engine)
    assert run(engine, b"get k\r\n") == MISS
    assert [label for label, _ in fake.sent] == ["127.0.0.1:1", "b"]


def test_failover_without_miss_stops_at_a_miss(engine, routelib):  # noqa: F811
    routelib(POOLS + 'routes{ default = route_failover{ children = { "a", "b" } } }')
    fake = FakeBackends(engine, {"127.0.0.1:1": b"SERVER_ERROR x\r\n"})
    assert run(engine, b"get k\r\n") == MISS
    assert [label for label, _ in fake.sent] == ["127.0.0.1:1", "b"]
    fake.sent.clear()
    fake.replies.clear()
    assert run(engine, b"get k\r\n") == MISS
    assert [label for label, _ in fake.sent] == ["127.0.0.1:1"]


def test_allsync_answers_the_first_error(engine, routelib):  # noqa: F811
    routelib(POOLS + 'routes{ default = route_allsync{ children = { "a", "b", "c" } } }')
    FakeBackends(engine, {"b": b"SERVER_ERROR b\r\n", "c": HIT})
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR b\r\n"


def test_split_answers_child_a_and_writes_both(engine, routelib):  # noqa: F811
    routelib(POOLS + 'routes{ default = route_split{ child_a = "b", child_b = "a" } }')
    fake = FakeBackends(engine, {"b": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert sorted(label for label, _ in fake.sent) == ["127.0.0.1:1", "b"]


def test_ttl_rewrites_storage_commands(engine, routelib):  # noqa: F811
    routelib(POOLS + 'routes{ default = route_ttl{ ttl = 9, child = "b" } }')
    fake = FakeBackends(engine, {"b": b"STORED\r\n"})
    start(engine, b"set k 0 0 1\r\n", b"v\r\n")
    start(engine, b"ms k 1\r\n", b"v\r\n")
    start(engine, b"ms k 1 T1 F2\r\n", b"v\r\n")
    assert [wire.split(b"\r\n")[0] for _, wire in fake.sent] == [
        b"set k 0 9 1", b"ms k 1 T9", b"ms k 1 T9 F2"]
    assert run(engine, b"get k\r\n") == b"SERVER_ERROR invalid command for route_ttl\r\n"


def test_zfailover_asks_the_local_zone_first(engine, routelib):  # noqa: F811
    routelib('local_zone("zb")\n' + POOLS
             + 'routes{ default = route_zfailover{ children = "set_z", miss = true } }')
    fake = FakeBackends(engine, {"127.0.0.1:1": HIT})
    assert run(engine, b"get k\r\n") == HIT
    assert [label for label, _ in fake.sent] == ["127.0.0.1:2", "127.0.0.1:1"]


def test_null_answers_what_nothing_answers(engine, routelib):  # noqa: F811
    routelib(POOLS + "routes{ default = route_null{} }")
    assert run(engine, b"mg k v\r\n") == b"EN\r\n"
    assert run(engine, b"delete k\r\n") == b"NOT_FOUND\r\n"


@pytest.mark.parametrize(("text", "message"), [
    ('routes{ default = route_direct{ child = "a", chlid = 1 } }',
     "route_direct: unknown option 'chlid'"),
    ('routes{ default = route_failover{ children = { "a" }, retries = 2 } }',
     "route_failover: unknown option 'retries'"),
    ('routes{ default = route_direct{ child = "a" }, mpa = {} }',
     "routes: unknown option 'mpa'"),
    ('routes{ default = route_direct{ child = "nope" } }', "no pool matching: nope"),
    ('routes{ default = route_fanout{ children = { "a" } } }', "route_fanout"),
    ('settings{ no_such_setting = 1 }\nroutes{ default = route_direct{ child = "a" } }',
     "unknown setting 'no_such_setting'"),
    ('routes{ conf = { mode = "prefix", sep = "/" }, map = {} }',
     "routes: conf: unknown option 'sep'"),
])
def test_unknown_names_fail_the_load(routelib, text, message):
    with pytest.raises(ConfigError) as info:
        routelib(POOLS + text)
    assert message in str(info.value)


def test_unknown_pool_option_fails_the_load(routelib):
    with pytest.raises(ConfigError, match="pool 'a': unknown option 'backend'"):
        routelib('pools{ a = { backend = { "127.0.0.1:1" } } }\n'
                 'routes{ default = route_direct{ child = "a" } }')


def test_routelib_needs_its_file(engine):  # noqa: F811
    with pytest.raises(ConfigError, match="--config-arg=FILE"):
        engine.load(ROUTELIB_PATH)


def test_readme_example_is_examples_routelib(routelib):
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    example = (root / "examples" / "routelib.lua").read_text()
    readme = (root / "README.rst").read_text()
    section = readme.split("Route library configs (routelib)\n", 1)[1]
    block = section.split(".. code-block:: lua\n\n", 1)[1].split("\n.. list-table::", 1)[0]
    assert "".join(line[4:] if line.strip() else line
                   for line in block.splitlines(True)) == example
    routelib(example)
