"""``stats proxyfuncs``: the function generators of the active routes."""

from __future__ import annotations


def funcgen_stats(routes) -> list[tuple[str, int]]:
    """``funcs_NAME`` (funcgens of that name) and ``slots_NAME`` (the
    request contexts they made) per funcgen name, as memcached 1.6.45's
    ``stats proxyfuncs``; routers are ``mcp_router``. None: no routes."""
    if routes is None:
        return []
    flat = routes.state.engine.funcstats()
    pairs = []
    for index in range(1, len(flat) + 1, 3):
        name = flat[index].decode("utf-8", "replace")
        pairs.append((f"funcs_{name}", flat[index + 1]))
        pairs.append((f"slots_{name}", flat[index + 2]))
    return pairs
