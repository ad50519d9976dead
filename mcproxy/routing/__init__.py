"""Routing: the Lua engine, the mcp host, direct routes, tunables."""
