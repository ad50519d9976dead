"""End to end: every route of the route library, and every cookbook config in
examples/, against real memcached servers through a real mcproxy process.

Each test checks what the client gets, how long it took when a server is
slow, and what every server holds afterwards. Servers are started once per
module; a "slow" server is one stopped with SIGSTOP (its socket stays open,
it answers nothing), a "down" one a port nothing listens on.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import Memcached, Proxy, exchange, free_port, read_until, wait_for_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Seconds the slow backend may take before its request fails.
SLOW_READ_TIMEOUT = 1.0
#: Seconds the slow server sleeps in tests where it must not time out.
NAP = 0.6
#: Less than NAP: a reply this fast did not wait for the slow server.
QUICK = 0.45

LAB = """
local routes = require("mcproxy.routes")

mcp_config_pools, mcp_config_routes = routes.config{{
    pools = {{
        a = {{ backends = {{ "127.0.0.1:{a}" }} }},
        b = {{ backends = {{ "127.0.0.1:{b}" }} }},
        c = {{ backends = {{ "127.0.0.1:{c}" }} }},
        slow = {{ backends = {{ {{ label = "slow", host = "127.0.0.1", port = {slow},
                                readtimeout = {timeout}, connecttimeout = 1,
                                failurelimit = 1000, retrytimeout = 0.1 }} }} }},
        down = {{ backends = {{ {{ label = "down", host = "127.0.0.1", port = {down},
                                connecttimeout = 0.5, retrytimeout = 0.1 }} }} }},
    }},
    routes = routes.prefix_router{{
        stop = "/",
        map = {{
            direct = routes.direct("a"),
            slowdirect = "slow",
            fo = routes.failover{{ "down", "a", "b" }},
            fomiss = routes.failover({{ "a", "b" }}, {{ miss = true }}),
            foslow = routes.failover{{ "slow", "b" }},
            sync = routes.all_sync{{ "a", "b", "c" }},
            syncdown = routes.all_sync{{ "down", "a" }},
            syncstrict = routes.all_sync({{ "down", "a" }}, {{ strict = true }}),
            syncslow = routes.all_sync{{ "a", "slow" }},
            fast = routes.all_fastest{{ "slow", "a" }},
            fastmiss = routes.all_fastest({{ "a", "b" }}, {{ miss = true }}),
            async = routes.all_async{{ "a", "b", "slow", "down" }},
            split = routes.split("a", "b"),
            splitdown = routes.split("a", "down"),
            splitslow = routes.split("a", "slow"),
            zone = routes.zfailover({{ z1 = "a", z2 = "b", z3 = "c" }}, "z1"),
            zonedown = routes.zfailover({{ z1 = "down", z2 = "b", z3 = "c" }}, "z1"),
            zoneslow = routes.zfailover({{ z1 = "a", z2 = "slow", z3 = "c" }}, "z1"),
            warm = routes.warmup("b", "a"),
            warmdown = routes.warmup("down", "a"),
            ttl = routes.ttl_cap("a", 100),
            null = routes.null(),
        }},
    }},
}}
"""


@pytest.fixture(scope="module")
def lab():
    servers = {name: Memcached().start() for name in ("a", "b", "c", "slow")}
    ports = {name: m.port for name, m in servers.items()}
    text = LAB.format(down=free_port(), timeout=SLOW_READ_TIMEOUT, **ports)
    proxy = Proxy(None, config_text=text).start()
    yield Lab(proxy, servers)
    proxy.stop()
    for m in servers.values():
        m.resume()
        m.stop()


class Lab:
    def __init__(self, proxy: Proxy, servers: dict[str, Memcached]) -> None:
        self.proxy = proxy
        self.servers = servers

    def call(self, request: bytes, expected: bytes) -> bytes:
        """Send a request through the proxy; the reply (as long as expected)."""
        with self.proxy.connect() as s:
            return exchange(s, request, expected)

    def timed(self, request: bytes, expected: bytes) -> tuple[bytes, float]:
        began = time.monotonic()
        reply = self.call(request, expected)
        return reply, time.monotonic() - began

    def holds(self, key: bytes) -> dict[str, bytes | None]:
        """What each server (slow and down excepted) holds for key."""
        return {name: self.servers[name].get(key) for name in ("a", "b", "c")}

    def put(self, server: str, key: bytes, value: bytes, flags: int = 0,
            exptime: int = 0) -> None:
        """Store straight into one server, bypassing the proxy."""
        line = b"set %s %d %d %d\r\n%s\r\n" % (key, flags, exptime, len(value), value)
        assert self.servers[server].call(line) == b"STORED\r\n"

    @contextmanager
    def slow(self, resume_after: float | None = None):
        """Make the slow server stop answering for the duration of the
        block (or, with resume_after, for that many seconds)."""
        # connected first: a paused server would fail the connect phase
        assert self.call(b"get slowdirect/ping\r\n", b"END\r\n") == b"END\r\n"
        server = self.servers["slow"]
        server.pause()
        timer = None
        if resume_after is not None:
            timer = threading.Timer(resume_after, server.resume)
            timer.start()
        try:
            yield server
        finally:
            if timer is not None:
                timer.join()
            server.resume()


def eventually(check, timeout: float = 3.0):
    """Poll check() until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


STORED = b"STORED\r\n"
MISS = b"END\r\n"
FAILURE = b"SERVER_ERROR backend failure\r\n"


def hit(key: bytes, value: bytes, flags: int = 0) -> bytes:
    return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(value), value)


def meta(server: Memcached, key: bytes) -> bytes:
    """The flags and remaining TTL a server has for key (mg f t)."""
    return server.call(b"mg " + key + b" f t\r\n")


# -- direct ----------------------------------------------------------------------

def test_direct(lab):
    assert lab.call(b"set direct/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"direct/k") == {"a": b"v1", "b": None, "c": None}
    assert lab.call(b"get direct/k\r\n", hit(b"direct/k", b"v1")) == hit(b"direct/k", b"v1")


# -- failover ---------------------------------------------------------------------

def test_failover_skips_a_pool_that_is_down(lab):
    assert lab.call(b"set fo/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"fo/k") == {"a": b"v1", "b": None, "c": None}
    assert lab.call(b"get fo/k\r\n", hit(b"fo/k", b"v1")) == hit(b"fo/k", b"v1")
    assert lab.call(b"get fo/none\r\n", MISS) == MISS  # a's miss is an answer


def test_failover_on_miss(lab):
    lab.put("b", b"fomiss/k", b"inb")
    assert lab.call(b"get fomiss/k\r\n", hit(b"fomiss/k", b"inb")) == hit(b"fomiss/k", b"inb")
    assert lab.call(b"get fomiss/none\r\n", MISS) == MISS
    assert lab.call(b"set fomiss/k2 0 0 1\r\nx\r\n", STORED) == STORED  # a stored it: done
    assert lab.holds(b"fomiss/k2") == {"a": b"x", "b": None, "c": None}


def test_failover_from_a_slow_pool(lab):
    lab.put("b", b"foslow/k", b"inb")
    with lab.slow():
        reply, took = lab.timed(b"get foslow/k\r\n", hit(b"foslow/k", b"inb"))
    assert reply == hit(b"foslow/k", b"inb")
    assert SLOW_READ_TIMEOUT * 0.8 <= took < SLOW_READ_TIMEOUT + 5


# -- all_sync ----------------------------------------------------------------------

def test_all_sync_writes_everywhere(lab):
    assert lab.call(b"set sync/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"sync/k") == {"a": b"v1", "b": b"v1", "c": b"v1"}
    assert lab.call(b"delete sync/k\r\n", b"DELETED\r\n") == b"DELETED\r\n"
    assert lab.holds(b"sync/k") == {"a": None, "b": None, "c": None}
    # reads ask every pool too, and take a hit over a miss
    lab.put("c", b"sync/c", b"inc")
    assert lab.call(b"get sync/c\r\n", hit(b"sync/c", b"inc")) == hit(b"sync/c", b"inc")


def test_all_sync_cas_against_replicas_with_different_uniques(lab):
    """Replicas that missed a write hand out other cas uniques: gets and cas
    both go to the primary (a), which decides, and the new value is copied
    to every replica."""
    for server, missed in (("a", 0), ("b", 1), ("c", 2)):
        for _ in range(missed):  # writes the others did not see: other uniques
            lab.put(server, b"sync/other", b"x")
        lab.put(server, b"sync/cas", b"old")
    with lab.proxy.connect() as s:
        s.sendall(b"gets sync/cas\r\n")
        reply = read_until(s, b"END\r\n")
        unique = int(reply.split(b"\r\n")[0].split()[-1])
        assert reply.startswith(b"VALUE sync/cas 0 3 %d\r\nold" % unique)
        request = b"cas sync/cas 0 0 3 %d\r\nnew\r\n" % unique
        assert exchange(s, request, STORED) == STORED
        assert exchange(s, request, b"EXISTS\r\n") == b"EXISTS\r\n"
    assert eventually(lambda: lab.holds(b"sync/cas") == {"a": b"new", "b": b"new",
                                                          "c": b"new"})


def test_all_sync_with_a_pool_down(lab):
    assert lab.call(b"set syncdown/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"syncdown/k")["a"] == b"v1"
    # strict: the failure is the answer, although a stored it
    assert lab.call(b"set syncstrict/k 0 0 2\r\nv2\r\n", FAILURE) == FAILURE
    assert lab.holds(b"syncstrict/k")["a"] == b"v2"


def test_all_sync_waits_for_a_slow_pool(lab):
    with lab.slow(resume_after=NAP):
        reply, took = lab.timed(b"set syncslow/k 0 0 2\r\nv1\r\n", STORED)
    assert reply == STORED
    assert took >= NAP - 0.05
    assert lab.servers["slow"].get(b"syncslow/k") == b"v1"
    assert lab.holds(b"syncslow/k")["a"] == b"v1"


# -- all_fastest --------------------------------------------------------------------

def test_all_fastest_does_not_wait_for_a_slow_pool(lab):
    with lab.slow(resume_after=NAP):
        reply, took = lab.timed(b"set fast/k 0 0 2\r\nv1\r\n", STORED)
        assert reply == STORED
        assert took < QUICK
    assert lab.holds(b"fast/k")["a"] == b"v1"
    # the slow server got the set too, and stored it once it woke up
    assert eventually(lambda: lab.servers["slow"].get(b"fast/k")) == b"v1"


def test_all_fastest_miss_waits_for_the_hit(lab):
    lab.put("b", b"fastmiss/k", b"inb")
    assert lab.call(b"get fastmiss/k\r\n", hit(b"fastmiss/k", b"inb")) == \
        hit(b"fastmiss/k", b"inb")
    assert lab.call(b"get fastmiss/none\r\n", MISS) == MISS


# -- all_async -----------------------------------------------------------------------

def test_all_async_answers_from_the_first_and_writes_the_rest_later(lab):
    with lab.slow(resume_after=NAP):
        reply, took = lab.timed(b"set async/k 0 0 2\r\nv1\r\n", STORED)
        assert reply == STORED and took < QUICK
    assert lab.holds(b"async/k")["a"] == b"v1"
    assert eventually(lambda: lab.servers["b"].get(b"async/k")) == b"v1"
    assert eventually(lambda: lab.servers["slow"].get(b"async/k")) == b"v1"
    assert lab.holds(b"async/k")["c"] is None


# -- split -------------------------------------------------------------------------

def test_split_shadows_writes_and_reads(lab):
    assert lab.call(b"set split/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert eventually(lambda: lab.servers["b"].get(b"split/k")) == b"v1"
    assert lab.holds(b"split/k") == {"a": b"v1", "b": b"v1", "c": None}
    lab.servers["b"].call(b"set split/k 0 0 6\r\nshadow\r\n")
    # the client only ever sees the primary
    assert lab.call(b"get split/k\r\n", hit(b"split/k", b"v1")) == hit(b"split/k", b"v1")


def test_split_with_the_shadow_down_or_slow(lab):
    assert lab.call(b"set splitdown/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"splitdown/k")["a"] == b"v1"
    with lab.slow(resume_after=NAP):
        reply, took = lab.timed(b"set splitslow/k 0 0 2\r\nv2\r\n", STORED)
        assert reply == STORED and took < QUICK
    assert eventually(lambda: lab.servers["slow"].get(b"splitslow/k")) == b"v2"


# -- zfailover ---------------------------------------------------------------------

def test_zfailover_reads_the_local_zone_then_the_others(lab):
    assert lab.call(b"set zone/k 0 0 2\r\nv1\r\n", STORED) == STORED
    assert lab.holds(b"zone/k") == {"a": b"v1", "b": None, "c": None}  # local only
    lab.put("c", b"zone/far", b"inc")
    assert lab.call(b"get zone/far\r\n", hit(b"zone/far", b"inc")) == hit(b"zone/far", b"inc")
    assert lab.call(b"get zone/none\r\n", MISS) == MISS


def test_zfailover_with_the_local_zone_down(lab):
    lab.put("b", b"zonedown/k", b"inb")
    assert lab.call(b"get zonedown/k\r\n", hit(b"zonedown/k", b"inb")) == \
        hit(b"zonedown/k", b"inb")
    assert lab.call(b"get zonedown/none\r\n", MISS) == MISS
    assert lab.call(b"set zonedown/w 0 0 1\r\nx\r\n", STORED) == STORED
    assert lab.holds(b"zonedown/w") in ({"a": None, "b": b"x", "c": None},
                                        {"a": None, "b": None, "c": b"x"},
                                        {"a": None, "b": b"x", "c": b"x"})


def test_zfailover_does_not_wait_for_a_slow_remote_zone(lab):
    lab.put("c", b"zoneslow/k", b"inc")
    with lab.slow(resume_after=NAP):
        reply, took = lab.timed(b"get zoneslow/k\r\n", hit(b"zoneslow/k", b"inc"))
        assert reply == hit(b"zoneslow/k", b"inc") and took < QUICK


# -- warmup ------------------------------------------------------------------------

def test_warmup_copies_from_warm_with_flags_and_ttl(lab):
    lab.put("a", b"warm/k", b"old", flags=5, exptime=1000)
    assert lab.holds(b"warm/k") == {"a": b"old", "b": None, "c": None}
    assert lab.call(b"get warm/k\r\n", hit(b"warm/k", b"old", 5)) == hit(b"warm/k", b"old", 5)
    assert lab.holds(b"warm/k") == {"a": b"old", "b": b"old", "c": None}
    flags, ttl = meta(lab.servers["b"], b"warm/k").split()[1:]
    assert flags == b"f5" and 990 <= int(ttl[1:]) <= 1000
    # cold has it now: gets answers with cold's cas
    reply = lab.call(b"gets warm/k\r\n", b"VALUE warm/k 5 3 1\r\nold\r\nEND\r\n")
    cas = reply.split(b"\r\n")[0].split()[4]
    cold_cas = lab.servers["b"].call(b"gets warm/k\r\n", b"END\r\n").split(b"\r\n")[0].split()[4]
    assert cas == cold_cas


def test_warmup_mg_and_never_expiring_items(lab):
    lab.put("a", b"warm/m", b"xyz", flags=3)
    reply = lab.call(b"mg warm/m v f t k\r\n", b"VA 3 f3 t-1 kwarm/m\r\nxyz\r\n")
    assert reply == b"VA 3 f3 t-1 kwarm/m\r\nxyz\r\n"
    assert meta(lab.servers["b"], b"warm/m") == b"HD f3 t-1\r\n"


def test_warmup_miss_everywhere_writes_nothing(lab):
    assert lab.call(b"get warm/none\r\n", MISS) == MISS
    assert lab.holds(b"warm/none") == {"a": None, "b": None, "c": None}


def test_warmup_writes_go_to_cold_deletes_to_both(lab):
    assert lab.call(b"set warm/w 0 0 3\r\nnew\r\n", STORED) == STORED
    assert lab.holds(b"warm/w") == {"a": None, "b": b"new", "c": None}
    lab.put("a", b"warm/d", b"old")
    lab.put("b", b"warm/d", b"new")
    assert lab.call(b"delete warm/d\r\n", b"DELETED\r\n") == b"DELETED\r\n"
    assert eventually(lambda: lab.holds(b"warm/d") == {"a": None, "b": None, "c": None})
    assert lab.call(b"get warm/d\r\n", MISS) == MISS  # cannot come back from warm


def test_warmup_with_cold_down_reads_warm(lab):
    lab.put("a", b"warmdown/k", b"old")
    assert lab.call(b"get warmdown/k\r\n", hit(b"warmdown/k", b"old")) == \
        hit(b"warmdown/k", b"old")
    assert lab.call(b"set warmdown/k 0 0 1\r\nx\r\n", FAILURE) == FAILURE
    assert lab.holds(b"warmdown/k")["a"] == b"old"


# -- ttl_cap -------------------------------------------------------------------------

def test_ttl_cap(lab):
    assert lab.call(b"set ttl/forever 0 0 1\r\nx\r\n", STORED) == STORED
    assert lab.call(b"set ttl/short 0 50 1\r\nx\r\n", STORED) == STORED
    assert lab.call(b"ms ttl/meta 1 T5000\r\nx\r\n", b"HD\r\n") == b"HD\r\n"
    far = int(time.time()) + 100000
    assert lab.call(b"set ttl/abs 0 %d 1\r\nx\r\n" % far, STORED) == STORED
    a = lab.servers["a"]
    for key, low, high in ((b"ttl/forever", 95, 100), (b"ttl/short", 45, 50),
                           (b"ttl/meta", 95, 100), (b"ttl/abs", 95, 100)):
        ttl = int(meta(a, key).split()[2][1:])
        assert low <= ttl <= high, key
    assert lab.holds(b"ttl/forever") == {"a": b"x", "b": None, "c": None}


# -- null -------------------------------------------------------------------------------

def test_null_answers_without_a_backend(lab):
    assert lab.call(b"set null/k 0 0 1\r\nx\r\n", STORED) == STORED
    assert lab.call(b"get null/k\r\n", MISS) == MISS
    assert lab.call(b"delete null/k\r\n", b"NOT_FOUND\r\n") == b"NOT_FOUND\r\n"
    assert lab.call(b"mg null/k v O7 k\r\n", b"EN O7 knull/k\r\n") == b"EN O7 knull/k\r\n"
    assert lab.holds(b"null/k") == {"a": None, "b": None, "c": None}


def test_null_inside_a_multiget(lab):
    lab.call(b"set direct/mg 0 0 2\r\nhi\r\n", STORED)
    expected = b"VALUE direct/mg 0 2\r\nhi\r\nEND\r\n"
    with lab.proxy.connect() as s:
        s.sendall(b"get null/a direct/mg null/b\r\nmn\r\n")
        assert read_until(s, b"MN\r\n") == expected + b"MN\r\n"


# -- introspection -----------------------------------------------------------------

def introspect(proxy: Proxy, command: str, key: str) -> list[str]:
    name = f"__mcproxy__.route({command},{key})".encode()
    with proxy.connect() as s:
        s.sendall(b"get " + name + b"\r\n")
        reply = read_until(s, b"END\r\n")
    header, _, rest = reply.partition(b"\r\n")
    assert header.startswith(b"VALUE " + name + b" 0 "), reply
    return rest[: int(header.split()[-1])].decode().split("\r\n")


def test_introspection_through_the_proxy(lab):
    a, b, c = (f"127.0.0.1:{lab.servers[n].port}" for n in "abc")
    assert introspect(lab.proxy, "set", "sync/k") == [
        f"prefix_router[sync] > all_sync[{i}] > {name} > {label}"
        for i, (name, label) in enumerate((("a", a), ("b", b), ("c", c)), 1)]
    assert introspect(lab.proxy, "get", "warm/k") == [
        f"prefix_router[warm] > warmup[cold] > b > {b}",
        f"prefix_router[warm] > warmup[warm] > a > {a}"]
    assert introspect(lab.proxy, "get", "nope/k") == ["prefix_router[default] > no_route"]


# -- the cookbook: examples/*.lua ---------------------------------------------------

def servers_env(**groups: list[Memcached]) -> dict[str, str]:
    return {name: ",".join(f"127.0.0.1:{m.port}" for m in ms) for name, ms in groups.items()}


@pytest.fixture(scope="module")
def cookbook():
    """Every example with servers of its own, and its proxy."""
    started: list[Memcached] = []

    def servers(n: int) -> list[Memcached]:
        ms = [Memcached().start() for _ in range(n)]
        started.extend(ms)
        return ms

    setups = {
        "replicated_zones": dict(ZONE_A=servers(2), ZONE_B=servers(1), ZONE_C=servers(1)),
        "gutter": dict(MAIN=servers(2), GUTTER=servers(1)),
        "shadow": dict(CURRENT=servers(1), NEW=servers(1)),
        "warmup": dict(NEW=servers(1), OLD=servers(1)),
        "tenants": dict(ACME=servers(2), SHARED=servers(1)),
    }
    extra = {"replicated_zones": {"LOCAL_ZONE": "a"}, "gutter": {"GUTTER_TTL": "30"},
             "tenants": {"TRIAL_TTL": "60"}}
    proxies = {}
    for name, groups in setups.items():
        env = servers_env(**groups) | extra.get(name, {})
        proxies[name] = (Proxy(EXAMPLES / f"{name}.lua", env=env).start(wait=False), groups)
    for proxy, _ in proxies.values():
        wait_for_port(proxy.port, proc=proxy.proc)
    yield proxies
    for proxy, _ in proxies.values():
        proxy.stop()
    for m in started:
        m.stop()


def through(proxy: Proxy, request: bytes, expected: bytes) -> bytes:
    with proxy.connect() as s:
        return exchange(s, request, expected)


def held(servers: list[Memcached], key: bytes) -> list[bytes | None]:
    return [m.get(key) for m in servers]


def test_cookbook_replicated_zones(cookbook):
    proxy, zones = cookbook["replicated_zones"]
    assert through(proxy, b"set user:1 0 0 3\r\nbob\r\n", STORED) == STORED
    assert sorted(held(zones["ZONE_A"], b"user:1"), key=bool) == [None, b"bob"]
    assert held(zones["ZONE_B"], b"user:1") == [b"bob"]
    assert held(zones["ZONE_C"], b"user:1") == [b"bob"]
    # the local zone lost it: the other zones answer
    for m in zones["ZONE_A"]:
        m.call(b"delete user:1\r\n")
    assert through(proxy, b"get user:1\r\n", hit(b"user:1", b"bob")) == hit(b"user:1", b"bob")
    # a zone down: writes still succeed, the others hold them
    zone_c = zones["ZONE_C"][0]
    zone_c.stop()
    try:
        assert through(proxy, b"set user:2 0 0 3\r\namy\r\n", STORED) == STORED
        assert b"amy" in held(zones["ZONE_A"], b"user:2")
        assert held(zones["ZONE_B"], b"user:2") == [b"amy"]
        assert through(proxy, b"get user:2\r\n", hit(b"user:2", b"amy")) == \
            hit(b"user:2", b"amy")
    finally:
        zone_c.start()
    a1, a2 = (f"127.0.0.1:{m.port}" for m in zones["ZONE_A"])
    lines = introspect(proxy, "get", "user:1")
    assert lines[0] in (f"by_command[reads] > zfailover[local:a] > zones.a > {a1}",
                        f"by_command[reads] > zfailover[local:a] > zones.a > {a2}")
    assert [line.split(" > ")[2] for line in lines[1:]] == ["zones.b", "zones.c"]


def test_cookbook_gutter(cookbook):
    proxy, pools = cookbook["gutter"]
    main, [gutter] = pools["MAIN"], pools["GUTTER"]
    assert through(proxy, b"set page:1 0 0 2\r\nv1\r\n", STORED) == STORED
    owner = held(main, b"page:1").index(b"v1")
    assert gutter.get(b"page:1") is None
    main[owner].stop()
    try:
        # the owner is down: writes and reads go to the gutter, with a short TTL
        assert through(proxy, b"set page:1 0 0 2\r\nv2\r\n", STORED) == STORED
        assert gutter.get(b"page:1") == b"v2"
        ttl = int(meta(gutter, b"page:1").split()[2][1:])
        assert 25 <= ttl <= 30
        assert through(proxy, b"get page:1\r\n", hit(b"page:1", b"v2")) == hit(b"page:1", b"v2")
    finally:
        main[owner].start()
    # back (a fresh, empty server): once the proxy has retried it, the main
    # pool answers again, and the gutter keeps its copy until it expires
    assert eventually(lambda: through(proxy, b"get page:1\r\n", MISS) == MISS, timeout=5)
    assert through(proxy, b"set page:1 0 0 2\r\nv3\r\n", STORED) == STORED
    assert main[owner].get(b"page:1") == b"v3"
    assert gutter.get(b"page:1") == b"v2"


def test_cookbook_shadow(cookbook):
    proxy, pools = cookbook["shadow"]
    [current], [new] = pools["CURRENT"], pools["NEW"]
    assert through(proxy, b"set s:1 0 0 2\r\nv1\r\n", STORED) == STORED
    assert current.get(b"s:1") == b"v1"
    assert eventually(lambda: new.get(b"s:1")) == b"v1"
    new.call(b"delete s:1\r\n")
    assert through(proxy, b"get s:1\r\n", hit(b"s:1", b"v1")) == hit(b"s:1", b"v1")
    new.stop()
    try:
        assert through(proxy, b"set s:2 0 0 2\r\nv2\r\n", STORED) == STORED
        assert current.get(b"s:2") == b"v2"
    finally:
        new.start()


def test_cookbook_warmup(cookbook):
    proxy, pools = cookbook["warmup"]
    [new], [old] = pools["NEW"], pools["OLD"]
    old.call(b"set profile:9 12 600 5\r\nalice\r\n")
    expected = hit(b"profile:9", b"alice", 12)
    assert through(proxy, b"get profile:9\r\n", expected) == expected
    assert new.get(b"profile:9") == b"alice"
    assert meta(new, b"profile:9").split()[1] == b"f12"
    assert 590 <= int(meta(new, b"profile:9").split()[2][1:]) <= 600
    assert through(proxy, b"set fresh 0 0 1\r\nx\r\n", STORED) == STORED
    assert (new.get(b"fresh"), old.get(b"fresh")) == (b"x", None)


def test_cookbook_tenants(cookbook):
    proxy, pools = cookbook["tenants"]
    acme, [shared] = pools["ACME"], pools["SHARED"]
    assert through(proxy, b"set acme:1 0 0 1\r\na\r\n", STORED) == STORED
    assert held(acme, b"acme:1") == [b"a", b"a"] and shared.get(b"acme:1") is None
    acme[0].call(b"delete acme:1\r\n")
    assert through(proxy, b"get acme:1\r\n", hit(b"acme:1", b"a")) == hit(b"acme:1", b"a")
    assert through(proxy, b"set globex:1 0 0 1\r\ng\r\n", STORED) == STORED
    assert shared.get(b"globex:1") == b"g" and held(acme, b"globex:1") == [None, None]
    assert through(proxy, b"set trial:1 0 0 1\r\nt\r\n", STORED) == STORED
    assert 55 <= int(meta(shared, b"trial:1").split()[2][1:]) <= 60
    no_route = b"SERVER_ERROR no route\r\n"
    assert through(proxy, b"get initech:1\r\n", no_route) == no_route
    r1, r2 = (f"127.0.0.1:{m.port}" for m in acme)
    assert introspect(proxy, "set", "acme:1") == [
        f"prefix_router[acme] > by_command[writes] > all_sync[r1] > acme.r1 > {r1}",
        f"prefix_router[acme] > by_command[writes] > all_sync[r2] > acme.r2 > {r2}"]
