-- Route config for the benchmark's memcached-proxy system: memcached's own
-- proxy (1.6.45, ../shared/anchors/memcached-proxy-1.6.45) with its bundled
-- route library, started with -o proxy_config=routelib,proxy_arg=<this file>;
-- and for mcproxy-routelib: mcproxy on the same file, started with
-- --config=routelib --config-arg=<this file>.
--
-- One pool of one backend and a direct route for every command, as
-- route.lua and route_library.lua give mcproxy. bench/run.py passes the
-- memcached port in MCPROXY_BENCH_BACKEND_PORT.

settings{
    -- The in-flight memory test holds requests against a stopped memcached
    -- for a few seconds; the default 3 s read timeout could fire first.
    backend_read_timeout = 30,
}

pools{
    main = {
        backends = { "127.0.0.1:" .. (os.getenv("MCPROXY_BENCH_BACKEND_PORT") or "11211") },
    },
}

routes{
    default = route_direct{ child = "main" },
}
