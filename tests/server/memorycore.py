"""An IProxyCore in memory, for the client protocol's unit tests."""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface import implementer

from mcproxy.counters import ProxyStats
from mcproxy.server.interfaces import IProxyCore
from mcproxy.wire import errors
from mcproxy.wire.request import CMD_STATS, CMD_VERSION

#: What ``version`` answers here.
VERSION_LINE = b"VERSION test\r\n"


def echo_stats(args: list[bytes]) -> bytes:
    """A ``stats`` reply that shows its arguments."""
    return b"STATS " + b" ".join(args) + b"\r\nEND\r\n"


@implementer(IProxyCore)
class MemoryCore:
    """The test's ``router``, fresh counters, a ``Clock``, and local
    answers: VERSION_LINE, ``stats_reply(args)``, else ``store.execute``
    (or the no-route error without a store)."""

    def __init__(self, router, store=None, watchers=None, clock=None,
                 stats_reply=echo_stats, stats=None) -> None:
        self.router = router
        self.store = store
        self.watchers = watchers
        self.clock = Clock() if clock is None else clock
        self.stats = ProxyStats() if stats is None else stats
        self.stats_reply = stats_reply

    def answer(self, req) -> bytes:
        if req.command == CMD_VERSION:
            return VERSION_LINE
        if req.command == CMD_STATS:
            return self.stats_reply(req.tokens[1:])
        if self.store is not None:
            return self.store.execute(req)
        return errors.NO_ROUTE
