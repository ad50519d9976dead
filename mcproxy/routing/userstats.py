"""User-defined counters (``mcp.add_stat`` / ``mcp.stat``).

Slots are numbered from 1; names are set by ``mcp_config_pools``; values
survive reloads. They appear as ``user_NAME`` in ``stats proxy``.
"""

from __future__ import annotations

MAX_STAT_INDEX = 1024
MAX_STAT_NAME = 122


class UserStatError(ValueError):
    """Misuse of add_stat / stat; the text is the Lua error."""


class UserStats:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.values: dict[int, int] = {}

    @staticmethod
    def check(index: int, name: str) -> None:
        """Validate an ``mcp.add_stat`` call."""
        if index < 1:
            raise UserStatError("stat index must be 1 or higher")
        if index > MAX_STAT_INDEX:
            raise UserStatError(f"stat index must be {MAX_STAT_INDEX} or less")
        if len(name.encode()) > MAX_STAT_NAME:
            raise UserStatError(f"stat name too long: {name}")
        if any(c.isspace() for c in name):
            raise UserStatError("stat cannot contain spaces or newlines")

    def rename(self, names: dict[int, str]) -> None:
        """Apply the names of a successfully loaded config (slots only grow)."""
        self.names.update(names)
        for index in names:
            self.values.setdefault(index, 0)

    def add(self, index: int, delta: int) -> None:
        if not self.names:
            raise UserStatError("no stats counters initialized")
        if index not in self.values:
            raise UserStatError("stat index out of range")
        self.values[index] += delta

    def lines(self) -> list[tuple[str, int]]:
        """``(user_NAME, value)`` in index order; unnamed slots skipped."""
        return [(f"user_{self.names[i]}", self.values[i]) for i in sorted(self.names)]
