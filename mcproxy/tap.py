"""``twistd mcproxy``: command-line options and the service they build."""

from __future__ import annotations

import os

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from mcproxy.lua.engine import ConfigError
from mcproxy.service import ProxyService
from mcproxy.store import Store

DEFAULT_LISTEN = "tcp:11211"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a memcached proxy. Clients speak the memcached text and meta "
        "protocols to it; the Lua route config (--config) decides which "
        "memcached servers answer each command. Without --config, mcproxy is "
        "a plain in-memory memcached-compatible cache."
    )
    optParameters = [
        ["config", "c", None,
         "Route config: a Lua file defining mcp_config_pools and "
         "mcp_config_routes, as for memcached's proxy. SIGHUP reloads it."],
        ["memory", "m", 64, "Memory for the embedded cache, in megabytes.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Where to accept clients: a Twisted server endpoint string, e.g.
        tcp:11211:interface=127.0.0.1 or unix:/run/mcproxy.sock (repeatable;
        default tcp:11211)."""
        from twisted.internet import reactor

        try:
            serverFromString(reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise usage.UsageError(f"bad --listen endpoint {endpoint!r}: {e}") from None
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        config = self["config"]
        if config is not None and not os.path.isfile(config):
            raise usage.UsageError(f"--config: no such file: {config}")
        if self["memory"] <= 0:
            raise usage.UsageError("--memory must be a positive number of megabytes")


def makeService(options: Options) -> ProxyService:
    """Build the service; a config that fails to load stops twistd."""
    config = options["config"]
    store = Store(memory_limit=options["memory"] * 2**20)
    service = ProxyService(os.path.abspath(config) if config else None,
                           options["listen"], store=store)
    try:
        service.load_config()
    except ConfigError as e:
        raise SystemExit(f"mcproxy: {e}") from None
    return service
