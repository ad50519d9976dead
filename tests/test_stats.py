"""The local ``stats`` replies: what memcached answers, where the proxy has it."""

from __future__ import annotations

from mcproxy.stats import ProxyStats, proxy_stats

#: ``stats proxy``'s cmd_* lines as memcached's proxies 1.6.15 and 1.6.45 list them.
MEMCACHED_CMD_ORDER = [
    "cmd_mg", "cmd_ms", "cmd_md", "cmd_mn", "cmd_ma", "cmd_me", "cmd_get", "cmd_gat",
    "cmd_set", "cmd_add", "cmd_cas", "cmd_gets", "cmd_gats", "cmd_incr", "cmd_decr",
    "cmd_touch", "cmd_append", "cmd_prepend", "cmd_delete", "cmd_replace",
]


def test_stats_proxy_lists_commands_in_memcached_s_order():
    lines = proxy_stats(ProxyStats(), [("user_hits", 3)])
    assert [name for name, _ in lines] == ["user_hits", *MEMCACHED_CMD_ORDER]
