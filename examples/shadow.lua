-- Cookbook: shadow production traffic to a new cluster.
--
-- Clients are answered by the current cluster only. A copy of every
-- request for a share of the keys (SHADOW_FRACTION, 0 to 1; always the
-- same keys, so the new cluster sees the sets and the gets of the keys it
-- is shown) goes to the new cluster in the background; its answers, and
-- its failures, are ignored.
--
-- Servers come from CURRENT and NEW ("host:port,host:port").

local routes = require("mcproxy.routes")

local function servers(name, default)
    local list = {}
    for hostport in string.gmatch(os.getenv(name) or default, "[^,]+") do
        list[#list + 1] = hostport
    end
    return list
end

mcp_config_pools, mcp_config_routes = routes.config{
    pools = {
        current = { backends = servers("CURRENT", "127.0.0.1:11212") },
        new = { backends = servers("NEW", "127.0.0.1:11213") },
    },
    routes = routes.split("current", "new", {
        fraction = tonumber(os.getenv("SHADOW_FRACTION") or "1"),
    }),
}
