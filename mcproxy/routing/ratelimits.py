"""Token bucket rate limits (``mcp.ratelim_tbf{...}``,
``mcp.ratelim_global_tbf{...}``), as memcached 1.6.45 counts them.

A bucket holds up to ``limit`` tokens and starts full; every ``tickrate``
milliseconds ``fillrate`` tokens are added. ``take(n)`` succeeds, and takes
the tokens, only while more than ``n`` are left (memcached's rule: a full
bucket of 50 gives three takes of 15, not 50/15 rounded up). Time is the
engine's clock, in whole milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

#: Largest value of limit, fillrate and tickrate (memcached's uint32 less one).
MAX_TBF_ARGUMENT = 2**32 - 2


class RateLimitError(ValueError):
    """Bad arguments to a token bucket; the text is the Lua error."""


class TokenBucket:
    """One token bucket filter; ``now_ms()`` reads the clock."""

    __slots__ = ("bucket", "limit", "fill_rate", "tick_rate", "last_update", "now_ms")

    def __init__(self, limit: int, fill_rate: int, tick_rate: int,
                 now_ms: Callable[[], int]) -> None:
        self.limit = limit
        self.fill_rate = fill_rate
        self.tick_rate = tick_rate
        self.now_ms = now_ms
        self.bucket = limit
        self.last_update = now_ms()

    @classmethod
    def of(cls, fields: dict, now_ms: Callable[[], int], what: str) -> TokenBucket:
        """The bucket ``{ limit =, fillrate =, tickrate = }`` describes."""
        values = {}
        for key in fields:
            if key not in ("limit", "fillrate", "tickrate"):
                raise RateLimitError(f"{what}: unknown option '{key}'")
        for key in ("limit", "fillrate", "tickrate"):
            value = fields.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= MAX_TBF_ARGUMENT:
                raise RateLimitError(f"{what}: arguments must be unsigned 32 bit integer")
            values[key] = int(value)
        if values["tickrate"] == 0:
            # memcached divides by it
            raise RateLimitError(f"{what}: tickrate must be at least 1 millisecond")
        return cls(values["limit"], values["fillrate"], values["tickrate"], now_ms)

    def take(self, count: int) -> bool:
        """Whether ``count`` tokens could be taken (they are, if so)."""
        now = self.now_ms()
        delta = now - self.last_update
        tick = self.tick_rate
        if delta > tick:
            ticks = delta // tick
            self.last_update += ticks * tick
            self.bucket = min(self.bucket + ticks * self.fill_rate, self.limit)
        if self.bucket > count:
            self.bucket -= count
            return True
        return False
