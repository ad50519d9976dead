"""Pool names, as the routes reach the pools (for the status page and metrics).

Pools have no names of their own (as in memcached): a pool is named by the
key the routes reach it by, found by a walk of the routes state from the
route functions and the globals. It runs in the routing layer, which owns
the Lua state, once per loaded config, when someone first asks
(``Routes.pools``); the operations layer reads only its result.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()

#: Lua, run in a routes state: breadth-first over what the route functions
#: (and the globals) reach, the pool proxies mcp_config_pools handed to
#: mcp_config_routes, each with the name it is reached by (``p.cache.main``
#: in a route is "cache.main"; a local ``main = p.main`` is "main").
_FIND_POOLS = """
function(roots, limit)
    local getupvalue, getmetatable, rawget, next, type, tostring =
        debug.getupvalue, getmetatable, rawget, next, type, tostring
    local seen, queue, found = {}, {}, {}
    local head, tail = 1, 0
    local function push(value, name, upvalue)
        local t = type(value)
        if (t == "table" or t == "function") and not seen[value] and tail < limit then
            seen[value] = true
            tail = tail + 1
            queue[tail] = { value, name, upvalue }
        end
    end
    for _, root in next, roots do push(root) end
    while head <= tail do
        local value, name, upvalue = queue[head][1], queue[head][2], queue[head][3]
        head = head + 1
        if type(value) == "function" then
            local i = 1
            while true do
                local uname, uvalue = getupvalue(value, i)
                if uname == nil then break end
                push(uvalue, uname, true)
                i = i + 1
            end
        else
            local mt = getmetatable(value)
            if type(mt) == "table" and rawget(mt, "__name") == "mcp.pool_proxy" then
                found[#found + 1] = { name or "", rawget(value, "_p") }
            else
                -- a table held by an upvalue or a global: its keys name what it holds
                local prefix = (not upvalue) and name or nil
                for key, item in next, value do
                    local kt = type(key)
                    if kt == "string" or kt == "number" then
                        key = tostring(key)
                        push(item, prefix and (prefix .. "." .. key) or key)
                    end
                end
            end
        end
    end
    return found
end
"""

#: At most this many Lua tables and functions are visited per config.
WALK_LIMIT = 50_000


def named_pools(runtime: Any, roots: list, created: list, path: str) -> list[tuple[str, Any]]:
    """``(name, Pool)`` of every pool of ``created`` (the pools the config's
    load made) that ``roots`` (route functions, the globals) reach in
    ``runtime``; a name given twice, or none, gets ``#n`` appended. Empty,
    and logged, if the walk fails."""
    mine = {id(pool) for pool in created}
    found: list[tuple[str, Any]] = []
    try:
        result = runtime.eval(_FIND_POOLS)(runtime.table_from(roots), WALK_LIMIT)
        seen: set[int] = set()
        names: set[str] = set()
        for i in range(1, len(result) + 1):
            name, pool = result[i][1], result[i][2]
            if id(pool) not in mine or id(pool) in seen:
                continue
            seen.add(id(pool))
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            if not name or name in names:
                name = f"{name or 'pool'}#{len(found) + 1}"
            names.add(name)
            found.append((name, pool))
    except Exception:
        log.failure("could not list the pools of {path}", path=path)
        return []
    return found
