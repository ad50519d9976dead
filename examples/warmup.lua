-- Cookbook: warm a new cluster from the old one.
--
-- The new cluster answers everything. A get that misses in it is read
-- from the old cluster; a hit there is copied into the new cluster (with
-- its flags and its remaining TTL) and served. Deletes also reach the old
-- cluster, so a deleted value cannot come back from it. Once the new
-- cluster's hit rate has caught up, drop the old one from the config.
--
-- Servers come from NEW and OLD ("host:port,host:port").

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
        new = { backends = servers("NEW", "127.0.0.1:11212") },
        old = { backends = servers("OLD", "127.0.0.1:11213") },
    },
    routes = routes.warmup("new", "old"),
}
