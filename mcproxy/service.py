"""ProxyService: the whole proxy as one Twisted service.

It owns the listening endpoints, the route engine, the backends, the
embedded cache and the counters, and reloads the route config on SIGHUP.
Build it with :func:`mcproxy.makeService` (as twistd does) or directly, and
add it to any Twisted application.
"""

from __future__ import annotations

import signal

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from mcproxy import _version
from mcproxy.lua.engine import ConfigError, RouteEngine
from mcproxy.pool import BackendRegistry
from mcproxy.protocols.server import ProxyServerFactory
from mcproxy.stats import ProxyStats, format_stats, general_stats, proxy_stats
from mcproxy.tunables import Tunables
from mcproxy.userstats import UserStats

#: What ``version`` answers: the memcached release whose proxy we follow,
#: so that clients that check for meta-protocol support are satisfied.
VERSION = f"1.6.15-mcproxy-{_version.__version__}"


class ProxyService(MultiService):
    """A memcached proxy routed by a Lua config.

    ``config`` is the route config's path (None: no routes, every command
    is served by the embedded cache); ``listen`` holds Twisted server
    endpoint strings.
    """

    log = Logger()

    def __init__(self, config: str | None, listen: list[str] = ("tcp:11211",),
                 store=None, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.stats = ProxyStats()
        self.tunables = Tunables()
        self.user_stats = UserStats()
        self.registry = BackendRegistry(self.stats, reactor=reactor)
        self.engine = RouteEngine(self.stats, self.registry, self.tunables,
                                  self.user_stats)
        self.store = store
        self.version_line = f"VERSION {VERSION}\r\n".encode()
        self.factory = ProxyServerFactory(self)
        for description in listen:
            strports.service(description, self.factory).setServiceParent(self)
        self._reload_running = False
        self._reload_again = False
        self._previous_hup = None

    # -- config ----------------------------------------------------------------

    def load_config(self) -> None:
        """Load the config for the first time; ConfigError if it fails."""
        if self.config is not None and self.engine.routes is None:
            self.engine.load(self.config)
            self.log.info("loaded route config {path}", path=self.config)

    def reload(self) -> bool:
        """Load the config again; keep the old routes if anything fails."""
        self.stats.config_reloads += 1
        old = self.engine.routes
        try:
            routes = self.engine.load(self.config)
        except ConfigError as e:
            self.stats.config_reload_fails += 1
            self.log.error("reload of {path} failed, old routes kept: {error}",
                           path=self.config, error=str(e), type="proxy_conf",
                           status="failed")
            return False
        if old is not None:
            self.registry.retain(routes.backends)
        self.log.info("reloaded route config {path}", path=self.config,
                      type="proxy_conf", status="done")
        return True

    def _hup(self, signum, frame) -> None:
        """The signal handler: only schedule the reload on the reactor."""
        self.reactor.callFromThread(self._schedule_reload)

    def _schedule_reload(self) -> None:
        """Run one reload at a time; HUPs during one coalesce into one more."""
        if self._reload_running:
            self._reload_again = True
            return
        self._reload_running = True
        try:
            while True:
                self._reload_again = False
                if self.config is not None:
                    self.reload()
                if not self._reload_again:
                    break
        finally:
            self._reload_running = False

    # -- Service -------------------------------------------------------------

    def startService(self) -> None:
        self.load_config()
        self.registry.start()
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hup)
        except ValueError:
            self._previous_hup = None  # not the main thread: no signals
        super().startService()

    def stopService(self):
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        stopped = super().stopService()
        closes = self.registry.close()
        return defer.gatherResults([defer.maybeDeferred(lambda: stopped), *closes])

    # -- local replies ---------------------------------------------------------

    def stats_reply(self, args: list[bytes]) -> bytes:
        """The reply to ``stats [args]``."""
        if not args:
            store_stats = self.store.stats() if self.store is not None else {}
            return format_stats(general_stats(self.stats, VERSION, store_stats))
        if args == [b"proxy"]:
            return format_stats(proxy_stats(self.stats, self.user_stats.lines()))
        if args == [b"settings"]:
            return format_stats([("proxy_enabled", "yes"),
                                 ("proxy_uring_enabled", "no")])
        return b"ERROR\r\n"
