"""Helpers for route-engine tests: load a config from text, run requests
through it, and answer backend requests without a network."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet.testing import MemoryReactorClock

from mcproxy.backends.pool import BackendRegistry
from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.wire.request import parse_request
from mcproxy.wire.response import parse_response


@pytest.fixture
def engine():
    """A route engine with an embedded cache; backends never connect."""
    stats = ProxyStats()
    registry = BackendRegistry(stats, reactor=MemoryReactorClock())
    return RouteEngine(stats, registry, Tunables(), UserStats(), store=Store())


@pytest.fixture
def load(engine, tmp_path):
    def load(text: str):
        path = tmp_path / "route.lua"
        path.write_text(textwrap.dedent(text))
        return engine.load(str(path))
    return load


def start(engine, line: bytes, value: bytes | None = None) -> list[bytes]:
    """Route a request; the list receives its reply when there is one."""
    req = parse_request(line)
    req.value = value
    out: list[bytes] = []
    engine.route(req, out.append)
    return out


def run(engine, line: bytes, value: bytes | None = None) -> bytes:
    """Route a request that is answered at once; its reply."""
    [reply] = start(engine, line, value)
    return reply


class FakeBackends:
    """Stands in for every backend of the engine's registry.

    Each backend answers at once from ``replies`` (label -> reply bytes,
    default a miss), or, with ``hold=True``, keeps requests in ``pending``
    until the test calls :meth:`answer`.
    """

    def __init__(self, engine, replies=None, hold: bool = False):
        self.sent: list[tuple[str, bytes]] = []
        self.pending: list[tuple[str, object]] = []
        self.replies = replies or {}
        self.hold = hold
        for backend in engine.registry.live:
            backend.send = self.sender(backend.label)

    def sender(self, label):
        def send(req, callback):
            self.sent.append((label, req.wire()))
            if self.hold:
                self.pending.append((label, callback))
            else:
                callback(self.parse(self.replies.get(label, b"END\r\n")))
        return send

    @staticmethod
    def parse(data: bytes):
        res, _ = parse_response(data)
        return res

    def answer(self, label: str, data: bytes) -> None:
        """Answer the oldest pending request sent to ``label``."""
        for i, (pending_label, callback) in enumerate(self.pending):
            if pending_label == label:
                del self.pending[i]
                callback(self.parse(data))
                return
        raise AssertionError(f"nothing pending for {label}")
