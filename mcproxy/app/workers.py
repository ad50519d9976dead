"""``--workers=N``: the supervisor of N worker processes (a worker: mcproxy.app.worker).

With ``--workers`` above 1 the twistd process does not proxy anything
itself. It checks the config, binds every ``--listen`` endpoint (in
``privilegedStartService``, so ``--uid`` and low ports work, and the port
stays held while a worker restarts) and runs N workers, each
``python -m mcproxy worker``: its own reactor, Lua state, backend
connections and embedded cache.

Sockets. On Linux the supervisor binds one socket per worker slot and
endpoint, all on the same address with ``SO_REUSEPORT``; the kernel spreads
new connections evenly over them by a hash of the client's address and
port. (A single shared socket would let whichever worker wakes first accept
a whole burst of connections.) A connection that hashes to a slot whose
worker is restarting waits in that socket's backlog until the new worker
adopts it. Elsewhere one socket is shared by all workers. A worker gets its
sockets as inherited descriptors, each with the ``--listen`` it was bound
for (its listener tag too), and adopts them with ``reactor.adoptStreamPort``
(wrapping the factory in TLS for an ``ssl:`` endpoint).

Control. A worker's stdin and stdout are its control pipe: JSON lines. Once
it serves (its SIGHUP handler installed) a worker reports ``{"ready": true}``.
Every ``STATS_INTERVAL`` it sends its ``stats`` figures up, as data
(``{"stats": [[name, value], ...]}``); the supervisor sends every worker the
table of all workers' latest figures, from which ``stats workers`` is added
up on the client port (mcproxy.ops.stats.workers_stats). Its stderr carries its
log events as JSON lines, which the supervisor logs again with
``log_system`` set to ``worker-<slot>`` (anything else a worker writes
there, such as a traceback, is logged as text). A worker whose stdin closes
(the supervisor died) stops.

Metrics. With ``--metrics`` the supervisor serves the endpoint
(mcproxy.ops.webworkers). For each request it asks every running worker
(``{"ask": "snapshot", "id": n}``) and waits up to ``ASK_TIMEOUT`` for the
answers (``{"answer": n, "body": ...}``): the worker's snapshot
(mcproxy.ops.stats.Snapshot) as data, taken in its reactor thread, from
which the supervisor renders what a single process would serve.

Signals. SIGHUP to the supervisor is sent on to every worker, each of which
reloads (and logs the outcome). No HUP may kill a worker, and until its
reactor runs it has no handler: a worker is spawned with SIGHUP blocked and
ignores it from its first line (mcproxy.__main__.ignore_hup) until it is
ready, and the supervisor keeps a HUP for a worker that is not ready yet
and sends it once the worker reports ready, so that the worker reloads a
config changed while it started. SIGTERM/SIGINT stop the workers (SIGTERM,
then SIGKILL after ``STOP_TIMEOUT``) and then the supervisor. A worker that
exits while the supervisor runs is logged with its exit status and started
again after ``RESTART_DELAY`` seconds, doubled for each further quick exit
(one within ``STABLE_AFTER`` seconds of starting), up to
``MAX_RESTART_DELAY``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.logger import Logger, eventFromJSON, globalLogPublisher

from mcproxy.app.listen import DEFAULT_BACKLOG, parse_listen, with_backlog
from mcproxy.ops.stats import Pairs, Snapshot

#: Seconds between a worker's stats reports (and the supervisor's tables).
STATS_INTERVAL = 1.0
#: Seconds the supervisor waits for the workers' snapshots (for --metrics).
ASK_TIMEOUT = 1.5
#: What the supervisor asks a worker for: its snapshot.
ASK_SNAPSHOT = "snapshot"
#: Seconds before a worker that exited is started again, at first.
RESTART_DELAY = 1.0
#: The longest wait before a restart, however often a worker fails.
MAX_RESTART_DELAY = 30.0
#: A worker that ran this long (seconds) resets the restart delay.
STABLE_AFTER = 10.0
#: Seconds the workers get to stop after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: The first descriptor a worker finds its listening sockets on.
FIRST_FD = 3

#: mcproxy options a worker does not get: the supervisor handles them.
SUPERVISOR_OPTIONS = frozenset({"backlog", "listen", "metrics", "workers"})

# Log events.
LOG_STARTED = "worker {slot} started (pid {pid})"
LOG_EXITED = "worker {slot} (pid {pid}) {what} {status}; restarting it in {delay:.1f}s"
LOG_STOPPING = "stopping {count} workers"
LOG_HUP = "SIGHUP: reloading the route config in {count} workers"
LOG_READY = "worker {slot} (pid {pid}) ready"
LOG_HUP_LATER = "worker {slot} (pid {pid}) is starting: it reloads once ready"


def reuseport_supported() -> bool:
    """Whether SO_REUSEPORT spreads connections over sockets (Linux does)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def is_tcp_endpoint(description: str) -> bool:
    """Whether a --listen endpoint string is TCP (v4 or v6), or TLS over TCP
    (``ssl:``): the endpoints a supervisor can bind for its workers."""
    from twisted.internet import reactor

    endpoint = serverFromString(reactor, description)
    return type(endpoint) in (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)


def bind_tcp(description: str, count: int, reuseport: bool) -> list[socket.socket]:
    """``count`` listening, non-blocking sockets for a TCP endpoint string.

    With ``reuseport`` they are separate sockets sharing the address through
    SO_REUSEPORT (a port of 0 becomes the port the first one got); otherwise
    there is one socket, to be shared.
    """
    from twisted.internet import reactor

    endpoint = serverFromString(reactor, description)
    # Twisted's TCP server endpoints keep what they parsed in these.
    port, backlog = endpoint._port, endpoint._backlog
    v6 = isinstance(endpoint, TCP6ServerEndpoint)
    interface = endpoint._interface or ("::" if v6 else "")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuseport else 1):
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((interface, port))
            port = s.getsockname()[1]
            s.listen(backlog)
            s.setblocking(False)
    except OSError as e:
        for s in sockets:
            s.close()
        raise error.CannotListenError(interface, port, e) from None
    return sockets


def worker_arguments(options: Any) -> list[str]:
    """The mcproxy options a worker is started with: every option of
    ``options`` (a parsed mcproxy.app.tap.Options) that differs from its
    default, but those the supervisor handles."""
    args = []
    for long, _short, default, *_ in options.optParameters:
        value = options[long]
        if long in SUPERVISOR_OPTIONS or value is None or value == default:
            continue
        if long == "config":
            value = os.path.abspath(value)
        args.append(f"--{long}={value}")
    for long, *_ in getattr(options, "optFlags", []):
        if long not in SUPERVISOR_OPTIONS and options[long]:
            args.append(f"--{long}")
    return args


# -- the supervisor -------------------------------------------------------------------


class WorkerProcess(protocol.ProcessProtocol):
    """The supervisor's end of one worker: its control pipe and log."""

    log = Logger()

    def __init__(self, supervisor: WorkerSupervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.pid: int | None = None
        #: when it was started, on the supervisor's reactor clock
        self.started = supervisor.reactor.seconds()
        self.ended: defer.Deferred = defer.Deferred()
        #: the worker reported it serves; until then a SIGHUP could kill it
        self.ready = False
        #: a SIGHUP came before the worker was ready: send it once it is
        self.hup_due = False
        self._out = b""
        self._err = b""
        #: the unanswered asks, by id
        self._asked: dict[int, defer.Deferred] = {}
        self._ids = itertools.count()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def send(self, message: dict) -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.write(json.dumps(message).encode() + b"\n")

    def ask(self, what: str) -> defer.Deferred:
        """Ask the worker for its ``what`` (ASK_SNAPSHOT): fires with the
        answer (JSON data, or None if the worker could not give it), or
        fails if the worker ends first. Cancelling it forgets the ask."""
        ask_id = next(self._ids)
        asked = defer.Deferred(lambda _: self._asked.pop(ask_id, None))
        self._asked[ask_id] = asked
        self.send({"ask": what, "id": ask_id})
        return asked

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def hup(self) -> None:
        """Pass a SIGHUP on: now if the worker is ready, else once it is."""
        if self.ready:
            self.signal("HUP")
        elif not self.hup_due:
            self.hup_due = True
            self.log.info(LOG_HUP_LATER, slot=self.slot, pid=self.pid)

    def outReceived(self, data: bytes) -> None:
        *lines, self._out = (self._out + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                self.log.warn("worker {slot}: bad control line {line!r}",
                              slot=self.slot, line=line[:200])
                continue
            if "stats" in message:
                self.supervisor.worker_reported(self.slot, message["stats"])
            elif message.get("ready") and not self.ready:
                self.ready = True
                self.supervisor.worker_ready(self)
            elif "answer" in message:
                asked = self._asked.pop(message["answer"], None)
                if asked is not None:  # else it timed out
                    asked.callback(message.get("body"))

    def errReceived(self, data: bytes) -> None:
        *lines, self._err = (self._err + data).split(b"\n")
        for line in lines:
            self._relog(line)

    def _relog(self, line: bytes) -> None:
        """Log again one line of the worker's stderr: a JSON event, or text."""
        if not line.strip():
            return
        try:
            event = eventFromJSON(line.decode(errors="replace"))
        except ValueError:
            event = None
        if not isinstance(event, dict) or "log_time" not in event:
            self.log.info("{text}", text=line.decode(errors="replace"),
                          log_system=f"worker-{self.slot}")
            return
        event["log_system"] = f"worker-{self.slot}"
        event["worker_pid"] = self.pid
        globalLogPublisher(event)

    def processEnded(self, reason) -> None:
        if self._err:
            self._relog(self._err)
            self._err = b""
        asked, self._asked = self._asked, {}
        for waiting in asked.values():
            waiting.errback(reason)
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


def exit_status(value: Exception) -> str:
    """How a worker ended, in words, from processEnded's reason."""
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    return "exited with status 0"


class WorkerSupervisor(MultiService):
    """Runs ``count`` mcproxy worker processes on shared listening sockets
    (bound with ``backlog`` unless a ``listen`` string names its own), and
    serves their metrics on the ``metrics`` endpoints."""

    log = Logger()

    def __init__(self, count: int, listen: list[str], worker_args: list[str],
                 reactor=None, metrics: list[str] = (),
                 backlog: int = DEFAULT_BACKLOG) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.count = count
        self.backlog = backlog
        self.listen = list(listen)
        self.worker_args = list(worker_args)
        self.reuseport = reuseport_supported()
        #: per --listen endpoint, its sockets (one per slot, or one shared)
        self.sockets: list[list[socket.socket]] = []
        #: the running worker of each slot
        self.workers: dict[int, WorkerProcess] = {}
        #: each slot's last stats report (general stats, as data)
        self.reports: dict[int, Pairs] = {}
        self.restarts = 0
        self._quick_exits: dict[int, int] = {}
        self._pending: dict[int, Any] = {}
        self._stopping = False
        self._hup_pending = False
        self._previous_hup: Any = None
        self._broadcast: task.LoopingCall | None = None
        #: when the supervisor was made (unix time), for the status page
        self.started = time.time()
        self.ask_timeout = ASK_TIMEOUT
        if metrics:
            from mcproxy.ops.webworkers import metrics_service  # needs prometheus_client
            for description in metrics:
                metrics_service(self, description).setServiceParent(self)

    # -- Service ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()  # binds the metrics endpoints

    def _bind(self) -> None:
        for description in self.listen:
            endpoint = parse_listen(description).endpoint
            self.sockets.append(bind_tcp(with_backlog(endpoint, self.backlog),
                                         self.count, self.reuseport))

    def startService(self) -> None:
        if not self.sockets:  # not started by twistd
            self._bind()
        super().startService()
        self._stopping = False
        try:  # before the workers, so that none misses a HUP
            self._previous_hup = signal.signal(signal.SIGHUP, self._hup)
        except ValueError:
            self._previous_hup = None  # not the main thread
        for slot in range(self.count):
            self._spawn(slot)
        self._broadcast = task.LoopingCall(self._send_tables)
        self._broadcast.clock = self.reactor
        self._broadcast.start(STATS_INTERVAL, now=False)

    def stopService(self):
        self._stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self._broadcast is not None and self._broadcast.running:
            self._broadcast.stop()
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        workers = list(self.workers.values())
        self.log.info(LOG_STOPPING, count=len(workers))
        for worker in workers:
            worker.signal("TERM")
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill, workers)
        ended = defer.gatherResults([w.ended for w in workers])

        def stopped(_):
            if kill.active():
                kill.cancel()
            for sockets in self.sockets:
                for s in sockets:
                    s.close()
            self.sockets = []
            return super(WorkerSupervisor, self).stopService()

        return ended.addCallback(stopped)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self.log.warn("worker {slot} (pid {pid}) did not stop; killing it",
                              slot=worker.slot, pid=worker.pid)
                worker.signal("KILL")

    # -- workers ---------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        args = [sys.executable, "-m", "mcproxy", "worker", f"--worker-id={slot}"]
        for i, (description, sockets) in enumerate(zip(self.listen, self.sockets,
                                                       strict=True)):
            fd = FIRST_FD + i
            child_fds[fd] = sockets[slot if self.reuseport else 0].fileno()
            args.append(f"--fd={fd}={description}")
        args += ["--", *self.worker_args]
        worker = WorkerProcess(self, slot)
        # The child inherits the blocked mask through the exec (Twisted
        # resets only ignored signals), so a HUP cannot kill it before its
        # first line ignores SIGHUP; ours stays pending meanwhile, not lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(),
                                      childFDs=child_fds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[slot] = worker
        self.log.info(LOG_STARTED, slot=slot, pid=worker.pid)

    def _respawn(self, slot: int) -> None:
        """Start a slot's worker again; if that fails, log it and retry later."""
        try:
            self._spawn(slot)
        except Exception as e:
            self._restart_later(slot, "could not be started", repr(e), None)

    def _restart_later(self, slot: int, what: str, status: str, pid: int | None) -> None:
        quick = self._quick_exits.get(slot, 0)
        self._quick_exits[slot] = quick + 1
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** quick)
        self.log.error(LOG_EXITED, slot=slot, pid=pid, what=what, status=status, delay=delay)
        self._pending[slot] = self.reactor.callLater(delay, self._respawn, slot)

    def worker_ended(self, worker: WorkerProcess, reason: Exception) -> None:
        """A worker's process is gone: restart it unless we are stopping."""
        slot = worker.slot
        if self.workers.get(slot) is worker:
            del self.workers[slot]
        self.reports.pop(slot, None)
        status = exit_status(reason)
        if self._stopping or not self.running:
            self.log.info("worker {slot} (pid {pid}) {status}",
                          slot=slot, pid=worker.pid, status=status)
            return
        if self.reactor.seconds() - worker.started >= STABLE_AFTER:
            self._quick_exits[slot] = 0
        self.restarts += 1
        self._restart_later(slot, "ended:", status, worker.pid)

    def worker_reported(self, slot: int, pairs: Pairs) -> None:
        self.reports[slot] = pairs

    def worker_ready(self, worker: WorkerProcess) -> None:
        """A worker serves and handles SIGHUP: send it the HUP it missed."""
        self.log.info(LOG_READY, slot=worker.slot, pid=worker.pid)
        due, worker.hup_due = worker.hup_due, False
        if due and not self._stopping:
            worker.signal("HUP")

    def ask_workers(self, what: str) -> defer.Deferred:
        """Ask every running worker for its ``what`` (see WorkerProcess.ask).

        Fires, within ``ask_timeout``, with ``{slot: (worker, answer)}`` for
        every worker asked; the answer is None where none came in time.
        """
        asked = sorted(self.workers.items())
        waits = [worker.ask(what).addTimeout(self.ask_timeout, self.reactor)
                 for _slot, worker in asked]

        def answers(results: list) -> dict[int, tuple[WorkerProcess, Any]]:
            return {slot: (worker, body if ok else None)
                    for (slot, worker), (ok, body) in zip(asked, results, strict=True)}

        return defer.DeferredList(waits, consumeErrors=True).addCallback(answers)

    def ask_snapshots(self) -> defer.Deferred:
        """Every running worker's snapshot, as ask_workers gathers them:
        ``{slot: (worker, Snapshot or None)}``."""
        def snapshots(answers: dict) -> dict[int, tuple[WorkerProcess, Snapshot | None]]:
            return {slot: (worker, None if data is None else Snapshot.from_data(data))
                    for slot, (worker, data) in answers.items()}

        return self.ask_workers(ASK_SNAPSHOT).addCallback(snapshots)

    def _send_tables(self) -> None:
        message = {"workers": {str(slot): pairs for slot, pairs in self.reports.items()},
                   "restarts": self.restarts}
        for worker in list(self.workers.values()):
            worker.send(message)

    # -- SIGHUP ----------------------------------------------------------------

    def _hup(self, signum: int, frame: Any) -> None:
        """Only queue the forwarding on the reactor (coalescing HUPs)."""
        if not self._hup_pending:
            self._hup_pending = True
            self.reactor.callFromThread(self._forward_hup)

    def _forward_hup(self) -> None:
        self._hup_pending = False
        if self._stopping:
            return
        self.log.info(LOG_HUP, count=len(self.workers))
        for worker in list(self.workers.values()):
            worker.hup()
