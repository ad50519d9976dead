"""bench/opcodes.py and bench/loop_opcodes.py count what the proxy runs for
right replies."""

from __future__ import annotations

import gc
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcproxy import compiled, writes

_PATH = Path(__file__).resolve().parents[2] / "bench" / "opcodes.py"


@pytest.fixture
def opcodes(monkeypatch):
    """The tool as a module; what it sets globally is put back after."""
    monkeypatch.setattr(writes.batch, "schedule", writes.batch.schedule)
    monkeypatch.setenv("MCPROXY_BENCH_BACKEND_PORT", "11211")
    spec = importlib.util.spec_from_file_location("bench_opcodes", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("multiget", [1, 10])
def test_counts_the_path_of_plain_runs(opcodes, multiget):
    ops = opcodes.count(opcodes.Proxy(3, multiget), 2)
    # (where a compiler is, the framing loops inside read_raw, the scan, the
    # protocol and the units are compiled: then they run no opcodes)
    names = []
    running = compiled.running()
    for module, name in [("mcproxy.routing.runs", "routing/runs.py:route_run"),
                         ("mcproxy.wire.reader", "wire/reader.py:read_raw"),
                         ("mcproxy.server.protocol", "server/protocol.py:_process"),
                         ("mcproxy.wire._frames", "wire/request.py:scan_plain"),
                         ("mcproxy.units", "units.py:read")]:
        if module not in running:
            names.append(name)
    for name in names:
        assert ops[name] > 0, name
    assert not any(name.startswith(("opcodes.py:", "testing.py:")) for name in ops)
    assert 50 < sum(ops.values()) / 6 < 5000


def test_a_wrong_reply_stops_the_count(opcodes):
    proxy = opcodes.Proxy(3, 1)
    answer = proxy.answer
    # The backend answers the first client's get with another key's value.
    proxy.answer = lambda sent: answer(sent).replace(b"key:000000", b"key:000009")
    with pytest.raises(AssertionError, match="a client got"):
        proxy.round()


@pytest.mark.parametrize("multiget", [1, 10])
def test_counts_the_lua_path(opcodes, multiget):
    """A route written in Lua: each key is routed by Lua, and the per-key
    gets the proxy merges into one backend get are answered as sent."""
    route = _PATH.parent / "route_lua.lua"
    ops = opcodes.count(opcodes.Proxy(3, multiget, route), 2)
    # a get or multiget alone in its read is gathered with the other
    # clients' (three clients: a crowded poll), the multigets' keys routed
    # together: every key's route returns the answer it got, so all settle
    # as one, and each multiget gets its keys' replies at once
    assert ops["routing/engine.py:settle_own"] > 0
    assert "routing/engine.py:settle" not in ops
    assert ops["routing/engine.py:route_lua_gathered"] > 0
    assert ("routing/engine.py:_answer_multigets" in ops) == (multiget > 1)
    # scanned, not parsed, and routed from the gathering, not the scan
    assert "wire/request.py:parse_request" not in ops
    assert "routing/engine.py:route_lua_run" not in ops


def test_keys_nobody_asked_for_stop_the_count(opcodes):
    proxy = opcodes.Proxy(3, 1)
    proxy.keys[1] = b"key:000009"
    with pytest.raises(AssertionError, match="the backend was sent"):
        proxy.round()


@pytest.mark.parametrize("option", ["--time", "--profile"])
def test_times_the_rounds(opcodes, capsys, option):
    threshold = gc.get_threshold()
    try:
        assert opcodes.main(["--clients", "2", "--rounds", "2", "--repeat", "1", option]) == 0
    finally:
        gc.set_threshold(*threshold)
    out = capsys.readouterr().out
    assert ("us CPU per request" in out) if option == "--time" else ("function calls" in out)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_counts_only_the_measured_rounds():
    """bench/instructions.py: each two more rounds add the same count, so
    the difference it divides is the rounds' alone."""
    spec = importlib.util.spec_from_file_location("bench_instructions",
                                                  _PATH.parent / "instructions.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    route = _PATH.parent / "route.lua"
    two, four, six = (tool.collected(3, 1, 1, route, rounds) for rounds in (2, 4, 6))
    assert 10_000 < four - two < 10_000_000
    assert abs((six - four) - (four - two)) < (four - two) / 10


def test_the_loop_count_includes_the_reactor():
    """bench/loop_opcodes.py: a real reactor against a real memcached, one
    connection, every reply checked; the reactor's loop is in the count."""
    out = subprocess.run([sys.executable, str(_PATH.parent / "loop_opcodes.py"),
                          "--requests", "50", "--top", "40"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    first, *rows = out.splitlines()
    assert first.endswith("(1 connections x 50 gets, one in flight each, route route.lua)")
    per_request = int(first.split()[0])
    ops = {row.split()[1]: float(row.split()[0]) for row in rows}
    assert ops["reactor.py:doPoll"] > 0 and ops["reactor.py:_iterate"] > 0
    assert not any(name.startswith("loop_opcodes.py:") for name in ops)
    assert 100 < per_request < 5000
