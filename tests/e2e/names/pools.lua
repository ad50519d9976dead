-- The first of two files (tests/e2e/test_names_differential.py): pools,
-- tunables and a global rate limit. routes.lua attaches the routes.
function mcp_config_pools()
    -- (memcached runs each file in its worker states too, where these
    -- config-phase names do not exist: so they are called here)
    mcp.backend_retry_waittime(1.5)
    mcp.backend_use_iothread(false)
    mcp.stat_limit(16)
    mcp.add_stat(1, "names")
    local a = mcp.backend{ label = "a", host = "127.0.0.1", port = os.getenv("NAMES_A"),
                           log = { errors = true, tag = "a" } }
    local hole = mcp.backend{ label = "hole", host = "127.0.0.1",
                              port = os.getenv("NAMES_HOLE"), retrywaittime = 2 }
    return {
        a = mcp.pool({ a }),
        hole = mcp.pool({ hole }),
        lim = mcp.ratelim_global_tbf({ limit = 3, fillrate = 1, tickrate = 1000000 }),
    }
end
