-- Listener tags: one proxy, three ports, three route tables.
--
--   twistd -n mcproxy --config=examples/tags.lua \
--       --listen=tcp:11211 --listen=tag_api_:tcp:11212 --listen=tag[batch]:tcp:11213
--
-- Clients of port 11211 (untagged) read and write the main pool; those of
-- 11212 (tag "api") get their reads from the replica and write to main
-- (the untagged set route: a tag falls back to it, command by command);
-- those of 11213 (tag "batch") may not delete, and get what they miss on
-- main from the replica.

function mcp_config_pools()
    return {
        main = mcp.pool({ mcp.backend("main1", "127.0.0.1", 11311),
                          mcp.backend("main2", "127.0.0.1", 11312) }),
        replica = mcp.pool({ mcp.backend("replica1", "127.0.0.1", 11313) }),
    }
end

function mcp_config_routes(p)
    local main, replica = p.main, p.replica

    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return main(r) end)

    mcp.attach(mcp.CMD_GET, function(r) return replica(r) end, "api")
    mcp.attach(mcp.CMD_MG, function(r) return replica(r) end, "api")

    mcp.attach(mcp.CMD_DELETE, function(r)
        return "SERVER_ERROR deletes are not taken on this port\r\n"
    end, "batch")
    mcp.attach(mcp.CMD_GET, function(r)
        local res = main(r)
        if res:hit() then
            return res
        end
        return replica(r)
    end, "batch")
end
