"""The local ``stats`` replies: what memcached answers, where the proxy has it."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mcproxy.app.service import ProxyService
from mcproxy.counters import ProxyStats
from mcproxy.ops.stats import proxy_stats
from mcproxy.wire import errors

#: ``stats proxy``'s cmd_* lines as memcached's proxies 1.6.15 and 1.6.45 list them.
MEMCACHED_CMD_ORDER = [
    "cmd_mg", "cmd_ms", "cmd_md", "cmd_mn", "cmd_ma", "cmd_me", "cmd_get", "cmd_gat",
    "cmd_set", "cmd_add", "cmd_cas", "cmd_gets", "cmd_gats", "cmd_incr", "cmd_decr",
    "cmd_touch", "cmd_append", "cmd_prepend", "cmd_delete", "cmd_replace",
]


@pytest.fixture
def service():
    return ProxyService(None, [], reactor=Clock())


@pytest.mark.parametrize("line, reply", [
    (b"cachedump 1 1", errors.END),
    (b"cachedump 0 0", errors.END),
    (b"cachedump 63 0", errors.END),
    (b"cachedump 1 1 1", errors.END),
    (b"cachedump 1 99999999999", errors.END),
    (b"cachedump 64 0", errors.ILLEGAL_SLAB_ID),
    (b"cachedump", errors.STATS_BAD_COMMAND_LINE),
    (b"cachedump 1", errors.STATS_BAD_COMMAND_LINE),
    (b"cachedump x y", errors.BAD_COMMAND_LINE),
    (b"cachedump 1 x", errors.BAD_COMMAND_LINE),
    (b"cachedump -1 1", errors.BAD_COMMAND_LINE),
    (b"detail dump", errors.END),
    (b"detail dump x", errors.END),
    (b"detail on", errors.OK),
    (b"detail off", errors.OK),
    (b"detail on x", errors.OK),
    (b"detail", errors.DETAIL_USAGE),
    (b"detail foo", errors.DETAIL_USAGE),
    (b"detail OFF", errors.DETAIL_USAGE),
    (b"DETAIL dump", errors.ERROR),
    (b"frob", errors.ERROR),
])
def test_cachedump_and_detail_answer_as_memcached(service, line, reply):
    """Each ``stats <line>`` as memcached 1.6.18 and memcached's proxies
    1.6.15 and 1.6.45 all answered it (the embedded cache has nothing to
    dump); pymemcache's own ``test_misc`` sends ``stats cachedump 1 1`` and
    ``stats detail dump``."""
    assert service.stats_reply(line.split()) == reply


def test_stats_proxy_lists_commands_in_memcached_s_order():
    lines = proxy_stats(ProxyStats(), [("user_hits", 3)])
    assert [name for name, _ in lines] == ["user_hits", *MEMCACHED_CMD_ORDER]
