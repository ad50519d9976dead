"""Native runners (mcproxy/routing/native/) answer as their Lua bodies.

Each property sends the same client stream through two engines over the
same config: one that runs the route library's shapes natively, and
``RouteEngine(direct=False)``, which runs every route's Lua body (the
reference). Their backends are scripted per example: each answers from an
embedded-cache Store of its own (so keys hit on some children and miss on
others), or fails every request (as a timeout, a dead connection), or
answers every request with an error line. The clients must get the same
bytes, the backends must end up holding the same items, and the counters
must agree.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lupa.lua54 import LuaRuntime
from twisted.internet.testing import MemoryReactorClock, StringTransport

from fuzz.checks import chunked
from mcproxy.backends.pool import BackendRegistry
from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import ROUTELIB_PATH, RouteEngine
from mcproxy.routing.native import Failover
from mcproxy.routing.native import key_fraction as native_key_fraction
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire import request as rq
from mcproxy.wire.reader import ResponseReader
from mcproxy.wire.request import parse_request
from mcproxy.wire.response import FAIL_DISCONNECTED, FAIL_TIMEOUT
from mcproxy.writes import batch
from tests.server.memorycore import MemoryCore

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

#: Three pools: a and b of one backend each, c of two.
POOLS = """
    a = { backends = { "127.0.0.1:1" } },
    b = { backends = { "127.0.0.1:2" } },
    c = { backends = { "127.0.0.1:3", "127.0.0.1:4" } },
"""
LABELS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]

#: Routes of the route library run natively (routes.config's route).
NATIVE_ROUTES = {
    "failover": 'routes.failover{ "a", "b" }',
    "failover of three": 'routes.failover{ "c", "a", "b" }',
    "failover on misses": 'routes.failover({ "a", "c", "b" }, { miss = true })',
    "failover of two tries": 'routes.failover({ "b", "a", "c" }, { miss = true, count = 2 })',
    "failover of routes": 'routes.failover{ routes.direct("a"), routes.as_route("c") }',
    "failover by command": '{ reads = routes.failover({ "a", "b" }, { miss = true }), '
                           'writes = "a" }',
    "failover under direct": 'routes.direct(routes.failover{ "c", "b" })',
    "all_sync": 'routes.all_sync{ "a", "b", "c" }',
    "all_sync, strict": 'routes.all_sync({ "c", "b" }, { strict = true })',
    "all_sync of a set": 'routes.all_sync("c")',
    "all_sync by command": '{ reads = routes.failover{ "b", "a" }, '
                           'writes = routes.all_sync{ "a", "b" } }',
    "zfailover": 'routes.zfailover({ za = "a", zb = "b", zc = "c" }, "zb")',
    "zfailover, not on misses": 'routes.zfailover({ za = "a", zb = "b", zc = "c" }, "zc", '
                                '{ miss = false })',
    "zfailover by command": '{ reads = routes.zfailover({ z1 = "c", z2 = "a", z3 = "b" }, '
                            '"z1"), writes = routes.all_sync{ "c", "a", "b" } }',
    "split": 'routes.split("a", "b")',
    "split of a fraction": 'routes.split(routes.direct("c"), { "a", "b" }, { fraction = 0.5 })',
}


def config(route: str, introspect: bool = True) -> str:
    return textwrap.dedent(f"""
        local routes = require("mcproxy.routes")
        mcp_config_pools, mcp_config_routes = routes.config{{
            pools = {{ {POOLS} }},
            introspect = {str(introspect).lower()},
            routes = {route},
        }}
    """)


def serve(store: Store, data: bytes) -> bytes:
    """What a memcached holding ``store`` answers to ``data``."""
    out, pos = [], 0
    while pos < len(data):
        newline = data.index(b"\n", pos) + 1
        req = parse_request(data[pos:newline])
        pos = newline
        if req.vlen:
            req.value = data[pos:pos + req.vlen]
            pos += req.vlen
        out.append(store.execute(req))
    return b"".join(out)


def requests_in(data: bytes) -> int:
    """How many requests ``data`` (as the proxy forwards them) holds."""
    count, pos = 0, 0
    while pos < len(data):
        newline = data.index(b"\n", pos) + 1
        pos = newline + parse_request(data[pos:newline]).vlen
        count += 1
    return count


#: What a backend does with every request in an example.
OK, FAIL, TIMEOUT, ERROR = "ok", "fail", "timeout", "error"
ERROR_LINE = b"SERVER_ERROR out of memory storing object\r\n"


class ScriptedProxy:
    """The route engine behind a client protocol, in-process; each backend
    settles every unit at once, as its ``modes`` entry says."""

    def __init__(self, path: str, direct: bool, arg: str | None = None) -> None:
        self.stats = ProxyStats()
        self.engine = RouteEngine(self.stats, BackendRegistry(self.stats,
                                                              reactor=MemoryReactorClock()),
                                  Tunables(), UserStats(), direct=direct,
                                  # the reference routes key by key, request
                                  # by request, each through routes.start
                                  batch_keys=direct)
        self.routes = self.engine.load(path, arg)
        self.started = 0
        start = self.routes.start

        def counted(*args):
            self.started += 1
            return start(*args)

        self.routes.start = counted
        self.modes: dict[str, str] = {}
        self.stores: dict[str, Store] = {}
        self.units: Counter = Counter()
        for backend in self.engine.registry.live:
            backend.send_unit = partial(self._settle, backend.label)

    def _settle(self, label: str, unit) -> None:
        self.units[label] += 1
        mode = self.modes.get(label, OK)
        if mode == FAIL:
            unit.fail(FAIL_DISCONNECTED, 0)
            return
        if mode == TIMEOUT:
            unit.fail(FAIL_TIMEOUT, 0)
            return
        out: list[bytes] = []
        unit.write(out, [unit], 0)
        data = b"".join(out)
        if mode == ERROR:
            reply = ERROR_LINE * requests_in(data)
        else:
            reply = serve(self.stores[label], data)
        reader = ResponseReader()
        reader.feed(reply)
        assert unit.read(reader)
        unit.deliver(0)

    def exchange(self, modes: dict[str, str], held: dict[str, list[bytes]],
                 chunks: list[bytes], value: bytes | None = None,
                 keys: list[bytes] | None = None) -> tuple[bytes, dict[str, bytes]]:
        """A new client's chunks against backends in ``modes`` holding the
        keys ``held`` (label -> keys; their value ``value``, else the
        backend's label); what the client got back and what each backend
        holds of every key (``keys``, else KEYS) afterwards."""
        self.modes = modes
        self.stores = {label: Store(clock=lambda: 1_700_000_000.0) for label in LABELS}
        for label, keys in held.items():
            data = label.encode() if value is None else value
            for key in keys:
                serve(self.stores[label], b"set %s 3 0 %d\r\n%s\r\n" % (key, len(data), data))
        pending: list = []
        saved, batch.schedule = batch.schedule, pending.append
        try:
            client = ProxyServerProtocol(MemoryCore(self.engine, stats=self.stats))
            client.makeConnection(StringTransport())
            for chunk in chunks:
                client.dataReceived(chunk)
                while pending:
                    pending.pop(0)()
        finally:
            batch.schedule = saved
        assert self.stats.req_active == 0
        everything = b"get " + b" ".join(keys or KEYS) + b"\r\n"
        return client.transport.value(), {
            label: serve(store, everything) for label, store in self.stores.items()}


_proxies: dict[tuple[str, bool], ScriptedProxy] = {}


def proxy(tmp_path_factory, text: str, direct: bool, routelib: bool = False) -> ScriptedProxy:
    """The ScriptedProxy of a config, or of a route library file (made once
    per test session)."""
    key = (text, direct, routelib)
    if key not in _proxies:
        path = str(tmp_path_factory.mktemp("native") / "route.lua")
        Path(path).write_text(text)
        _proxies[key] = (ScriptedProxy(ROUTELIB_PATH, direct, path) if routelib
                         else ScriptedProxy(path, direct))
    return _proxies[key]


KEYS = [b"a", b"b", b"k1", b"k2", b"k3", b"x" * 250]
INTROSPECTION = b"__mcproxy__.route(get,k1)"
_keys = st.sampled_from(KEYS)


@st.composite
def client_requests(draw) -> bytes:
    """A request the failover routes take: gets of one and several keys
    (duplicates too), writes, meta commands, an introspection get."""
    key = draw(_keys)
    kind = draw(st.integers(0, 9))
    value = draw(st.sampled_from([b"", b"v", b"value"]))
    if kind <= 1:
        return b"get %s\r\n" % key
    if kind <= 3:
        keys = draw(st.lists(_keys | st.just(INTROSPECTION), min_size=2, max_size=6))
        return draw(st.sampled_from([b"get ", b"gets "])) + b" ".join(keys) + b"\r\n"
    if kind == 4:
        return b"set %s 5 0 %d\r\n%s\r\n" % (key, len(value), value)
    if kind == 5:
        return draw(st.sampled_from([b"delete %s\r\n", b"touch %s 10\r\n", b"gat 10 %s\r\n",
                                     b"gets %s\r\n", b"incr %s 1\r\n"])) % key
    if kind == 6:
        flags = draw(st.sampled_from([b" v", b" s t v c", b" k O1 q", b""]))
        return b"mg %s%s\r\n" % (key, flags)
    if kind == 7:
        return b"ms %s %d T0\r\n%s\r\n" % (key, len(value), value)
    if kind == 8:
        return draw(st.sampled_from([b"md %s q\r\n", b"ma %s N0 J5\r\n",
                                     b"add %s 0 0 1 noreply\r\nz\r\n"])) % key
    return b"get %s\r\n" % INTROSPECTION


_mode = st.sampled_from([OK, OK, FAIL, TIMEOUT, ERROR])
#: Each backend's mode; pool c's two backends mostly share theirs.
modes = st.builds(lambda a, b, c, other, split: dict(zip(LABELS, [a, b, c, other if split else c],
                                                         strict=True)),
                  _mode, _mode, _mode, _mode, st.integers(0, 3).map(lambda n: n == 0))
held = st.fixed_dictionaries({label: st.lists(_keys, unique=True) for label in LABELS})
streams = st.lists(client_requests(), max_size=10).map(b"".join)


@pytest.mark.parametrize("name", sorted(NATIVE_ROUTES))
@PROPERTY
@given(modes=modes, held=held, stream=streams, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_routes_answer_as_their_lua_bodies(tmp_path_factory, name, modes, held, stream, cuts):
    """routes.failover, routes.all_sync, routes.zfailover and routes.split
    over pools run without Lua (but introspection, and all_sync's requests that use a cas
    unique) and
    answer every client, change every backend and count every request as
    their Lua bodies do, whatever each child answers or fails."""
    text = config(NATIVE_ROUTES[name])
    native = proxy(tmp_path_factory, text, True)
    lua = proxy(tmp_path_factory, text, False)
    assert rq.CMD_GET in native.routes.native
    chunks = chunked(stream, cuts)
    started = native.started
    assert native.exchange(modes, held, chunks) == lua.exchange(modes, held, chunks)
    if "all_sync" not in name:
        assert native.started - started == sum(  # introspection, of get only
            token.startswith(b"__mcproxy__") for line in stream.split(b"\r\n")
            if line.startswith(b"get ") for token in line.split(b" "))
    for counter in ("conn_requests", "commands"):
        assert getattr(native.stats, counter) == getattr(lua.stats, counter)


#: Route library files whose route runs natively (memcached's routelib on
#: the V2 API: its failover differs from routes.failover, see
#: mcproxy/routing/native/).
ROUTELIB_ROUTES = {
    "route_failover": 'route_failover{ children = { "a", "b" } }',
    "route_failover of three on misses": 'route_failover{ children = { "c", "a", "b" }, '
                                         'miss = true }',
    "route_failover of two tries": 'route_failover{ children = { "b", "a", "c" }, '
                                   'failover_count = 2 }',
    "route_failover of routes": 'route_failover{ children = { route_direct{ child = "a" }, '
                                '"c" }, miss = true }',
    "route_direct of a route_failover": 'route_direct{ child = route_failover{ '
                                        'children = { "c", "b" } } }',
    "route_allsync": 'route_allsync{ children = { "a", "b", "c" } }',
    "route_allsync of routes": 'route_allsync{ children = { route_direct{ child = "c" }, '
                               '"b" } }',
    "route_split": 'route_split{ child_a = "c", child_b = route_direct{ child = "a" } }',
}


@pytest.mark.parametrize("name", sorted(ROUTELIB_ROUTES))
@PROPERTY
@given(modes=modes, held=held, stream=streams, cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_routelib_routes_answer_as_their_lua_bodies(tmp_path_factory, name, modes, held,
                                                   stream, cuts):
    """routelib's route_failover, route_allsync and route_split, attached
    alone, run without Lua and answer as their V2 bodies do."""
    text = "pools{" + POOLS + "}\nroutes{ default = " + ROUTELIB_ROUTES[name] + " }\n"
    native = proxy(tmp_path_factory, text, True, routelib=True)
    lua = proxy(tmp_path_factory, text, False, routelib=True)
    assert rq.CMD_GET in native.routes.native
    chunks = chunked(stream, cuts)
    started = native.started
    assert native.exchange(modes, held, chunks) == lua.exchange(modes, held, chunks)
    assert native.started == started and lua.started > 0 or not stream
    for counter in ("conn_requests", "commands"):
        assert getattr(native.stats, counter) == getattr(lua.stats, counter)


SHUFFLED = {
    "shuffled": 'routes.failover({ "a", "b", "c" }, { shuffle = true })',
    "shuffled on misses": 'routes.failover({ "a", "b", "c" }, { shuffle = true, miss = true })',
    "shuffled, two tries": 'routes.failover({ "a", "b", "c" }, '
                           '{ shuffle = true, miss = true, count = 2 })',
    "shuffled of five": 'routes.failover({ "a", "b", "c", routes.direct("a"), "b" }, '
                        '{ shuffle = true })',
}


@PROPERTY
@given(st.sampled_from(sorted(SHUFFLED)), st.sampled_from([OK, FAIL, ERROR]),
       st.lists(_keys, unique=True), streams)
def test_shuffled_failover_answers_as_its_lua_body(tmp_path_factory, name, mode, keys,
                                                   stream):
    """A shuffled failover draws its order natively; over children that
    answer alike (each holds the same keys, all in one mode) the order
    cannot show, and the answers are its Lua body's."""
    text = config(SHUFFLED[name])
    native = proxy(tmp_path_factory, text, True)
    lua = proxy(tmp_path_factory, text, False)
    assert rq.CMD_GET in native.routes.native
    all_modes = dict.fromkeys(LABELS, mode)
    all_held = dict.fromkeys(LABELS, keys)
    # the stores differ after a write: only reads, so that they stay alike
    reads = b"".join(line + b"\r\n" for line in stream.split(b"\r\n")
                     if line.startswith((b"get", b"gat", b"mg ")) and b"noreply" not in line)
    assert native.exchange(all_modes, all_held, [reads], b"same") == \
        lua.exchange(all_modes, all_held, [reads], b"same")


def _engine(tmp_path, route: str) -> ScriptedProxy:
    path = tmp_path / "route.lua"
    path.write_text(config(route, introspect=False))
    return ScriptedProxy(str(path), True)


@pytest.mark.parametrize("count, tries", [(None, 3), (2, 2), (1, 1)])
def test_shuffle_tries_each_order_alike(tmp_path, count, tries):
    """Every order of the children is as likely as in a Fisher-Yates
    shuffle (the Lua body's): over 6,000 requests each of the 6 orders of
    three children comes within 4.5 sigma of 1,000 (a false alarm about
    once in 50,000 runs)."""
    options = "shuffle = true, miss = true" + ("" if count is None else f", count = {count}")
    scripted = _engine(tmp_path, f'routes.failover({{ "a", "b", "c" }}, {{ {options} }})')
    seen: list[str] = []
    for backend in scripted.engine.registry.live:
        backend.send_unit = lambda unit, label=backend.label: (
            seen.append(label), unit.fail(FAIL_TIMEOUT, 0))
    orders: Counter = Counter()
    for _ in range(6000):
        seen.clear()
        out: list[bytes] = []
        scripted.engine.route(parse_request(b"get k1\r\n"), out.append)
        assert out == [b"SERVER_ERROR backend failure\r\n"]
        pools = tuple("c" if label in LABELS[2:] else "ab"[LABELS.index(label)]
                      for label in seen)
        assert len(pools) == tries and len(set(pools)) == tries
        orders[pools] += 1
    assert len(orders) == 6 if tries > 1 else 3
    expected = 6000 / len(orders)
    sigma = (expected * (1 - 1 / len(orders))) ** 0.5
    for order, seen_count in orders.items():
        assert abs(seen_count - expected) < 4.5 * sigma, (order, seen_count)


def _record_sends(scripted: ScriptedProxy) -> list[tuple[str, str, bytes]]:
    """What each backend of ``scripted`` is sent from now on: its label, the
    unit's kind and the unit's bytes, in order."""
    sends = []
    for backend in scripted.engine.registry.live:
        settle = backend.send_unit

        def send_unit(unit, settle=settle, label=backend.label):
            out: list[bytes] = []
            unit.write(out, [unit], 0)
            sends.append((label, unit.__class__.__name__, b"".join(out)))
            settle(unit)
        backend.send_unit = send_unit
    return sends


def _failover_over_stores(tmp_path, first: bytes, second: bytes):
    """``routes.failover`` of two children (missed keys go on), each backend
    an embedded store, the first filled by the requests ``first``, the
    second by ``second``."""
    scripted = _engine(tmp_path, 'routes.failover({ "a", "b" }, { miss = true })')
    scripted.modes = {}
    scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
    serve(scripted.stores[LABELS[0]], first)
    serve(scripted.stores[LABELS[1]], second)
    return scripted


def test_multiget_keys_travel_together(tmp_path):
    """The keys of a multiget go to each child's backends as one backend
    multiget each; only the keys the first child missed go on."""
    scripted = _failover_over_stores(
        tmp_path, b"set k1 0 0 1\r\nA\r\nset k3 0 0 1\r\nA\r\n",
        b"set k2 0 0 1\r\nB\r\nset k1 0 0 1\r\nB\r\n")
    sends = _record_sends(scripted)
    out: list[bytes] = []
    req = parse_request(b"get k1 k2 k3 k4\r\n")
    assert scripted.engine.route_keys(req, [b"k1", b"k2", b"k3", b"k4"], out.append)
    assert out == [b"VALUE k1 0 1\r\nA\r\nVALUE k2 0 1\r\nB\r\nVALUE k3 0 1\r\nA\r\nEND\r\n"]
    lines = [(label, sent) for label, _, sent in sends]
    assert lines == [(LABELS[0], b"get k1 k2 k3 k4\r\n"), (LABELS[1], b"get k2 k4\r\n")]
    assert scripted.stats.req_active == 0 and scripted.stats.conn_requests == 4


def test_a_run_goes_to_the_first_child_as_sent(tmp_path):
    """A client's run of plain gets and sets goes to the first child's
    backend as it came (one ReplyRun); only the get it missed goes on, alone,
    and the client gets every reply in order."""
    scripted = _failover_over_stores(tmp_path, b"set k1 0 0 1\r\nA\r\n",
                                     b"set k2 0 0 1\r\nB\r\n")
    lines = _record_sends(scripted)
    run = b"get k1\r\nget k2\r\nset k3 0 0 1\r\nC\r\nget k3\r\n"
    keys, ends = [b"k1", b"k2", b"k3", b"k3"], [8, 16, 37, 45]
    out: list[bytes] = []
    assert scripted.engine.route_run(run, 0, keys, ends, [2], None, out.append)
    assert out == [b"VALUE k1 0 1\r\nA\r\nEND\r\nVALUE k2 0 1\r\nB\r\nEND\r\n"
                   b"STORED\r\nVALUE k3 0 1\r\nC\r\nEND\r\n"]
    assert lines == [(LABELS[0], "ReplyRun", run), (LABELS[1], "Single", b"get k2\r\n")]
    stats = scripted.stats
    assert stats.req_active == 0 and stats.conn_requests == 4
    assert stats.commands[rq.CMD_GET] == 3 and stats.commands[rq.CMD_SET] == 1


@pytest.mark.parametrize("run, key, sent, expected", [
    (b"get k1\r\n", b"k1", [], b"VALUE k1 0 1\r\nA\r\nEND\r\n"),  # a hit: final
    (b"get k2\r\n", b"k2", [b"get k2\r\n"], b"VALUE k2 0 1\r\nB\r\nEND\r\n"),  # missed
    (b"get k3\r\n", b"k3", [b"get k3\r\n"], b"END\r\n"),  # missed by both
    (b"set k3 0 0 1\r\nC\r\n", b"k3", [], b"STORED\r\n"),
])
def test_a_run_of_one_request(tmp_path, run, key, sent, expected):
    """A run of one request (one in flight) goes to the first child as it
    came; a miss goes on to the next child, alone."""
    scripted = _failover_over_stores(tmp_path, b"set k1 0 0 1\r\nA\r\n",
                                     b"set k2 0 0 1\r\nB\r\n")
    lines = _record_sends(scripted)
    out: list[bytes] = []
    sets = [0] if run.startswith(b"set") else []
    assert scripted.engine.route_run(run, 0, [key], [len(run)], sets, None, out.append)
    assert out == [expected]
    assert lines == [(LABELS[0], "ReplyRun", run)] + [(LABELS[1], "Single", s) for s in sent]
    assert scripted.stats.req_active == 0 and scripted.stats.conn_requests == 1


def test_a_run_of_one_request_whose_first_child_fails(tmp_path):
    """The first child's backend fails the run of one: the request goes on
    to the next child, which answers it."""
    scripted = _failover_over_stores(tmp_path, b"", b"set k2 0 0 1\r\nB\r\n")
    first = next(b for b in scripted.engine.registry.live if b.label == LABELS[0])
    first.send_unit = lambda unit: unit.fail(FAIL_TIMEOUT, 0)
    out: list[bytes] = []
    assert scripted.engine.route_run(b"get k2\r\n", 0, [b"k2"], [8], [], None, out.append)
    assert out == [b"VALUE k2 0 1\r\nB\r\nEND\r\n"]
    assert scripted.stats.req_active == 0


def _gathered(scripted, monkeypatch, requests, fail_first=False) -> list[list[bytes]]:
    """What each of ``requests`` (plain, each a connection's lone one) gets,
    gathered in one poll (RouteEngine.gather_plain) and routed at its end."""
    pending: list = []
    monkeypatch.setattr(batch, "schedule", pending.append)
    if fail_first:
        first = next(b for b in scripted.engine.registry.live if b.label == LABELS[0])
        first.send_unit = lambda unit: unit.fail(FAIL_TIMEOUT, 0)
    outs: list[list[bytes]] = [[] for _ in requests]
    released: list[int] = []
    counted = scripted.stats.conn_requests
    keys = 0
    for index, sent in enumerate(requests):
        words = sent.split(b"\r")[0].split(b" ")
        # a multi-key get: its keys as scanned (joined by spaces), their number
        key, width = (b" ".join(words[1:]), len(words) - 1) if len(words) > 2 \
            and words[0] == b"get" else (words[1], 0)
        keys += width or 1
        assert scripted.engine.gather_plain(key, sent, sent.startswith(b"set"),
                                            outs[index].append, partial(released.append, index),
                                            None, width)
    while pending:
        pending.pop(0)()
    assert sorted(released) == list(range(len(requests)))
    assert scripted.stats.req_active == 0
    assert scripted.stats.conn_requests - counted == keys
    return outs


def test_lone_requests_of_many_connections_join_one_run(tmp_path, monkeypatch):
    """The lone requests of several connections in one poll go to the first
    child's backend as one ReplyRun; only those it missed go on, each
    alone, and each connection gets its own reply."""
    scripted = _failover_over_stores(tmp_path, b"set k1 0 0 1\r\nA\r\n",
                                     b"set k2 0 0 1\r\nB\r\n")
    lines = _record_sends(scripted)
    requests = [b"get k1\r\n", b"get k2\r\n", b"set k3 0 0 1\r\nC\r\n", b"get k4\r\n"]
    assert _gathered(scripted, monkeypatch, requests) == [
        [b"VALUE k1 0 1\r\nA\r\nEND\r\n"], [b"VALUE k2 0 1\r\nB\r\nEND\r\n"],
        [b"STORED\r\n"], [b"END\r\n"]]
    assert lines == [(LABELS[0], "ReplyRun", b"".join(requests)),
                     (LABELS[1], "Single", b"get k2\r\n"), (LABELS[1], "Single", b"get k4\r\n")]


def test_joined_requests_whose_first_child_fails_go_on(tmp_path, monkeypatch):
    scripted = _failover_over_stores(tmp_path, b"", b"set k2 0 0 1\r\nB\r\n")
    assert _gathered(scripted, monkeypatch, [b"get k2\r\n", b"set k5 0 0 1\r\nE\r\n"],
                     fail_first=True) == [[b"VALUE k2 0 1\r\nB\r\nEND\r\n"], [b"STORED\r\n"]]


def test_joined_requests_of_a_failover_not_on_misses_end_at_the_first_child(tmp_path,
                                                                           monkeypatch):
    """Without ``miss``, every reply the first child gives is the route's
    (a miss too); only those it fails go on."""
    scripted = _engine(tmp_path, 'routes.failover{ "a", "b" }')
    scripted.modes = {}
    scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
    serve(scripted.stores[LABELS[0]], b"set k1 0 0 1\r\nA\r\n")
    serve(scripted.stores[LABELS[1]], b"set k2 0 0 1\r\nB\r\n")
    lines = _record_sends(scripted)
    requests = [b"get k1\r\n", b"get k2\r\n", b"set k3 0 0 1\r\nC\r\n"]
    assert _gathered(scripted, monkeypatch, requests) == [
        [b"VALUE k1 0 1\r\nA\r\nEND\r\n"], [b"END\r\n"], [b"STORED\r\n"]]
    assert lines == [(LABELS[0], "ReplyRun", b"".join(requests))]
    assert _gathered(scripted, monkeypatch, requests[:2], fail_first=True) == [
        [b"END\r\n"], [b"VALUE k2 0 1\r\nB\r\nEND\r\n"]]


#: Configs of the direct path (RunRouter._route_joined joins their lone
#: requests): over pool a (one backend) or c (two), with introspection (a
#: key kept for Lua), with a depth limit on every backend.
JOINED = {
    "one backend": ('"a"', False, ""),
    "two backends": ('"c"', False, ""),
    "two backends, introspection": ('"c"', True, ""),
    "two backends, depth limits": ('"c"', False, "tunables = { backend_depth_limit = 100 },"),
}


def _joined_proxy(tmp_path_factory, name: str) -> ScriptedProxy:
    route, introspect, tunables = JOINED[name]
    text = config(route, introspect).replace("introspect = ", tunables + " introspect = ", 1)
    return proxy(tmp_path_factory, text, True)


@st.composite
def lone_requests(draw) -> bytes:
    """A plain get or set, as scan_plain takes them (gather_plain's)."""
    key = draw(_keys | st.just(INTROSPECTION))
    if draw(st.booleans()):
        return b"get %s\r\n" % key
    value = draw(st.sampled_from([b"", b"v", b"value"]))
    return b"set %s 0 0 %d\r\n%s\r\n" % (key.replace(b"(", b"").replace(b")", b"")
                                             .replace(b",", b""), len(value), value)


@PROPERTY
@given(name=st.sampled_from(sorted(JOINED)),
       requests=st.lists(lone_requests(), min_size=2, max_size=10))
def test_joined_lone_requests_answer_as_routed_alone(tmp_path_factory, monkeypatch, name,
                                                      requests):
    """The lone requests of many connections in one poll, joined by the
    direct path, get what each gets routed alone, one after the other, and
    leave the backends holding the same."""
    scripted = _joined_proxy(tmp_path_factory, name)
    seen = []
    for joined in (True, False):
        scripted.modes = {}
        scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
        for label in LABELS:  # each backend's own value: a misrouted get shows
            for key in KEYS:
                serve(scripted.stores[label], b"set %s 0 0 11\r\n%s\r\n" % (key, label.encode()))
        outs = (_gathered(scripted, monkeypatch, requests) if joined else
                [_gathered(scripted, monkeypatch, [sent])[0] for sent in requests])
        everything = b"get " + b" ".join(KEYS) + b"\r\n"
        seen.append((outs, [serve(store, everything) for store in scripted.stores.values()]))
    assert seen[0] == seen[1]


#: Configs whose multi-key gets gather_plain takes too: the direct path to
#: one backend, with a key kept for Lua (which routes its request the
#: slower way, RunRouter._route_multiget).
JOINED_MULTIGETS = {
    "one backend": ('"a"', False, ""),
    "one backend, introspection": ('"a"', True, ""),
}


@st.composite
def lone_requests_with_multigets(draw, sets: bool) -> bytes:
    """A plain get (or with ``sets`` a set), or a get of up to 16 keys (a
    key maybe twice)."""
    if draw(st.booleans()):
        return draw(lone_requests().filter(lambda sent: sets or sent.startswith(b"get")))
    keys = draw(st.lists(_keys | st.just(INTROSPECTION), min_size=2, max_size=16))
    return b"get %s\r\n" % b" ".join(keys)


@PROPERTY
@given(name=st.sampled_from(sorted(JOINED_MULTIGETS)), data=st.data())
def test_joined_multigets_answer_as_routed_alone(tmp_path_factory, monkeypatch, name, data):
    """Multi-key gets joined with the lone requests of other connections
    get what each gets routed alone, and leave the backend the same. (With
    a key kept for Lua, a multiget goes after the joined unit, a request of
    another connection of the same poll: gets only, which any order
    answers alike.)"""
    route, introspect, _ = JOINED_MULTIGETS[name]
    requests = data.draw(st.lists(lone_requests_with_multigets(not introspect),
                                  min_size=2, max_size=10))
    scripted = proxy(tmp_path_factory, config(route, introspect), True)
    seen = []
    for joined in (True, False):
        scripted.modes = {}
        scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
        for key in KEYS[::2]:  # some keys miss
            serve(scripted.stores[LABELS[0]], b"set %s 0 0 5\r\nvalue\r\n" % key)
        outs = (_gathered(scripted, monkeypatch, requests) if joined else
                [_gathered(scripted, monkeypatch, [sent])[0] for sent in requests])
        everything = b"get " + b" ".join(KEYS) + b"\r\n"
        seen.append((outs, serve(scripted.stores[LABELS[0]], everything)))
    assert seen[0] == seen[1]


def test_joined_multigets_take_one_unit(tmp_path_factory, monkeypatch):
    """Multi-key gets and lone gets and sets of one poll to one backend go
    as one unit, each client its own reply."""
    scripted = proxy(tmp_path_factory, config('"a"', False), True)
    scripted.modes, scripted.units = {}, Counter()
    scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
    serve(scripted.stores[LABELS[0]], b"set k1 0 0 1\r\nA\r\n")
    requests = [b"get k1 k2 k1\r\n", b"get k2\r\n", b"set k2 0 0 1\r\nB\r\n",
                b"get k2 k1\r\n"]
    outs = _gathered(scripted, monkeypatch, requests)
    assert outs == [[b"VALUE k1 0 1\r\nA\r\nVALUE k1 0 1\r\nA\r\nEND\r\n"], [b"END\r\n"],
                    [b"STORED\r\n"],
                    [b"VALUE k2 0 1\r\nB\r\nVALUE k1 0 1\r\nA\r\nEND\r\n"]]
    assert scripted.units == {LABELS[0]: 1}


@pytest.mark.parametrize("name, units", [
    ("one backend", {LABELS[0]: 1}),
    ("two backends", {LABELS[2]: 1, LABELS[3]: 1}),
    ("two backends, depth limits", {LABELS[2]: 6, LABELS[3]: 2}),  # each alone
])
def test_joined_lone_requests_take_one_unit_a_backend(tmp_path_factory, monkeypatch, name,
                                                      units):
    scripted = _joined_proxy(tmp_path_factory, name)
    scripted.modes, scripted.units = {}, Counter()
    scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
    requests = [b"get k%d\r\n" % i for i in range(7)] + [b"set k7 0 0 1\r\nA\r\n"]
    outs = _gathered(scripted, monkeypatch, requests)
    assert outs == [[b"END\r\n"]] * 7 + [[b"STORED\r\n"]]
    assert scripted.units == units


def test_shapes_left_to_lua(tmp_path):
    """A failover whose child is not a pool (a hand-written route, a route
    of another shape) runs in Lua; one of one pool is the direct path."""
    for route in ['routes.failover{ "a", function(r) return "END\\r\\n" end }',
                  'routes.failover{ "a", routes.all_sync{ "b", "c" } }']:
        scripted = _engine(tmp_path, route)
        assert not scripted.routes.native
    scripted = _engine(tmp_path, 'routes.failover{ "a" }')
    assert not scripted.routes.native
    assert rq.CMD_GET in scripted.routes.direct.pools


@pytest.mark.parametrize("options, tries", [("", 3), ("count = 2", 2), ("count = 9", 3)])
def test_failover_runner_of_each_command(tmp_path, options, tries):
    """Every command of routes.config's failover gets its runner, trying
    at most ``count`` children."""
    scripted = _engine(tmp_path, f'routes.failover({{ "a", "b", "c" }}, {{ {options} }})')
    runners = scripted.routes.native
    assert {rq.CMD_GET, rq.CMD_SET, rq.CMD_MG, rq.CMD_DELETE} <= set(runners)
    assert all(isinstance(runner, Failover) and runner.tries == tries
               for runner in runners.values())


def test_shuffled_multiget_draws_one_order_per_request(tmp_path):
    """A shuffled failover's multiget tries all its keys on one order of
    the children, drawn per client request: each child comes first for
    about half of 4,000 requests (within 4.5 sigma)."""
    scripted = _engine(tmp_path, 'routes.failover({ "a", "b" }, { shuffle = true })')
    units: list = []
    for backend in scripted.engine.registry.live:
        backend.send_unit = lambda unit, label=backend.label: (
            units.append((label, unit.keys)), unit.fail(FAIL_TIMEOUT, 0))
    firsts: Counter = Counter()
    keys = [b"k1", b"k2", b"k3"]
    for _ in range(4000):
        units.clear()
        out: list[bytes] = []
        assert scripted.engine.route_keys(parse_request(b"get k1 k2 k3\r\n"), keys, out.append)
        assert out == [b"SERVER_ERROR backend failure\r\n" * 3 + b"END\r\n"]
        assert [unit_keys for _, unit_keys in units] == [keys, keys]
        assert {label for label, _ in units} == set(LABELS[:2])
        firsts[units[0][0]] += 1
    sigma = (4000 * 0.25) ** 0.5
    assert all(abs(count - 2000) < 4.5 * sigma for count in firsts.values()), firsts


@pytest.mark.parametrize("miss, expected", [
    (False, b"END\r\n" * 2),  # the await ends at a's miss: b's hit comes too late
    (True, b"VALUE k1 3 11\r\n127.0.0.1:2\r\nEND\r\n" * 2),  # ends at the hit
])
def test_zfailover_await_over_as_in_lua(tmp_path_factory, miss, expected):
    """The local zone (c) fails; the far zones answer in order, a with a
    miss, b with a hit: what the client gets depends on when the body's
    mcp.await is over, natively as in Lua."""
    text = config(f'routes.zfailover({{ za = "a", zb = "b", zc = "c" }}, "zc", '
                  f'{{ miss = {str(miss).lower()} }})')
    chunks = [b"get k1\r\nget k1 k2\r\n"]
    modes = {LABELS[2]: FAIL, LABELS[3]: FAIL}
    held = {LABELS[1]: [b"k1"]}
    for direct in (True, False):
        scripted = proxy(tmp_path_factory, text, direct)
        assert (rq.CMD_GET in scripted.routes.native) is direct
        assert scripted.exchange(modes, held, chunks)[0] == expected


@given(st.binary(max_size=40))
def test_key_fraction_is_the_lua_bodys(key):
    """routes.split's place of a key, in Python as in Lua."""
    assert native_key_fraction(key) == _lua_key_fraction(key)


_LUA = None


def _lua_key_fraction(key: bytes) -> float:
    global _LUA
    if _LUA is None:
        source = (Path(ROUTELIB_PATH).parent / "routes.lua").read_text()
        start = source.index("local function key_fraction(key)")
        end = source.index("\nend\n", start) + 5
        _LUA = LuaRuntime(encoding=None).execute(
            "local string_byte = string.byte\n" + source[start:end] + "\nreturn key_fraction")
    return _LUA(key)


def test_split_multiget_shadows_its_keys(tmp_path):
    """A split's multiget sends every key to the primary's backends and,
    in the background, the shadowed keys to the shadow's, one backend
    multiget each; the answer is the primary's."""
    scripted = _engine(tmp_path, 'routes.split("a", { "c" }, { fraction = 0.5 })')
    scripted.modes = {}
    scripted.stores = {label: Store(clock=lambda: 1.0) for label in LABELS}
    serve(scripted.stores[LABELS[0]], b"set k1 0 0 1\r\nA\r\n")
    lines = []
    for backend in scripted.engine.registry.live:
        def send_unit(unit, settle=backend.send_unit, label=backend.label):
            out: list[bytes] = []
            unit.write(out, [unit], 0)
            lines.append((label, b"".join(out)))
            settle(unit)
        backend.send_unit = send_unit
    keys = [b"k%d" % n for n in range(1, 9)]
    shadowed = [key for key in keys if native_key_fraction(key) < 0.5]
    assert 0 < len(shadowed) < len(keys)
    out: list[bytes] = []
    assert scripted.engine.route_keys(parse_request(b"get " + b" ".join(keys) + b"\r\n"),
                                      keys, out.append)
    assert out == [b"VALUE k1 0 1\r\nA\r\nEND\r\n"]
    shadow_lines = [line for label, line in lines if label in LABELS[2:]]
    assert all(line.startswith(b"get ") for line in shadow_lines)
    assert sorted(b" ".join(line[4:-2] for line in shadow_lines).split()) == sorted(shadowed)
    assert (LABELS[0], b"get " + b" ".join(keys) + b"\r\n") in lines
    assert scripted.stats.req_active == 0
