"""``twistd mcproxy``: command-line options and the service they build."""

from __future__ import annotations

import os
import sys

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mcproxy._version import __version__
from mcproxy.app.check import check_config
from mcproxy.app.listen import DEFAULT_BACKLOG, parse_listen, somaxconn
from mcproxy.app.process import ProxyProcess
from mcproxy.app.service import ProxyService
from mcproxy.app.workers import WorkerSupervisor, is_tcp_endpoint, worker_arguments
from mcproxy.cache.store import Store
from mcproxy.routing.engine import CONFIG_FILE_SEPARATOR, ROUTELIB, ROUTELIB_PATH, ConfigError
from mcproxy.server.protocol import CLIENT_OUTPUT_LIMIT
from mcproxy.wire.behaviour import AUTO, BEHAVIOURS

DEFAULT_LISTEN = "tcp:11211"
LOG_BACKLOG_CAPPED = ("--backlog={backlog} is above net.core.somaxconn ({somaxconn}): "
                      "the kernel listens with {somaxconn}")

log = Logger()


class Options(usage.Options):
    synopsis = "[options]   (e.g. twistd -n mcproxy --config=route.lua --listen=tcp:11211)"
    longdesc = (
        "Run a memcached proxy. Clients speak the memcached text and meta "
        "protocols to it; the Lua route config (--config) decides which "
        "memcached servers answer each command. Without --config, mcproxy is "
        "a plain in-memory memcached-compatible cache. "
        "twistd's own options go before 'mcproxy': -n stays in the foreground "
        "(otherwise twistd daemonizes), --logfile and --pidfile say where the "
        "log and the pid go, --uid/--gid drop privileges after binding. "
        "'kill -HUP $(cat twistd.pid)' reloads the config. Check a config "
        "first with 'python -m mcproxy check route.lua'. On the client port, "
        "'watch proxyevents proxyreqs proxyuser' streams log events."
    )
    optParameters = [
        ["config", "c", None,
         "Route config: a Lua file defining mcp_config_pools and "
         "mcp_config_routes, as for memcached's proxy (or several, "
         "a.lua:b.lua, run in that order), or 'routelib' for the "
         "declarative route library (memcached's proxy_config=routelib), which "
         "reads --config-arg. SIGHUP reloads it."],
        ["config-arg", None, None,
         "What the route config reads as mcp.start_arg (memcached's proxy_arg): "
         "with --config=routelib, the pools{}/routes{} file. SIGHUP re-reads it."],
        ["memory", "m", 64, "Memory for the embedded cache, in megabytes.", int],
        ["max-connections", None, 0,
         "Most client connections open at once; beyond it a new client gets "
         "'ERROR Too many open connections' and is closed (0: no limit).", int],
        ["idle-timeout", None, 0,
         "Close client connections that sent nothing for this many seconds "
         "and wait for no reply (0: never).", float],
        ["client-output-limit", None, CLIENT_OUTPUT_LIMIT // 2**20,
         "Megabytes of replies that may wait for one client (buffered, or "
         "coming from backends for its requests); at 1/16 of it the proxy "
         "stops reading the client's requests, beyond it the client is "
         "closed (0: no limit).", int],
        ["workers", "w", 1,
         "Worker processes: with more than 1, this process binds the --listen "
         "TCP endpoints and runs that many proxy processes on them, restarts "
         "any that dies, passes SIGHUP on to all, and serves their metrics "
         "on --metrics.", int],
        ["wire", None, AUTO,
         "What clients get for bad input: as memcached's proxy '1.6.15' "
         "(SERVER_ERROR parsing request, lines must end in \\r\\n) or "
         "'1.6.45' (CLIENT_ERROR, a bare \\n ends a line, an unknown command "
         "closes the connection); 'auto': 1.6.45 for a config that attaches "
         "a function generator or router (V2 API, routelib), else 1.6.15."],
        ["backlog", "b", DEFAULT_BACKLOG,
         "Listen backlog of the --listen endpoints (memcached's -b), unless an "
         "endpoint string gives its own backlog=; the kernel caps it at "
         "net.core.somaxconn.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        # --help shows opt_* docstrings as they are: join their indented lines.
        self.docs = {name: " ".join(doc.split()) if doc else doc
                     for name, doc in self.docs.items()}
        self["listen"] = []
        self["metrics"] = []

    def opt_listen(self, description: str) -> None:
        """Where to accept clients: a Twisted server endpoint string, e.g.
        tcp:11211:interface=127.0.0.1 or unix:/run/mcproxy.sock, perhaps
        after a listener tag as memcached's -l writes it (tag_api_:tcp:11212
        or tag[api]:tcp:11212: its clients get the routes attached under
        that tag, 1 to 8 characters) (repeatable; default tcp:11211)."""
        from twisted.internet import reactor

        try:
            _, endpoint = parse_listen(description)
        except ValueError as e:
            raise usage.UsageError(f"bad --listen {description!r}: {e}") from None
        try:
            serverFromString(reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise usage.UsageError(f"bad --listen endpoint {endpoint!r}: {e}") from None
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_metrics(self, endpoint: str) -> None:
        """Serve Prometheus metrics (/metrics) and a status page (/) on this
        Twisted server endpoint, e.g. tcp:9150:interface=127.0.0.1
        (repeatable)."""
        from twisted.internet import reactor

        try:
            serverFromString(reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise usage.UsageError(f"bad --metrics endpoint {endpoint!r}: {e}") from None
        self["metrics"].append(endpoint)

    def opt_version(self) -> None:
        """Print mcproxy's version and exit."""
        sys.stdout.write(f"mcproxy {__version__}\n")
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        config = self["config"]
        if config == ROUTELIB:
            if self["config-arg"] is None:
                raise usage.UsageError("--config=routelib needs --config-arg=FILE")
            # resolved here, so that workers are started with the same files
            config = self["config"] = ROUTELIB_PATH
            if not os.path.isfile(self["config-arg"]):
                raise usage.UsageError(f"--config-arg: no such file: {self['config-arg']}")
            self["config-arg"] = os.path.abspath(self["config-arg"])
        if config is not None:
            files = config.split(CONFIG_FILE_SEPARATOR)
            for name in files:
                if not os.path.isfile(name):
                    raise usage.UsageError(f"--config: no such file: {name}")
            # absolute, so that reloads and workers find every file
            self["config"] = CONFIG_FILE_SEPARATOR.join(os.path.abspath(f) for f in files)
        if self["memory"] <= 0:
            raise usage.UsageError("--memory must be a positive number of megabytes")
        if self["max-connections"] < 0:
            raise usage.UsageError("--max-connections must be 0 (no limit) or more")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout must be 0 (never) or more seconds")
        if self["client-output-limit"] < 0:
            raise usage.UsageError("--client-output-limit must be 0 (no limit) or more "
                                   "megabytes")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be 1 or more")
        if self["wire"] != AUTO and self["wire"] not in BEHAVIOURS:
            raise usage.UsageError(
                f"--wire must be one of {', '.join(sorted({AUTO, *BEHAVIOURS}))}")
        if self["backlog"] < 1:
            raise usage.UsageError("--backlog must be 1 or more")
        if self["workers"] > 1:
            for description in self["listen"]:
                if not is_tcp_endpoint(parse_listen(description).endpoint):
                    raise usage.UsageError(
                        f"--workers needs TCP --listen endpoints (tcp:, tcp6: or ssl:), "
                        f"not {description!r}")


def makeService(options: Options) -> ProxyProcess:
    """Build the service twistd runs; a config that fails to load stops twistd.

    A ProxyProcess around a ProxyService, or with ``--workers`` above 1
    around a supervisor of that many worker processes (mcproxy.app.workers),
    serving their metrics if asked to, once the config has loaded in a
    scratch state. Building it changes nothing in the process; starting it
    does (mcproxy.app.process).
    """
    config = options["config"]
    cap = somaxconn()
    if options["listen"] and cap is not None and options["backlog"] > cap:
        log.info(LOG_BACKLOG_CAPPED, backlog=options["backlog"], somaxconn=cap)
    if options["workers"] > 1:
        error = check_config(os.path.abspath(config), options["config-arg"]) if config else None
        if error is not None:
            raise SystemExit(f"mcproxy: {error}")
        return ProxyProcess(WorkerSupervisor(options["workers"], options["listen"],
                                             worker_arguments(options),
                                             metrics=options["metrics"],
                                             backlog=options["backlog"]))
    store = Store(memory_limit=options["memory"] * 2**20)
    service = ProxyService(os.path.abspath(config) if config else None,
                           options["listen"], store=store, metrics=options["metrics"],
                           max_connections=options["max-connections"],
                           idle_timeout=options["idle-timeout"],
                           backlog=options["backlog"],
                           output_limit=options["client-output-limit"] * 2**20,
                           config_arg=options["config-arg"], wire=options["wire"])
    try:
        service.load_config()
    except ConfigError as e:
        raise SystemExit(f"mcproxy: {e}") from None
    return ProxyProcess(service)
