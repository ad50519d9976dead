"""An in-process proxy over the real route engine for tests that compare
the engine's fast Lua paths with the request-by-request reference
(``RouteEngine(batch_keys=False)``): its backends answered by an
embedded-cache Store each, one backend of every config down (each request
to it fails), writes batched per turn and timers run as under the reactor.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport

from mcproxy.backends.pool import BackendRegistry
from mcproxy.cache.store import Store
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.server.protocol import ProxyServerProtocol
from mcproxy.wire.request import parse_request
from mcproxy.writes import batch
from tests.server.memorycore import MemoryCore

#: The backends every config below gets: mcp_config_pools' ``pools.a``
#: (two backends), ``pools.b`` (one) and ``pools.dead`` (one, down).
POOLS = """
function mcp_config_pools()
    local function b(n) return mcp.backend("b" .. n, "127.0.0.1", 10 + n) end
    return {
        a = mcp.pool({ b(1), b(2) }),
        b = mcp.pool({ b(3) }),
        dead = mcp.pool({ mcp.backend{ label = "down", host = "127.0.0.1", port = 19,
                                       down = true } }),
    }
end
"""


class PipeTransport(StringTransport):
    """A StringTransport with the TCP option setters a backend calls."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


def serve(store: Store, data: bytes) -> bytes:
    """What a memcached holding ``store`` answers to the requests ``data``."""
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


class LuaProxy:
    """The proxy's client side over a RouteEngine loaded from ``path``."""

    def __init__(self, path: str, batch_keys: bool) -> None:
        self.clock = MemoryReactorClock()
        self.stats = ProxyStats()
        self.engine = RouteEngine(self.stats, BackendRegistry(self.stats, reactor=self.clock),
                                  Tunables(), UserStats(), batch_keys=batch_keys)
        self.routes = self.engine.load(path)
        self.connections = []
        for backend in self.engine.registry.live:
            if backend.options.down:
                continue
            backend.connect()
            connection = self.clock.tcpClients[-1][2].buildProtocol(None)
            connection.makeConnection(PipeTransport())
            connection.dataReceived(b"VERSION 1.6.18\r\n")
            connection.transport.clear()
            self.connections.append(connection)
        #: what the backends were sent, in the last exchange
        self.sent: list[bytes] = []

    def exchange(self, chunks: list[bytes]) -> bytes:
        """A new client's chunks, each read in a turn of its own, against
        empty backends; what the client got back."""
        return self.exchange_many([chunks])[0]

    def exchange_many(self, streams: list[list[bytes]]) -> list[bytes]:
        """New clients, one per list of chunks: in turn ``i`` each reads its
        chunk ``i`` (as one poll's events), against empty backends; what
        each client got back."""
        stores = [Store(clock=lambda: 1_700_000_000.0) for _ in self.connections]
        pending: list = []
        self.sent = []
        saved, batch.schedule = batch.schedule, pending.append
        try:
            clients = []
            for _ in streams:
                client = ProxyServerProtocol(MemoryCore(self.engine, stats=self.stats))
                client.makeConnection(StringTransport())
                clients.append(client)
            for turn in range(max(map(len, streams))):
                for client, chunks in zip(clients, streams, strict=True):
                    if turn < len(chunks):
                        client.dataReceived(chunks[turn])
                busy = True
                while busy:
                    self.clock.advance(0)
                    while pending:
                        pending.pop(0)()
                    busy = bool(self.clock.getDelayedCalls()) and any(
                        call.getTime() <= self.clock.seconds()
                        for call in self.clock.getDelayedCalls())
                    for connection, store in zip(self.connections, stores, strict=True):
                        sent = connection.transport.value()
                        if sent:
                            busy = True
                            self.sent.append(sent)
                            connection.transport.clear()
                            connection.dataReceived(serve(store, sent))
        finally:
            batch.schedule = saved
        assert self.stats.req_active == 0
        return [client.transport.value() for client in clients]
