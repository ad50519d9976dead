-- Cookbook: one cache replicated in three zones, reads served locally.
--
-- Every zone holds a full copy. Writes (set, delete, touch ...) go to all
-- three zones at once and the client gets the first good answer, so one
-- zone being down does not fail writes. Reads go to the local zone; if it
-- misses or fails, the two other zones are asked at once and the first hit
-- wins.
--
-- Servers come from ZONE_A, ZONE_B, ZONE_C ("host:port,host:port"); the
-- zone this proxy runs in from LOCAL_ZONE (a, b or c).

local routes = require("mcproxy.routes")

local function servers(name, default)
    local list = {}
    for hostport in string.gmatch(os.getenv(name) or default, "[^,]+") do
        list[#list + 1] = hostport
    end
    return list
end

local function zone(name, default)
    return { backends = servers(name, default) }
end

mcp_config_pools, mcp_config_routes = routes.config{
    pools = {
        zones = {
            a = zone("ZONE_A", "127.0.0.1:11212"),
            b = zone("ZONE_B", "127.0.0.1:11213"),
            c = zone("ZONE_C", "127.0.0.1:11214"),
        },
    },
    routes = {
        reads = routes.zfailover("zones", os.getenv("LOCAL_ZONE") or "a"),
        writes = routes.all_sync("zones"),
    },
}
