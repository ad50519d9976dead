"""``mcproxy check FILE``: load a route config without running it.

Operators run this before sending SIGHUP: the config goes through both
phases (``mcp_config_pools``, then ``mcp_config_routes``) in a scratch
engine of its own, exactly as a reload would load it, but its backends never
connect (their registry is never started) and nothing is listened on.
"""

from __future__ import annotations

import sys

from mcproxy.backends.pool import BackendRegistry
from mcproxy.counters import ProxyStats
from mcproxy.routing.engine import ROUTELIB, ROUTELIB_PATH, ConfigError, RouteEngine
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats

#: What a good config prints.
OK = "OK"


def check_config(path: str, arg: str | None = None) -> str | None:
    """Load ``path`` (``arg``: its mcp.start_arg) in a scratch engine; the
    error (with file:line), or None."""
    stats = ProxyStats()
    engine = RouteEngine(stats, BackendRegistry(stats), Tunables(), UserStats())
    try:
        engine.load(path, arg)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # a bug of ours must still answer "not OK"
        return f"internal error loading {path}: {e!r}"
    finally:
        engine.stop()  # a checked config's crons never run
    return None


def main(path: str, arg: str | None = None) -> int:
    """Print ``OK`` (stdout) or the error (stderr); the exit status (0 good,
    1 bad). ``path`` ``routelib`` checks the route library file ``arg``."""
    if path == ROUTELIB:
        if arg is None:
            print("mcproxy check routelib needs --config-arg=FILE", file=sys.stderr)
            return 1
        path = ROUTELIB_PATH
    error = check_config(path, arg)
    if error is None:
        print(OK)
        return 0
    print(error, file=sys.stderr)
    return 1
