-- Cookbook: choose what flush_all reaches.
--
-- Without a route for it, flush_all goes to every server of every pool.
-- Here page caches live in the cache pool and sessions in a pool of their
-- own: flush_all (a deploy script's, Django's cache.clear()) empties the
-- cache pool only, and sessions survive it. With FLUSH=refuse the proxy
-- refuses every flush_all with an error line instead.
--
-- Servers come from CACHE and SESSIONS ("host:port").

local routes = require("mcproxy.routes")

local pools_phase, routes_phase = routes.config{
    pools = {
        cache = { backends = { os.getenv("CACHE") or "127.0.0.1:11212" } },
        sessions = { backends = { os.getenv("SESSIONS") or "127.0.0.1:11213" } },
    },
    routes = routes.prefix_router{
        stop = ":",
        map = { session = "sessions" },
        default = "cache",
    },
}

mcp_config_pools = pools_phase

function mcp_config_routes(pools)
    routes_phase(pools)
    if os.getenv("FLUSH") == "refuse" then
        mcp.attach(mcp.CMD_FLUSH_ALL, function()
            return "SERVER_ERROR flush_all disabled on this proxy\r\n"
        end)
    else
        mcp.attach(mcp.CMD_FLUSH_ALL, routes.broadcast("cache"))
    end
end
