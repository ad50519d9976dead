"""Log observer factories for ``twistd --logger``.

twistd calls the factory named by ``--logger`` with no arguments (and then
ignores ``--logfile``), so the destination comes from the environment::

    twistd -n --logger=mcproxy.logging.json_observer mcproxy --config=route.lua

writes one JSON object per line and event (``twisted.logger.jsonFileLogObserver``
without its RFC 7464 record separator, so that ``jq`` and log shippers read
it as is: ``log_time``, ``log_level``, ``log_namespace``, ``log_format`` and
the event's fields, such as ``type`` and ``status``) to standard output, or,
when ``MCPROXY_JSON_LOG`` names a file, to that file, rotated like twistd's
``--logfile`` (by size, 1 MB). A daemonized twistd points standard output at
/dev/null, so set ``MCPROXY_JSON_LOG`` when running without ``-n``.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python.logfile import LogFile

#: The environment variable naming the JSON log file.
JSON_LOG_ENV = "MCPROXY_JSON_LOG"


def json_observer() -> ILogObserver:
    """A JSON-lines observer on ``$MCPROXY_JSON_LOG``, else standard output."""
    path = os.environ.get(JSON_LOG_ENV)
    output = LogFile.fromFullPath(os.path.abspath(path)) if path else sys.stdout
    return jsonFileLogObserver(output, recordSeparator="")
