"""Fixtures shared by the suite: real memcached servers on free ports."""

from __future__ import annotations

import pytest

from .routing import engine, load  # noqa: F401  (fixtures)
from .servers import Memcached


@pytest.fixture
def memcached_factory():
    """Start any number of memcached servers; all are killed afterwards."""
    started: list[Memcached] = []

    def start(**kwargs) -> Memcached:
        server = Memcached(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def memcached(memcached_factory) -> Memcached:
    """One memcached server on a free loopback port."""
    return memcached_factory()


@pytest.fixture(autouse=True)
def immediate_writes(monkeypatch):
    """In-process tests drive protocols by hand: write at once instead of
    at the end of a reactor iteration that never comes."""
    from mcproxy.protocols.writes import batch

    monkeypatch.setattr(batch, "schedule", lambda f: f())
