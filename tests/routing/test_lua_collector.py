"""Lua's collector in the routes states runs in generational mode
(engine._COLLECTOR_LUA), so that lupa's table of references to the Python
objects Lua holds stays as large as what Lua holds: in incremental mode it
grew by about one entry per two objects handed to Lua, the states' memory
and every collection with it."""

from __future__ import annotations

import pytest

from mcproxy.routing.engine import ConfigError
from tests.routing.luapaths import POOLS, LuaProxy

#: Routes that hand Lua fresh Python objects for every request: a lone get's
#: Request and Response, a multiget's batch and its KeyFetch, a set's
#: Request, the list of an await's responses and each of them.
ROUTE = POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, function(r)
        local res = p.b(r)
        return res
    end)
    mcp.attach(mcp.CMD_SET, function(r)
        return mcp.await(r, { p.a, p.b }, 2)[1]
    end)
end
"""

#: What Lua's table of references may hold here: the userdata of what the
#: config keeps (pools, host, handlers), those of the requests in flight
#: and of the garbage not yet collected, and the free slots between.
REFERENCES_BOUND = 3_000


def references(lua: LuaProxy) -> int:
    """Entries in lupa's table of references to Python objects."""
    count = lua.routes.state.runtime.eval("""function()
        local n = 0
        for _ in pairs(debug.getregistry().LUPA_PYTHON_REFERENCES_TABLE) do n = n + 1 end
        return n
    end""")
    return count()


def test_references_to_python_objects_stay_bounded(tmp_path):
    path = tmp_path / "route.lua"
    path.write_text(ROUTE)
    lua = LuaProxy(str(path), True)
    multiget = b"get " + b" ".join(b"k%d" % i for i in range(10)) + b"\r\n"
    streams = [[b"set k%d 0 0 1\r\nv\r\n" % i, multiget, b"get k%d\r\n" % i] for i in range(40)]
    for _ in range(100):
        lua.exchange_many(streams)
    assert references(lua) < REFERENCES_BOUND


def test_every_state_collects_generationally(tmp_path):
    path = tmp_path / "route.lua"
    path.write_text(ROUTE)
    lua = LuaProxy(str(path), True)
    mode = lua.routes.state.runtime.eval('function() return collectgarbage("generational") end')
    assert mode() == b"generational"


@pytest.mark.parametrize("where", ["at load", "in mcp_config_pools", "in mcp_config_routes"])
def test_a_config_cannot_leave_generational_mode(tmp_path, where):
    call = 'collectgarbage("incremental")\n'
    config = POOLS + "function mcp_config_routes(p) mcp.attach(mcp.CMD_GET, p.b) end\n"
    if where == "at load":
        config = call + config
    elif where == "in mcp_config_pools":
        config = config.replace("function mcp_config_pools()\n",
                                "function mcp_config_pools()\n" + call)
    else:
        config = config.replace("function mcp_config_routes(p) ",
                                "function mcp_config_routes(p) " + call)
    path = tmp_path / "route.lua"
    path.write_text(config)
    with pytest.raises(ConfigError, match="generational mode only"):
        LuaProxy(str(path), True)
