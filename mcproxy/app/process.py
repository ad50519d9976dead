"""ProxyProcess: the service ``twistd mcproxy`` runs, and the settings of its process.

Building a proxy changes nothing outside it, so that a test or an
application can build as many as it likes. A process that *runs* the proxy
as its main work also wants two settings of the whole interpreter (see
README "Using mcproxy from your own Twisted application"): those are made
when the ProxyProcess starts, and stay for the rest of the process.
"""

from __future__ import annotations

import gc

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python.reflect import qual

from mcproxy import compiled
from mcproxy.app.reactor import adopt

#: The log event of the reactor's switch (twistd has logged its class by then).
LOG_ADOPTED = "switched the reactor to {reactor}"
#: Which of mcproxy's compiled modules run (mcproxy.compiled); none where
#: no compiler built them, or with MCPROXY_PURE_PYTHON=1: pure Python.
LOG_COMPILED = "compiled modules: {modules}"

#: Python's cyclic garbage collector runs when this many more container
#: objects have been created than freed (CPython's default is 700). Under
#: load the requests in flight are thousands of young objects, so at 700 it
#: runs every few hundred requests and walks them all: about 5% of the CPU
#: in the benchmark. Requests make no reference cycles; the few an error
#: path makes are only collected a little later.
GC_THRESHOLD = 10_000


def raise_gc_threshold() -> None:
    """Run the cyclic collector less often (see GC_THRESHOLD)."""
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


class ProxyProcess(MultiService):
    """The top service of a process that runs mcproxy: its one child
    ``proxy`` (a ProxyService, or under ``--workers`` a WorkerSupervisor),
    started once the process-wide settings are made: the GC threshold
    raised, and the running epoll reactor made a ProxyReactor
    (mcproxy.app.reactor.adopt; any other reactor is left as it is)."""

    log = Logger()

    def __init__(self, proxy: MultiService, reactor=None) -> None:
        super().__init__()
        self.proxy = proxy
        self.reactor = reactor
        proxy.setServiceParent(self)

    def startService(self) -> None:
        raise_gc_threshold()
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        if adopt(reactor):
            self.log.info(LOG_ADOPTED, reactor=qual(type(reactor)))
        self.log.info(LOG_COMPILED, modules=", ".join(compiled.running()) or "none (pure Python)")
        super().startService()
