"""ProxyStats: the counters of one proxy process.

Every layer counts into it (connections, backend failures, reloads, routed
commands); ops/stats.py formats them. Plain attributes, so counting costs
an attribute add on the hot path.
"""

from __future__ import annotations

import time

from mcproxy.wire.request import CMD_GET, CMD_SET, COMMAND_NAMES


class ProxyStats:
    """Counters of one proxy process."""

    def __init__(self) -> None:
        self.started = time.time()
        self.curr_connections = 0
        self.total_connections = 0
        self.conn_requests = 0
        self.conn_errors = 0
        self.conn_oom = 0
        #: clients closed for --client-output-limit
        self.conn_output_closed = 0
        self.req_active = 0
        self.config_reloads = 0
        self.config_reload_fails = 0
        self.backend_total = 0
        self.backend_marked_bad = 0
        self.backend_failed = 0
        #: backend connections reset for a reply that did not answer its request
        self.backend_mismatches = 0
        #: per command id, hooked requests routed through Lua (every id, so
        #: the hot path needs no membership test; only PROXY_CMD_ORDER shows)
        self.commands = dict.fromkeys(COMMAND_NAMES, 0)

    def count_run(self, requests: int, sets: int) -> None:
        """Count a run's requests (``sets`` of them sets, the rest gets) as
        routing them one by one would, active until answered."""
        self.conn_requests += requests
        self.req_active += requests
        commands = self.commands
        if sets:  # (most runs have none)
            commands[CMD_SET] += sets
            requests -= sets
        commands[CMD_GET] += requests

    def count_keys(self, command: int, count: int) -> None:
        """Count the ``count`` keys of a multiget routed together as the
        requests routing them one by one would, active until answered."""
        self.conn_requests += count
        self.commands[command] += count
        self.req_active += count
