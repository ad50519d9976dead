"""Global tunables set from Lua (``mcp.backend_read_timeout(s)`` ...).

They persist across reloads, as in memcached: a config that stops setting
one keeps the last value.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mcproxy.backends.options import BackendOptions


class TunableError(ValueError):
    """A tunable was given a value it cannot take; the text is the Lua error."""


#: Lua function name -> (BackendOptions field, kind)
TUNABLE_NAMES = {
    "backend_connect_timeout": ("connect_timeout", "seconds"),
    "backend_retry_timeout": ("retry_timeout", "seconds"),
    "backend_retry_waittime": ("retry_timeout", "waittime"),
    "backend_read_timeout": ("read_timeout", "seconds"),
    "backend_failure_limit": ("failure_limit", "count"),
    "tcp_keepalive": ("keepalive", "boolean"),
    "backend_depth_limit": ("depth_limit", "count"),
    "backend_use_tls": ("tls", "boolean"),
}

#: Lua function name -> (Tunables attribute, kind): settings of the proxy
#: rather than of new backends.
PROXY_TUNABLES = {
    "active_req_limit": ("active_req_limit", "count"),
    "backend_use_iothread": ("use_iothread", "boolean"),
    "stat_limit": ("stat_limit", "count"),
}

#: The most user stats a config may have (memcached's default stat_limit).
MAX_STAT_LIMIT = 1024


def waittime(seconds: float) -> int:
    """memcached 1.6.45's retry wait time: whole seconds, a fraction of
    one half or more rounded up, at least 1."""
    whole = int(seconds)
    if seconds - whole >= 0.5:
        whole += 1
    return max(whole, 1)


class Tunables:
    """The current defaults for new backends, and the proxy's settings."""

    def __init__(self) -> None:
        self.defaults = BackendOptions()
        #: requests allowed inside routes at once (0: no limit)
        self.active_req_limit = 0
        #: what the config asked of mcp.backend_use_iothread; mcproxy has no
        #: IO thread (one reactor serves clients and backends), so this is
        #: only recorded, and shown by ``stats settings``
        self.use_iothread = False
        #: highest user stat index mcp.add_stat accepts
        self.stat_limit = MAX_STAT_LIMIT

    def set(self, name: str, value: Any) -> None:
        own = PROXY_TUNABLES.get(name)
        field, kind = own if own is not None else TUNABLE_NAMES[name]
        if kind == "boolean":
            if not isinstance(value, bool):
                raise TunableError(f"{name} must be a boolean")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise TunableError(f"{name} must be a number")
        elif kind == "count":
            if value < 0:
                raise TunableError(f"{name} must be >= 0")
            value = int(value)
        elif kind == "waittime":
            value = float(waittime(value))
        elif value <= 0:
            raise TunableError(f"{name} must be > 0")
        if name == "stat_limit":
            value = value or MAX_STAT_LIMIT  # 0: the default, as memcached
            if value > MAX_STAT_LIMIT:
                raise TunableError(f"stat_limit: mcproxy keeps at most {MAX_STAT_LIMIT} "
                                   f"user stats")
        if own is not None:
            setattr(self, field, value)
        else:
            self.defaults = replace(self.defaults, **{field: value})

    def settings(self) -> list[tuple[str, Any]]:
        """``(name, value)`` of every tunable, named as the Lua function that
        sets it (the last one set for names that share a field)."""
        pairs = [(name, getattr(self.defaults, field))
                 for name, (field, _) in TUNABLE_NAMES.items()]
        pairs += [(name, getattr(self, field)) for name, (field, _) in PROXY_TUNABLES.items()]
        return pairs

    def backend_options(self, **overrides: Any) -> BackendOptions:
        """Options for a backend created now, with per-backend overrides."""
        return replace(self.defaults, **overrides) if overrides else self.defaults


def tunable_settings(tunables: Tunables) -> list[tuple[str, str]]:
    """The tunables as ``stats settings`` lines: ``proxy_NAME value``."""
    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)
    return [(f"proxy_{name}", shown(value)) for name, value in tunables.settings()]
