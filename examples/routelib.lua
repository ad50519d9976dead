local_zone("z1")

pools{
    main = { backends = { "127.0.0.1:11211", "127.0.0.1:11212" } },
    spare = { backend_options = { connecttimeout = 2 }, backends = { "127.0.0.1:11213" } },
    set_zones = {
        z1 = { backends = { "127.0.0.1:11211" } },
        z2 = { backends = { "127.0.0.1:11213" } },
    },
}

routes{
    map = {
        foo = route_failover{ children = { "main", "spare" }, miss = true },
        both = route_allsync{ children = { "main", "spare" } },
        near = route_zfailover{ children = "set_zones", miss = true },
        short = cmdmap{ [mcp.CMD_SET] = route_ttl{ ttl = 60, child = "main" } },
    },
    default = route_direct{ child = "main" },
}
