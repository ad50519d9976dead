"""ProxyService as its client connections see it: an IProxyCore."""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mcproxy.app.service import VERSION, ProxyService
from mcproxy.cache.store import Store
from mcproxy.server.interfaces import IProxyCore, IRouter
from mcproxy.wire import errors
from mcproxy.wire.request import parse_request
from tests.server.memorycore import MemoryCore


def test_the_service_and_the_memory_core_provide_the_interface():
    service = ProxyService(None, [], reactor=Clock())
    assert verifyObject(IProxyCore, service)
    assert verifyObject(IRouter, service.router, tentative=True)  # the RouteEngine
    assert service.clock is service.reactor and service.factory.core is service
    assert verifyObject(IProxyCore, MemoryCore(service.router))


def test_local_answers():
    clock = Clock()
    bare = ProxyService(None, [], reactor=clock)
    cached = ProxyService(None, [], reactor=clock, store=Store())
    assert bare.answer(parse_request(b"version\r\n")) == f"VERSION {VERSION}\r\n".encode()
    assert bare.answer(parse_request(b"stats settings\r\n")) == bare.stats_reply([b"settings"])
    assert bare.answer(parse_request(b"get k\r\n")) == errors.NO_ROUTE
    assert cached.answer(parse_request(b"get k\r\n")) == b"END\r\n"
