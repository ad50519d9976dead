"""Listener tags end to end: ``twistd -n mcproxy`` with listeners tagged
``x`` (``tag_x_:``) and ``y`` (``tag[y]:``) beside an untagged one, in
front of real memcached servers.

The differential tests run the same config (tests/e2e/tags/routes.lua, V2
funcgens and a router attached per tag; tests/e2e/tags/routelib.lua, route
library trees per tag) in memcached 1.6.45's proxy with the same three
listeners (``-l tag_x_:...,tag[y]:...,...``) and compare every reply byte
for byte, as tests/e2e/test_v2_differential.py does: the corpus goes to
each listener of one proxy, the servers are flushed, then to the other's.
Skipped, with the reason, where the reference binary cannot run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_v2_differential import ANCHOR, anchor_can_run, ask
from tests.servers import Memcached, Proxy, free_port, wait_for_port

HERE = Path(__file__).resolve().parent / "tags"
ROUTES = HERE / "routes.lua"
ROUTELIB = HERE / "routelib.lua"
LISTENERS = ("x", "y", None)

CORPUS = [
    b"set k 0 0 2\r\nvk\r\n",
    b"get k\r\n",
    b"set b/k 0 0 2\r\nvb\r\n",
    b"get b/k\r\n",
    b"get k b/k\r\n",
    b"get b/k b/none k\r\n",
    b"mg k v\r\n",
    b"mg b/k v\r\n",
    b"ms m 1\r\nm\r\n",
    b"mg m v\r\n",
    b"delete k\r\n",
    b"delete b/k\r\n",
    b"incr n 1\r\n",
    b"touch k 1\r\n",
    b"get k\r\n",
]
FLUSH = b"flush_all\r\n"


def listen_args(ports: dict) -> list[str]:
    """mcproxy's --listen for the tagged listeners of ``ports``, in both
    of memcached's spellings (the untagged one is the Proxy's own)."""
    return [f"--listen=tag_x_:tcp:{ports['x']}:interface=127.0.0.1",
            f"--listen=tag[y]:tcp:{ports['y']}:interface=127.0.0.1"]


def tagged_proxy(*args: str, env: dict, config=ROUTES) -> tuple[Proxy, dict]:
    """A started mcproxy with the three listeners; it and the ports by tag."""
    ports = {"x": free_port(), "y": free_port()}
    proxy = Proxy(config, *listen_args(ports), *args, env=env).start()
    ports[None] = proxy.port
    for port in ports.values():
        wait_for_port(port, proc=proxy.proc)
    return proxy, ports


class TaggedAnchor:
    """memcached 1.6.45's proxy with the same three listeners."""

    def __init__(self, config_option: str, env: dict) -> None:
        self.ports = {tag: free_port() for tag in LISTENERS}
        listeners = ",".join([f"tag_x_:127.0.0.1:{self.ports['x']}",
                              f"tag[y]:127.0.0.1:{self.ports['y']}",
                              f"127.0.0.1:{self.ports[None]}"])
        args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-p", str(free_port()),
                "-l", listeners, "-o", config_option]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for port in self.ports.values():
            wait_for_port(port, proc=self.proc)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_corpus(ports: dict, servers: list[Memcached]) -> dict:
    for server in servers:
        assert server.call(FLUSH) == b"OK\r\n"
    return {(tag, request): ask(ports[tag], request)
            for tag in LISTENERS for request in CORPUS}


@pytest.fixture(scope="module")
def servers():
    a, b = Memcached().start(), Memcached().start()
    yield a, b, {"TAGS_A": str(a.port), "TAGS_B": str(b.port)}
    a.stop()
    b.stop()


def compare(servers, config_option: str, *proxy_args: str, config) -> dict:
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    a, b, extra = servers
    anchor = TaggedAnchor(config_option, {**os.environ, **extra})
    try:
        theirs = run_corpus(anchor.ports, [a, b])
    finally:
        anchor.stop()
    proxy, ports = tagged_proxy(*proxy_args, env=extra, config=config)
    try:
        ours = run_corpus(ports, [a, b])
    finally:
        proxy.stop()
    return {key: (theirs[key], ours[key]) for key in theirs}


CASES = [(tag, request) for tag in LISTENERS for request in CORPUS]
IDS = [f"{tag or 'untagged'}-{request[:24].decode()}" for tag, request in CASES]


@pytest.fixture(scope="module")
def v2_replies(servers):
    return compare(servers, f"proxy_config={ROUTES}", config=ROUTES)


@pytest.fixture(scope="module")
def routelib_replies(servers):
    return compare(servers, f"proxy_config=routelib,proxy_arg={ROUTELIB}",
                   f"--config-arg={ROUTELIB}", config="routelib")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_reply_per_listener_as_memcached_1_6_45(v2_replies, case):
    theirs, ours = v2_replies[case]
    assert ours == theirs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_routelib_same_reply_per_listener_as_memcached_1_6_45(routelib_replies, case):
    theirs, ours = routelib_replies[case]
    assert ours == theirs


def test_the_differential_corpus_tells_the_listeners_apart(v2_replies, routelib_replies):
    """Each listener answers something the others do not, so a proxy that
    served every listener alike could not pass the tests above."""
    for replies in (v2_replies, routelib_replies):
        per_tag = {tag: [replies[(tag, r)][0] for r in CORPUS] for tag in LISTENERS}
        assert len({tuple(answers) for answers in per_tag.values()}) == 3


# -- mcproxy alone: V1 routes, reload, workers, refusals ------------------------

V1 = """
local A, B = %d, %d
function mcp_config_pools()
    return { a = mcp.pool({ mcp.backend("a", "127.0.0.1", A) }),
             b = mcp.pool({ mcp.backend("b", "127.0.0.1", B) }) }
end
function mcp_config_routes(p)
    local a, b = p.a, p.b
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return a(r) end)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return b(r) end, "%s")
end
"""


def placed(servers, key: bytes) -> list[str]:
    """Which of the servers hold ``key``."""
    a, b, _ = servers
    return [name for name, server in (("a", a), ("b", b)) if server.get(key) is not None]


def store_each(ports: dict, prefix: str) -> None:
    for tag, port in ports.items():
        key = f"{prefix}/{tag}".encode()
        assert ask(port, b"set %s 0 0 1\r\nv\r\n" % key) == b"STORED\r\n"


def test_v1_routes_per_listener_and_a_reload_swaps_every_tag(servers):
    a, b, env = servers
    ports = {"x": free_port(), "y": free_port()}
    proxy = Proxy(None, *listen_args(ports), config_text=V1 % (a.port, b.port, "x"),
                  env=env).start()
    ports[None] = proxy.port
    try:
        for port in ports.values():
            wait_for_port(port, proc=proxy.proc)
        store_each(ports, "v1")
        assert [placed(servers, b"v1/%s" % t) for t in (b"x", b"y", b"None")] == [
            ["b"], ["a"], ["a"]]
        Path(proxy.config).write_text(V1 % (a.port, b.port, "y"))
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded route config" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.05)
        store_each(ports, "hup")
        assert [placed(servers, b"hup/%s" % t) for t in (b"x", b"y", b"None")] == [
            ["a"], ["b"], ["a"]]
    finally:
        proxy.stop()


def test_workers_keep_the_listener_tags(servers):
    a, b, env = servers
    ports = {"x": free_port(), "y": free_port()}
    proxy = Proxy(None, *listen_args(ports), "--workers=2",
                  config_text=V1 % (a.port, b.port, "x"), env=env).start()
    ports[None] = proxy.port
    try:
        for port in ports.values():
            wait_for_port(port, proc=proxy.proc)
        deadline = time.monotonic() + 30
        while proxy.log().count(") ready") < 2:
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.05)
        for round_ in range(6):  # connections reach both workers
            store_each(ports, f"w{round_}")
            for tag, where in (("x", ["b"]), ("y", ["a"]), (None, ["a"])):
                assert placed(servers, f"w{round_}/{tag}".encode()) == where
        assert "no routes for listener tag 'y'" in proxy.log()
    finally:
        proxy.stop()


def test_a_bad_listener_tag_stops_twistd_naming_it(tmp_path):
    proxy = Proxy(None, "--listen=tag_waytoolong_:tcp:0").start(wait=False)
    assert proxy.proc.wait(30) != 0
    output = proxy.proc.stdout.read().decode()
    assert "listener tag 'waytoolong' must be 1 to 8 characters" in output


def test_check_accepts_a_tagged_config(servers, tmp_path):
    env = {**os.environ, **servers[2]}
    checked = [subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
               for args in ([sys.executable, "-m", "mcproxy", "check", str(ROUTES)],
                            [sys.executable, "-m", "mcproxy", "check", "routelib",
                             f"--config-arg={ROUTELIB}"])]
    assert [(c.returncode, c.stdout) for c in checked] == [(0, "OK\n"), (0, "OK\n")]


# -- what each refuses at startup, asked of memcached 1.6.45 -----------------------

ATTACH = """
function mcp_config_pools() return {} end
function mcp_config_routes()
    local fg = mcp.funcgen_new()
    fg:ready{ n = "t", f = function() return function() return "SERVER_ERROR t\\r\\n" end end }
    mcp.attach(mcp.CMD_GET, fg, %s)
end
"""


def anchor_startup(tmp_path, listen: str, config: str) -> tuple[int | None, str]:
    """memcached 1.6.45 started with ``-l listen`` and ``config``: its exit
    status (None: it serves) and what it printed."""
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    path = tmp_path / "anchor.lua"
    path.write_text(config)
    args = [str(ANCHOR), "-t", "1", "-U", "0", "-p", str(free_port()), "-l", listen,
            "-o", f"proxy_config={path}"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        status = proc.wait(3)
    except subprocess.TimeoutExpired:
        status = None
        proc.kill()
        proc.wait()
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    return status, output


def our_startup(listen: str, config: str) -> tuple[int | None, str]:
    proxy = Proxy(None, f"--listen={listen}", config_text=config).start(wait=False)
    try:
        status = proxy.proc.wait(30)
    except subprocess.TimeoutExpired:
        status = None
    output = "" if status is None else proxy.proc.stdout.read().decode() + proxy.log()
    proxy.stop()
    return status, output


@pytest.mark.parametrize(("listen", "tag", "theirs", "ours"), [
    ("tag_abcdefghi_:127.0.0.1:%d", '"x"',
     'Listener tags must be between 1 and 8 characters: "abcdefghi"',
     "listener tag 'abcdefghi' must be 1 to 8 characters"),
    ("tag__:127.0.0.1:%d", '"x"',
     'Listener tags must be between 1 and 8 characters: ""',
     "listener tag '' must be 1 to 8 characters"),
    ("tag_x:127.0.0.1:%d", '"x"', 'Invalid tag in socket config: "_x:127.0.0.1:',
     "bad listener tag in 'tag_x:tcp:"),
    ("tag_x_:127.0.0.1:%d", '"abcdefghi"', "mcp.attach: tag must be 1 to 8 characters",
     "mcp.attach: tag must be 1 to 8 characters"),
    ("tag_x_:127.0.0.1:%d", '""', "mcp.attach: tag must be 1 to 8 characters",
     "mcp.attach: tag must be 1 to 8 characters"),
    # 1.6.45 ignores a tag that is not a string: the route serves every listener
    ("tag_x_:127.0.0.1:%d", "true", None, "mcp.attach: tag must be a string, not a boolean"),
], ids=["long listener tag", "empty listener tag", "unclosed listener tag",
        "long attach tag", "empty attach tag", "boolean attach tag"])
def test_what_stops_startup_as_memcached_1_6_45_does(tmp_path, listen, tag, theirs, ours):
    port = free_port()
    status, output = anchor_startup(tmp_path, listen % port, ATTACH % tag)
    if theirs is None:
        assert status is None, output
    else:
        assert status not in (None, 0) and theirs in output
    mine = listen.replace("127.0.0.1:%d", "tcp:%d:interface=127.0.0.1") % port
    status, output = our_startup(mine, ATTACH % tag)
    assert status not in (None, 0) and ours in output, output
