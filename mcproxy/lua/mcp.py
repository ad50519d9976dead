"""The Python half of the ``mcp`` module: what Lua calls to touch Python.

``Host`` is handed to ``mcp.lua``'s constructor. Its methods are called
from Lua with Lua values (strings arrive as ``bytes``, tables as lupa
``LuaTable``) and report misuse by returning an error string as their last
value, so that ``mcp.lua`` can raise it as a Lua error with the caller's
line number.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mcproxy.pool import BackendRegistry, Pool, PoolOptionError
from mcproxy.protocols.backend import BackendOptions
from mcproxy.tunables import TunableError, Tunables
from mcproxy.userstats import UserStatError, UserStats

#: Longest backend host name memcached accepts.
MAX_HOST_LENGTH = 254

#: Table-form ``mcp.backend{}`` keys and the BackendOptions field each sets.
_BACKEND_OPTION_KEYS = {
    "connecttimeout": "connect_timeout",
    "retrytimeout": "retry_timeout",
    "retrywaittime": "retry_timeout",
    "readtimeout": "read_timeout",
    "failurelimit": "failure_limit",
    "tcpkeepalive": "keepalive",
    "depthlimit": "depth_limit",
}


def lua_error(message: str) -> bytes:
    """An error message as Lua receives it (the runtime holds bytes)."""
    return message.encode()


def text(value: Any) -> str:
    """A Lua string (bytes) as str, for names and messages."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class Host:
    """Services a Lua state's ``mcp`` module asks of Python.

    One Host serves one load of the config (both its phases). ``phase`` is
    switched by the engine between ``"config"`` and ``"routes"``.
    """

    logger = Logger(namespace="mcproxy.lua")

    def __init__(self, path: str, registry: BackendRegistry,
                 tunables: Tunables, user_stats: UserStats) -> None:
        self.path = path
        self.registry = registry
        self.tunables = tunables
        self.user_stats = user_stats
        #: backends created or reused by this load, in creation order
        self.backends: list = []
        #: stat names added by this load's mcp_config_pools: index -> name
        self.stat_names: dict[int, str] = {}

    # -- backends and pools ------------------------------------------------

    def backend(self, label: bytes, host: bytes, port: bytes,
                options: BackendOptions | None = None):
        if len(host) > MAX_HOST_LENGTH:
            return None, lua_error("backend name too long")
        if not port or len(port) > 6:
            return None, lua_error(f"mcp.backend: bad port {text(port)!r}")
        if options is None:
            options = self.tunables.backend_options()
        backend = self.registry.get(text(label), text(host), text(port), options)
        self.backends.append(backend)
        return backend, None

    def backend_from_table(self, table):
        fields = {text(k): v for k, v in table.items()}
        for name in ("label", "host"):
            if not isinstance(fields.get(name), bytes):
                return None, lua_error(f"mcp.backend: '{name}' must be a string")
        port = fields.get("port", b"11211")
        if isinstance(port, int | float):
            port = str(int(port)).encode()
        if not isinstance(port, bytes):
            return None, lua_error("mcp.backend: 'port' must be a string or a number")
        overrides = {}
        for key, value in fields.items():
            if key in ("label", "host", "port"):
                continue
            if key == "down":
                if not isinstance(value, bool):
                    return None, lua_error("mcp.backend: 'down' must be a boolean")
                overrides["down"] = value
                continue
            field = _BACKEND_OPTION_KEYS.get(key)
            if field is None:
                return None, lua_error(f"mcp.backend: unknown option '{key}'")
            if field == "keepalive":
                if not isinstance(value, bool):
                    return None, lua_error(f"mcp.backend: '{key}' must be a boolean")
            elif not isinstance(value, int | float) or isinstance(value, bool) \
                    or value < 0:
                return None, lua_error(f"mcp.backend: '{key}' must be a number >= 0")
            elif field in ("failure_limit", "depth_limit"):
                value = int(value)
            overrides[field] = value
        options = self.tunables.backend_options(**overrides)
        return self.backend(fields["label"], fields["host"], port, options)

    def pool(self, backends, opts):
        members = [backends[i] for i in range(1, len(backends) + 1)]
        options = {}
        if opts is not None:
            options = {text(k): v for k, v in opts.items()}
        try:
            return Pool(members, options), None
        except (PoolOptionError, ValueError) as e:
            return None, lua_error(str(e))

    # -- user stats ----------------------------------------------------------

    def add_stat(self, index, name):
        if not isinstance(index, int) or isinstance(index, bool):
            return lua_error("stat index must be a number")
        if not isinstance(name, bytes):
            return lua_error("stat name must be a string")
        try:
            self.user_stats.check(index, text(name))
        except UserStatError as e:
            return lua_error(str(e))
        self.stat_names[index] = text(name)
        return None

    def stat(self, index, delta):
        if not isinstance(index, int) or not isinstance(delta, int):
            return lua_error("mcp.stat: index and delta must be integers")
        try:
            self.user_stats.add(index, delta)
        except UserStatError as e:
            return lua_error(str(e))
        return None

    # -- logging and tunables --------------------------------------------------

    def log(self, message: bytes) -> None:
        self.logger.info("{msg}", msg=text(message), type="proxy_user")

    def tunable(self, name: bytes, value):
        try:
            self.tunables.set(text(name), value)
        except TunableError as e:
            return lua_error(str(e))
        return None

