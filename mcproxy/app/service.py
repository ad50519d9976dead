"""ProxyService: the whole proxy as one Twisted service.

It owns the listening endpoints, the route engine, the backends, the
embedded cache and the counters, and reloads the route config on SIGHUP.
It is the core its client connections talk to (IProxyCore): it routes
through its engine and answers ``version``, ``stats`` and the embedded
cache's commands. Build it directly, and add it to any Twisted application;
building it changes nothing in the process (mcproxy.app.process).
"""

from __future__ import annotations

import signal
import time
from collections import deque
from functools import partial
from typing import Any, NamedTuple

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcproxy.app.listen import DEFAULT_BACKLOG, parse_listen, with_backlog
from mcproxy.backends.pool import BackendRegistry
from mcproxy.ops.stats import (
    VERSION,
    Pairs,
    ProxyStats,
    Snapshot,
    backend_stats,
    dump_reply,
    format_stats,
    general_stats,
    proxy_stats,
    snapshot,
    workers_stats,
)
from mcproxy.ops.watch import WatchRegistry
from mcproxy.routing.engine import ConfigError, RouteEngine
from mcproxy.routing.funcstats import funcgen_stats
from mcproxy.routing.tunables import Tunables, tunable_settings
from mcproxy.routing.userstats import UserStats
from mcproxy.server.interfaces import IProxyCore
from mcproxy.server.protocol import CLIENT_OUTPUT_LIMIT, ProxyServerFactory
from mcproxy.wire import errors
from mcproxy.wire.behaviour import AUTO
from mcproxy.wire.request import CMD_STATS, CMD_VERSION, Request

__all__ = ["VERSION", "ProxyService", "ReloadRecord"]

# Log events of a reload, one per outcome.
LOG_RELOAD_START = "reloading route config {path}"
LOG_RELOADED = "reloaded route config {path} (backends in use: {backends}, open: {total})"
LOG_RELOAD_FAILED = "reload of {path} failed, old routes kept: {error}"
# Listener tags that the routes and the listeners do not share.
LOG_TAG_UNHEARD = ("{path} attaches routes for listener tag {tag!r}, which no --listen has: "
                   "nobody is served by them")
LOG_TAG_UNROUTED = ("{path} attaches no routes for listener tag {tag!r}: its clients get "
                    "the untagged routes")

#: Reloads remembered for the status page.
RELOAD_HISTORY = 10

class ReloadRecord(NamedTuple):
    """One load of the config: when (unix time), whether it took, the error."""

    at: float
    ok: bool
    error: str = ""


@implementer(IProxyCore)
class ProxyService(MultiService):
    """A memcached proxy routed by a Lua config.

    ``config`` is the route config's path (None: no routes, every command
    is served by the embedded cache); ``listen`` holds Twisted server
    endpoint strings, each perhaps after a listener tag (``tag_x_:``), which
    listen with ``backlog`` unless they name their own (mcproxy.app.listen).
    ``max_connections``, ``idle_timeout`` and ``output_limit`` (bytes) are
    the client limits of ProxyServerFactory.
    """

    log = Logger()

    def __init__(self, config: str | None, listen: list[str] = ("tcp:11211",),
                 store=None, reactor=None, metrics: list[str] = (),
                 max_connections: int = 0, idle_timeout: float = 0,
                 backlog: int = DEFAULT_BACKLOG,
                 output_limit: int = CLIENT_OUTPUT_LIMIT,
                 config_arg: str | None = None, wire: str = AUTO) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = self.clock = reactor
        self.config = config
        #: what the config reads as mcp.start_arg (a routelib config's file)
        self.config_arg = config_arg
        self.stats = ProxyStats()
        self.tunables = Tunables()
        self.user_stats = UserStats()
        self.registry = BackendRegistry(self.stats, reactor=reactor)
        self.engine = self.router = RouteEngine(self.stats, self.registry, self.tunables,
                                                self.user_stats, store=store, clock=reactor,
                                                wire=wire)
        # mcp.schedule_config_reload() reloads as a SIGHUP does
        self.engine.schedule_reload = partial(self._hup, signal.SIGHUP, None)
        self.store = store
        self.version_line = f"VERSION {VERSION}\r\n".encode()
        self.factory = ProxyServerFactory(self, max_connections, idle_timeout, output_limit)
        self.watchers = WatchRegistry(reactor)
        #: under --workers: this worker's slot (shown by ``stats``), and the
        #: other workers' last ``stats`` figures by slot, with the restart
        #: count, as the supervisor sends them (see mcproxy.app.worker)
        self.worker_id: int | None = None
        self.worker_table: dict[int, Pairs] = {}
        self.worker_restarts = 0
        #: listener tag -> the factory of its listeners (factory_for)
        self._tagged: dict[str, Any] = {}
        for description in listen:
            tag, endpoint = parse_listen(description)
            strports.service(with_backlog(endpoint, backlog),
                             self.factory_for(tag)).setServiceParent(self)
        if metrics:
            from mcproxy.ops.web import metrics_service  # needs prometheus_client
            for description in metrics:
                metrics_service(self.snapshot, description).setServiceParent(self)
        #: when the active config was loaded (unix time), and the last loads
        self.config_loaded: float | None = None
        self.reloads: deque[ReloadRecord] = deque(maxlen=RELOAD_HISTORY)
        #: a reload is queued on the reactor and has not started yet
        self._reload_pending = False
        #: the SIGHUP handler to put back on stop, when ours is installed
        self._previous_hup: Any = None
        self._hup_installed = False

    def factory_for(self, tag: str | None):
        """The factory of the listeners tagged ``tag`` (None: untagged):
        their connections route through the engine's view for the tag."""
        if tag is None:
            return self.factory
        factory = self._tagged.get(tag)
        if factory is None:
            factory = self._tagged[tag] = self.factory.routed_by(self.engine.view(tag))
        return factory

    # -- config ----------------------------------------------------------------

    def _check_tags(self) -> None:
        """Log the listener tags that only the routes, or only the
        listeners, have (memcached serves both cases without a word)."""
        routes = self.engine.routes
        if routes is None:
            return
        listened = set(self._tagged)
        for tag in sorted(set(routes.tagged) - listened):
            self.log.warn(LOG_TAG_UNHEARD, path=self.config, tag=tag)
        for tag in sorted(listened - set(routes.tagged)):
            self.log.warn(LOG_TAG_UNROUTED, path=self.config, tag=tag)

    def load_config(self) -> None:
        """Load the config for the first time; ConfigError if it fails."""
        if self.config is not None and self.engine.routes is None:
            routes = self.engine.load(self.config, self.config_arg)
            self.registry.use(routes, routes.backends)
            self.config_loaded = time.time()
            self.log.info("loaded route config {path}", path=self.config,
                          type="proxy_conf", status="done")

    def reload(self) -> bool:
        """Build new routes from the config file and switch to them.

        Only a load where every phase succeeded replaces the routes;
        requests already inside a route finish on the old ones. On any
        failure the running routes, backends and tunables stay as they were.
        Returns whether the new routes are active.
        """
        self.stats.config_reloads += 1
        self.log.info(LOG_RELOAD_START, path=self.config, type="proxy_conf", status="start")
        # mcp_config_pools sets tunables as it runs; a failed load must not
        # leave them set (their values are immutable, a shallow copy will do).
        tunables = vars(self.tunables).copy()
        try:
            routes = self.engine.load(self.config, self.config_arg)
        except Exception as e:
            self.stats.config_reload_fails += 1
            self.reloads.append(ReloadRecord(time.time(), False, str(e) or repr(e)))
            vars(self.tunables).update(tunables)
            self.registry.sweep()  # backends only the failed load created
            if isinstance(e, ConfigError):
                self.log.error(LOG_RELOAD_FAILED, path=self.config, error=str(e),
                               type="proxy_conf", status="failed")
            else:
                self.log.failure(LOG_RELOAD_FAILED, path=self.config, error=repr(e),
                                 type="proxy_conf", status="failed")
            return False
        self.registry.use(routes, routes.backends)
        self.config_loaded = time.time()
        self.reloads.append(ReloadRecord(self.config_loaded, True))
        self._check_tags()
        self.log.info(LOG_RELOADED, path=self.config,
                      backends=len(set(routes.backends)),
                      total=self.stats.backend_total,
                      type="proxy_conf", status="done")
        return True

    def _hup(self, signum: int, frame: Any) -> None:
        """The SIGHUP handler: only queue a reload on the reactor.

        HUPs that arrive before the queued reload starts share it; one that
        arrives while a reload runs queues exactly one more.
        """
        if not self._reload_pending:
            self._reload_pending = True
            self.reactor.callFromThread(self._scheduled_reload)

    def _scheduled_reload(self) -> None:
        self._reload_pending = False
        if not self.running:
            return
        if self.config is None:
            self.log.info("SIGHUP ignored: no route config to reload")
            return
        self.reload()

    # -- Service -------------------------------------------------------------

    def startService(self) -> None:
        self.load_config()
        self._check_tags()
        self.registry.start()
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hup)
            self._hup_installed = True
        except ValueError:
            pass  # not the main thread: whoever runs us handles signals
        super().startService()

    def stopService(self):
        if self._hup_installed:
            previous = self._previous_hup
            signal.signal(signal.SIGHUP,
                          signal.SIG_DFL if previous is None else previous)
            self._hup_installed = False
            self._previous_hup = None
        self.watchers.close()
        stopped = super().stopService()
        closes = self.registry.close()
        return defer.gatherResults([defer.maybeDeferred(lambda: stopped), *closes])

    # -- local replies ---------------------------------------------------------

    def answer(self, req: Request) -> bytes:
        """IProxyCore: ``version``, ``stats``, else the embedded cache's
        reply (empty for noreply), or the no-route error without a cache."""
        cmd = req.command
        if cmd == CMD_VERSION:
            return self.version_line
        if cmd == CMD_STATS:
            return self.stats_reply(req.tokens[1:])
        if self.store is not None:
            return self.store.execute(req)
        return errors.NO_ROUTE

    def general_stats(self) -> Pairs:
        """The figures of ``stats``, now."""
        store_stats = self.store.stats() if self.store is not None else {}
        return general_stats(self.stats, store_stats, self.factory.rejected, self.worker_id)

    def snapshot(self) -> Snapshot:
        """Everything this proxy reports, now (for the metrics, the status
        page and, under --workers, the supervisor)."""
        return snapshot(self.stats, self.general_stats(), self.user_stats.lines(),
                        self.registry.live, self.engine.routes, self.config,
                        self.config_loaded, self.reloads)

    def stats_reply(self, args: list[bytes]) -> bytes:
        """The reply to ``stats [args]``."""
        if not args:
            return format_stats(self.general_stats())
        if args == [b"workers"]:
            own = self.worker_id if self.worker_id is not None else 0
            return format_stats(workers_stats(own, self.general_stats(), self.worker_table,
                                              self.worker_restarts))
        if args == [b"proxy"]:
            return format_stats(proxy_stats(self.stats, self.user_stats.lines()))
        if args == [b"proxybe"]:
            return format_stats(backend_stats(self.registry.live))
        if args == [b"proxyfuncs"]:
            return format_stats(funcgen_stats(self.engine.routes))
        if args == [b"settings"]:
            return format_stats([("proxy_enabled", "yes"),
                                 ("proxy_uring_enabled", "no"),
                                 *tunable_settings(self.tunables)])
        if args in ([b"slabs"], [b"items"]):
            # No slab classes to show; answered (empty) because monitoring
            # such as memcached_exporter asks for both after ``stats``.
            return format_stats([])
        return dump_reply(args) or errors.ERROR
