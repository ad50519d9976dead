"""What the attached routes are, as the route library declared them.

Each route built by the route library (``routes.lua``) declares its shape
through the engine's ``declare`` (``mcp.lua``): its kind, the tables of
children its body calls, and its options; a hand-written ``function(r)
return pool(r) end`` is recognised as the shape ``routes.direct`` declares.
:class:`ShapeReader` turns those declarations into :class:`Shape` values,
plain Python the engine inspects without entering Lua again: the direct
path (``direct.py``) runs the shapes that send a command to one pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lupa import lua54

#: The kind of a route nothing declared: it runs in Lua.
LUA = "lua"

#: Deepest nesting of routes and tables read: a route deeper reads as LUA,
#: a table as empty (either way the engine leaves that route to Lua).
MAX_DEPTH = 32


@dataclass(frozen=True, eq=False)
class Shape:
    """A route's declared kind and fields (see routes.lua, "Shapes").

    Field values are plain Lua values (bytes, numbers, booleans), Pools,
    Shapes (child routes), or dicts of these (tables, keyed as in Lua).
    """

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def children(self) -> dict:
        """The table of children the route's body calls."""
        return self.fields.get("children", {})


class ShapeReader:
    """Reads route declarations from one routes-phase Lua state."""

    def __init__(self, engine) -> None:
        #: mcp.lua's engine table: shape(f) and pool_of(value)
        self._shape = engine.shape
        self._pool_of = engine.pool_of

    def route(self, func, depth: int = 0) -> Shape:
        """The shape of the route function ``func``."""
        declared = self._shape(func) if depth < MAX_DEPTH else None
        if declared is None:
            return Shape(LUA)
        fields = {key.decode(): self._value(value, depth + 1)
                  for key, value in declared.items() if key != b"kind"}
        return Shape(declared[b"kind"].decode(), fields)

    def _value(self, value, depth: int):
        kind = lua54.lua_type(value)
        if kind == "function":
            return self.route(value, depth)
        if kind != "table":
            return value
        pool = self._pool_of(value)
        if pool is not None:
            return pool
        if depth >= MAX_DEPTH:
            return {}
        return {key: self._value(item, depth + 1) for key, item in value.items()}
