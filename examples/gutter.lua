-- Cookbook: a gutter pool that takes over when the main pool fails.
--
-- Every request goes to the main pool; when the server that owns the key
-- is down or times out, the request goes to the gutter pool instead (a
-- miss is a valid answer and does not fail over). Items written to the
-- gutter live at most GUTTER_TTL seconds, so what the gutter holds goes
-- stale quickly once the main server is back.
--
-- Servers come from MAIN ("host:port,host:port") and GUTTER.

local routes = require("mcproxy.routes")

local function servers(name, default)
    local list = {}
    for hostport in string.gmatch(os.getenv(name) or default, "[^,]+") do
        list[#list + 1] = hostport
    end
    return list
end

local GUTTER_TTL = tonumber(os.getenv("GUTTER_TTL") or "10")

mcp_config_pools, mcp_config_routes = routes.config{
    tunables = { backend_read_timeout = 1, backend_retry_timeout = 1 },
    pools = {
        main = { backends = servers("MAIN", "127.0.0.1:11212,127.0.0.1:11213") },
        gutter = { backends = servers("GUTTER", "127.0.0.1:11214") },
    },
    routes = routes.failover{ "main", routes.ttl_cap("gutter", GUTTER_TTL) },
}
