"""End to end through ``twistd -n mcproxy`` in front of real memcached:
crons and mcp.schedule_config_reload, rate limits, a config of several
files, tunables in ``stats settings``, and a backend's request log."""

from __future__ import annotations

import pytest

from tests.e2e.test_v2_e2e import eventually, stats
from tests.servers import Memcached, Proxy, free_port


@pytest.fixture(scope="module")
def server():
    server = Memcached().start()
    yield server
    server.stop()


CRONS = """
function mcp_config_pools()
    mcp.register_cron("tick", { every = 1, func = function() mcp.log("cron tick") end })
    -- once per load: each load asks for the next one
    mcp.register_cron("reload", { every = 1, rerun = false, func = function()
        mcp.schedule_config_reload()
    end })
    return {}
end
function mcp_config_routes(p) end
"""


def test_crons_run_and_reload_the_config():
    proxy = Proxy(None, config_text=CRONS).start()
    try:
        eventually(lambda: int(stats(proxy)["proxy_config_reloads"]) >= 2, timeout=15)
        assert "cron tick" in proxy.log()
        assert stats(proxy)["proxy_config_reload_fails"] == "0"
    finally:
        proxy.stop()


RATELIM = """
function mcp_config_pools()
    mcp.backend_use_iothread(true)
    return { p = mcp.pool({ mcp.backend("a", "127.0.0.1", %(port)d) }),
             lim = mcp.ratelim_global_tbf({ limit = 3, fillrate = 1, tickrate = 100000 }) }
end
function mcp_config_routes(c)
    local tbf = mcp.ratelim_tbf({ limit = 50, fillrate = 4, tickrate = 100000 })
    mcp.attach(mcp.CMD_GET, function(r)
        if not tbf(15) then return "SERVER_ERROR slow down\\r\\n" end
        return c.p(r)
    end)
    mcp.attach(mcp.CMD_SET, function(r)
        if not c.lim(1) then return "SERVER_ERROR slow down\\r\\n" end
        return c.p(r)
    end)
end
"""


def test_rate_limits_and_tunables(server):
    proxy = Proxy(None, config_text=RATELIM % {"port": server.port}).start()
    try:
        assert [proxy.call(b"set rl 0 0 1\r\nx\r\n") for _ in range(3)] == \
            [b"STORED\r\n"] * 2 + [b"SERVER_ERROR slow down\r\n"]
        assert [proxy.call(b"get rl\r\nmn\r\n", b"MN\r\n") for _ in range(4)] == \
            [b"VALUE rl 0 1\r\nx\r\nEND\r\nMN\r\n"] * 3 + [b"SERVER_ERROR slow down\r\nMN\r\n"]
        settings = stats(proxy, b" settings")
        assert settings["proxy_backend_use_iothread"] == "yes"
        assert settings["proxy_backend_retry_waittime"] == "3.0"
    finally:
        proxy.stop()


def test_a_config_of_two_files(server, tmp_path):
    pools = tmp_path / "pools.lua"
    pools.write_text("function mcp_config_pools()\n"
                     f"    return mcp.pool({{ mcp.backend('a', '127.0.0.1', {server.port}) }})\n"
                     "end\n")
    routes = tmp_path / "routes.lua"
    routes.write_text("function mcp_config_routes(p)\n"
                      "    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return p(r) end)\n"
                      "end\n")
    proxy = Proxy(f"{pools}:{routes}").start()
    try:
        assert proxy.call(b"set two 0 0 1\r\ny\r\n") == b"STORED\r\n"
        assert server.get(b"two") == b"y"
    finally:
        proxy.stop()


def test_a_missing_second_file_is_a_usage_error(tmp_path):
    pools = tmp_path / "pools.lua"
    pools.write_text("function mcp_config_pools() return {} end\n")
    proxy = Proxy(f"{pools}:{tmp_path / 'nope.lua'}").start(wait=False)
    try:
        assert proxy.proc.wait(timeout=30) != 0
        assert f"--config: no such file: {tmp_path / 'nope.lua'}" in \
            proxy.proc.stdout.read().decode()
    finally:
        proxy.stop()


BACKEND_LOG = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend{ label = "gone", host = "127.0.0.1", port = %(port)d,
                                   connecttimeout = 0.2, log = { errors = true,
                                                                 tag = "gone-be" } } })
end
function mcp_config_routes(p)
    local fgen = mcp.funcgen_new()
    local h = fgen:new_handle(p)
    fgen:ready({ f = function(rctx) return function(r)
        local res = rctx:enqueue_and_wait(r, h)
        return res
    end end })
    mcp.attach(mcp.CMD_GET, fgen)
end
"""


def test_a_backend_log_logs_its_failures():
    proxy = Proxy(None, config_text=BACKEND_LOG % {"port": free_port()}).start()
    try:
        assert proxy.call(b"get lost\r\n") == b"SERVER_ERROR backend failure\r\n"
        eventually(lambda: "gone-be" in proxy.log())
    finally:
        proxy.stop()
