"""bench/opcodes.py counts what the proxy runs for right replies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mcproxy import writes

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


@pytest.mark.parametrize(("multiget", "framing"), [(1, "wire/response.py:_plain_end"),
                                                   (10, "wire/response.py:_multi_end")])
def test_counts_the_path_of_plain_runs(opcodes, multiget, framing):
    ops = opcodes.count(opcodes.Proxy(3, multiget), 2)
    for name in ("server/protocol.py:_process", "wire/request.py:scan_plain",
                 "routing/engine.py:route_run", "units.py:read", framing):
        assert ops[name] > 0, name
    assert not any(name.startswith(("opcodes.py:", "testing.py:")) for name in ops)
    assert 200 < sum(ops.values()) / 6 < 5000


def test_a_wrong_reply_stops_the_count(opcodes):
    proxy = opcodes.Proxy(3, 1)
    answer = proxy.backend.dataReceived
    # The backend answers the first client's get with another key's value.
    proxy.backend.dataReceived = lambda data: answer(data.replace(b"key:000000", b"key:000009"))
    with pytest.raises(AssertionError, match="a client got"):
        proxy.round()
