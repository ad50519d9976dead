-- Zone-aware routing with replication, as memcached's own proxy test config
-- does it: keys start with a prefix ("/foo/..." or "/bar/...") that picks a
-- cluster; each cluster is replicated in three zones; z1 is the local zone.
--
--   * set and delete go to every zone at once (mcp.await), and the client
--     gets the first successful answer;
--   * every other command reads from the local zone and fails over to the
--     other zones, one after the other, until one has the key;
--   * a key without a known prefix gets "SERVER_ERROR no route".
--
-- Servers come from environment variables such as FOO_Z1="host:port,host:port"
-- so that the tests can point the config at their own memcached servers.

local function servers(name, default)
    local list = {}
    for hostport in string.gmatch(os.getenv(name) or default, "[^,]+") do
        local host, port = string.match(hostport, "^(.+):(%d+)$")
        list[#list + 1] = { host = host, port = port }
    end
    return list
end

function mcp_config_pools()
    mcp.add_stat(1, "no_route")
    local clusters = {}
    for _, prefix in ipairs({ "foo", "bar" }) do
        local zones = {}
        for z = 1, 3 do
            local env = string.upper(prefix) .. "_Z" .. z
            local backends = {}
            for i, s in ipairs(servers(env, "127.0.0.1:1121" .. z)) do
                backends[i] = mcp.backend(prefix .. "_z" .. z .. "_" .. i, s.host, s.port)
            end
            zones[z] = mcp.pool(backends)
        end
        clusters[prefix] = zones
    end
    return clusters
end

-- Send to every zone; answer with the first good response.
local function walkall(zones)
    return function(r)
        local results = mcp.await(r, zones)
        for _, res in ipairs(results) do
            if res:ok() then
                return res
            end
        end
        return results[1]
    end
end

-- Local zone first, then the others until one has the key.
local function failover(zones)
    return function(r)
        local res = zones[1](r)
        for z = 2, #zones do
            if res:hit() then
                break
            end
            mcp.log("failed to find " .. r:key() .. " in zone " .. (z - 1))
            res = zones[z](r)
        end
        return res
    end
end

function mcp_config_routes(clusters)
    local routes = {}
    for prefix, zones in pairs(clusters) do
        routes[prefix] = {
            [mcp.CMD_SET] = walkall(zones),
            [mcp.CMD_DELETE] = walkall(zones),
            default = failover(zones),
        }
    end

    mcp.attach(mcp.CMD_ANY_STORAGE, function(r)
        local prefix = string.match(r:key(), "^/(%a+)/")
        local route = routes[prefix]
        if route == nil then
            mcp.stat(1, 1)
            return "SERVER_ERROR no route\r\n"
        end
        return (route[r:command()] or route.default)(r)
    end)
end
