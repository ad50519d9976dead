-- Cookbook: route tenants by key prefix ("tenant:rest-of-key").
--
--   acme:    a dedicated pair of servers holding the same data: writes go
--            to both; reads go to both and the first hit wins (a miss
--            only once both missed).
--   globex:  the shared pool.
--   trial:   the shared pool, but nothing it stores lives longer than
--            TRIAL_TTL seconds.
--   others:  "SERVER_ERROR no route".
--
-- Servers come from ACME ("host:port,host:port", one server per replica)
-- and SHARED.

local routes = require("mcproxy.routes")

local function servers(name, default)
    local list = {}
    for hostport in string.gmatch(os.getenv(name) or default, "[^,]+") do
        list[#list + 1] = hostport
    end
    return list
end

-- One single-server pool per replica.
local function replicas(name, default)
    local set = {}
    for i, hostport in ipairs(servers(name, default)) do
        set["r" .. i] = { backends = { hostport } }
    end
    return set
end

mcp_config_pools, mcp_config_routes = routes.config{
    pools = {
        acme = replicas("ACME", "127.0.0.1:11212,127.0.0.1:11213"),
        shared = { backends = servers("SHARED", "127.0.0.1:11214") },
    },
    routes = routes.prefix_router{
        stop = ":",
        map = {
            acme = {
                reads = routes.all_fastest("acme", { miss = true }),
                writes = routes.all_sync("acme"),
            },
            globex = "shared",
            trial = routes.ttl_cap("shared", tonumber(os.getenv("TRIAL_TTL") or "300")),
        },
    },
}
