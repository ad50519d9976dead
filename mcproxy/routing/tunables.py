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
    "backend_read_timeout": ("read_timeout", "seconds"),
    "backend_failure_limit": ("failure_limit", "count"),
    "tcp_keepalive": ("keepalive", "boolean"),
    "backend_depth_limit": ("depth_limit", "count"),
    "backend_use_tls": ("tls", "boolean"),
    "active_req_limit": (None, "count"),
}


class Tunables:
    """The current defaults for new backends."""

    def __init__(self) -> None:
        self.defaults = BackendOptions()
        #: requests allowed inside routes at once (0: no limit)
        self.active_req_limit = 0

    def set(self, name: str, value: Any) -> None:
        field, kind = TUNABLE_NAMES[name]
        if kind == "boolean":
            if not isinstance(value, bool):
                raise TunableError(f"{name} must be a boolean")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise TunableError(f"{name} must be a number")
        elif kind == "count":
            if value < 0:
                raise TunableError(f"{name} must be >= 0")
            value = int(value)
        elif value <= 0:
            raise TunableError(f"{name} must be > 0")
        if field is None:
            self.active_req_limit = value
        else:
            self.defaults = replace(self.defaults, **{field: value})

    def backend_options(self, **overrides: Any) -> BackendOptions:
        """Options for a backend created now, with per-backend overrides."""
        return replace(self.defaults, **overrides) if overrides else self.defaults
