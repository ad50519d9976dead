"""Crons: config-phase Lua functions run every few seconds
(``mcp.register_cron(name, { every = s, rerun = bool, func = f })``).

As in memcached 1.6.45: a cron first runs ``every`` seconds after it was
registered and then every ``every`` seconds; ``rerun = false`` runs it once.
A cron's function runs in the config-phase Lua state of the load that
registered it. An error in it is logged (``type=proxy_error``) and the cron
keeps running. A reload replaces every cron with those the new load
registered; one registered again under the same name with the same
``every`` keeps its schedule, so reloading does not postpone it. A failed
reload leaves the running crons alone. They run on the engine's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lupa import lua54
from twisted.logger import Logger

log = Logger(namespace="mcproxy.routing")


class CronError(ValueError):
    """An ``mcp.register_cron`` call memcached would refuse; the text is the
    Lua error."""


@dataclass
class Cron:
    """One registered cron; ``due`` is the clock time of its next run."""

    name: str
    every: int
    rerun: bool
    func: Any
    due: float
    call: Any = field(default=None, repr=False)


def make_cron(name: str, table, now: float) -> Cron:
    """The cron an ``mcp.register_cron(name, table)`` call describes."""
    fields = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in table.items()}
    for key in fields:
        if key not in ("every", "rerun", "func"):
            raise CronError(f"mcp.register_cron: unknown option '{key}'")
    func = fields.get("func")
    if func is None:
        raise CronError("proxy cron entry missing 'func' field")
    if lua54.lua_type(func) != "function":
        raise CronError("proxy cron entry 'func' must be a function")
    every = fields.get("every")
    if every is None:
        raise CronError("proxy cron entry missing 'every' field")
    if isinstance(every, bool) or not isinstance(every, int | float):
        raise CronError("proxy cron entry 'every' must be a number")
    every = int(every)
    if every < 1:
        raise CronError("proxy cron entry 'every' must be > 0")
    rerun = fields.get("rerun")
    return Cron(name, every, rerun is None or bool(rerun), func, now + every)


class Crons:
    """The crons of the active routes, run on ``clock``."""

    def __init__(self, clock) -> None:
        self.clock = clock
        #: name -> the cron running under it
        self.running: dict[str, Cron] = {}

    def switch(self, crons: dict[str, Cron]) -> None:
        """Stop the running crons and start ``crons`` (a new load's)."""
        old = self.running
        self.stop()
        now = self.clock.seconds()
        for name, cron in crons.items():
            before = old.get(name)
            if before is not None and before.every == cron.every:
                cron.due = before.due
            self._arm(cron, now)
        self.running = dict(crons)

    def stop(self) -> None:
        for cron in self.running.values():
            if cron.call is not None and cron.call.active():
                cron.call.cancel()
            cron.call = None
        self.running = {}

    def _arm(self, cron: Cron, now: float) -> None:
        cron.call = self.clock.callLater(max(cron.due - now, 0), self._run, cron)

    def _run(self, cron: Cron) -> None:
        cron.call = None
        try:
            cron.func()
        except lua54.LuaError as e:
            message = e.args[0] if e.args else str(e)
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            log.error("cron {name}: {msg}", name=cron.name,
                      msg=str(message).split("\nstack traceback:", 1)[0],
                      type="proxy_error")
        except Exception:
            log.failure("internal error running cron {name}", name=cron.name)
        if self.running.get(cron.name) is not cron:
            return  # the cron replaced itself (it reloaded the config)
        if not cron.rerun:
            del self.running[cron.name]
            return
        now = self.clock.seconds()
        cron.due = now + cron.every
        self._arm(cron, now)
