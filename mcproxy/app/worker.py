"""One worker process of ``twistd mcproxy --workers=N`` (``python -m mcproxy worker``).

The supervisor (mcproxy.app.workers) starts it with its listening sockets
as inherited descriptors and its control pipe on stdin and stdout; the
worker builds its proxy from the mcproxy options, as ``twistd mcproxy``
does (mcproxy.app.tap), serves the sockets, and reports over the pipe.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from mcproxy.app.listen import parse_listen
from mcproxy.app.tap import Options, makeService
from mcproxy.app.workers import ASK_SNAPSHOT, STATS_INTERVAL


def worker_factory(description: str, factory: Any, reactor: Any) -> Any:
    """The factory a worker serves an inherited socket of the ``--listen``
    endpoint ``description`` with: ``factory`` itself for TCP, wrapped in
    TLS for ``ssl:`` (the endpoint string names the certificate)."""
    endpoint = serverFromString(reactor, description)
    if type(endpoint) is not SSL4ServerEndpoint:
        return factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    # What SSL4ServerEndpoint.listen would wrap the factory with.
    return TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)


class AdoptedPort(Service):
    """Accept connections for ``factory`` on an inherited listening socket."""

    def __init__(self, fd: int, factory, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.port = None

    def startService(self) -> None:
        super().startService()
        inherited = socket.socket(fileno=self.fd)  # learns the address family
        try:
            self.port = self.reactor.adoptStreamPort(self.fd, inherited.family, self.factory)
        finally:
            inherited.close()  # adoptStreamPort holds its own duplicate

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class WorkerControl(LineReceiver):
    """A worker's end of its control pipe (stdin and stdout)."""

    delimiter = b"\n"
    MAX_LENGTH = 2**24
    log = Logger()

    def __init__(self, service, reactor) -> None:
        self.service = service
        self.reactor = reactor
        self._reports = task.LoopingCall(self.report)
        self._reports.clock = reactor

    def connectionMade(self) -> None:
        self._reports.start(STATS_INTERVAL, now=True)

    def ready(self) -> None:
        """Tell the supervisor this worker serves and reloads on SIGHUP."""
        self.transport.write(json.dumps({"ready": True}).encode() + b"\n")

    def report(self) -> None:
        """Send this worker's ``stats`` figures up, as data."""
        message = {"stats": self.service.general_stats()}
        self.transport.write(json.dumps(message).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if "workers" in message:
            self.service.worker_table = {int(slot): pairs
                                         for slot, pairs in message["workers"].items()}
            self.service.worker_restarts = message.get("restarts", 0)
        elif "ask" in message:
            answer = {"answer": message["id"], "body": self.answer(message["ask"])}
            self.transport.write(json.dumps(answer).encode() + b"\n")

    def answer(self, what: str) -> dict | None:
        """This worker's snapshot as data, for the supervisor's --metrics
        endpoint; None (and logged) if it cannot be taken."""
        try:
            if what != ASK_SNAPSHOT:
                raise ValueError(f"unknown ask {what!r}")
            return self.service.snapshot().as_data()
        except Exception:
            self.log.failure("worker {slot}: could not answer for {what}",
                             slot=self.service.worker_id, what=what)
            return None

    def connectionLost(self, reason=None) -> None:
        """The supervisor is gone (or stopped listening): stop too."""
        if self._reports.running:
            self._reports.stop()
        if self.reactor.running:
            self.reactor.stop()


def run_worker(worker_id: int, fds: list[tuple[int, str]], argv: list[str]) -> int:
    """The body of ``python -m mcproxy worker``: serve each inherited socket
    (descriptor, and the --listen it was bound for, with its listener tag);
    the exit status."""
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, jsonFileLogObserver
    from twisted.python import usage

    log = Logger(namespace=__name__)
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stderr, recordSeparator="")], redirectStandardIO=False)
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        log.critical("worker {slot}: bad options: {error}", slot=worker_id, error=str(e))
        return 2
    options["listen"], options["metrics"], options["workers"] = [], [], 1
    try:
        process = makeService(options)
    except SystemExit as e:
        log.critical("worker {slot}: {error}", slot=worker_id, error=str(e.code))
        return 1
    service = process.proxy
    service.worker_id = worker_id
    for fd, description in fds:
        tag, endpoint = parse_listen(description)
        factory = worker_factory(endpoint, service.factory_for(tag), reactor)
        AdoptedPort(fd, factory, reactor).setServiceParent(service)
    control = WorkerControl(service, reactor)
    stdio.StandardIO(control, reactor=reactor)

    def start() -> None:
        process.startService()  # installs the SIGHUP handler
        control.ready()

    # Ctrl-C reaches the whole process group; the supervisor stops us.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", process.stopService)
    reactor.run()
    return 0
