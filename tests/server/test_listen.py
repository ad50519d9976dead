"""The listen backlog: the endpoint strings, ``--backlog``, and the sockets
the supervisor of ``--workers`` binds."""

from __future__ import annotations

import socket

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from mcproxy.app import workers
from mcproxy.app.listen import DEFAULT_BACKLOG, with_backlog
from mcproxy.app.service import ProxyService
from mcproxy.app.tap import Options, makeService
from mcproxy.app.workers import WorkerSupervisor, worker_arguments


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def backlogs(service) -> list[int]:
    """The backlog each client endpoint of a ProxyService will listen with."""
    return [child.endpoint._backlog for child in service
            if isinstance(child, StreamServerEndpointService)]


@pytest.mark.parametrize("description, expected", [
    ("tcp:11211", "tcp:11211:backlog=1024"),
    ("tcp:11211:interface=127.0.0.1", "tcp:11211:interface=127.0.0.1:backlog=1024"),
    ("tcp6:11211", "tcp6:11211:backlog=1024"),
    ("unix:/run/mcproxy.sock", "unix:/run/mcproxy.sock:backlog=1024"),
    ("ssl:11211:privateKey=k.pem", "ssl:11211:privateKey=k.pem:backlog=1024"),
    # the user's backlog wins
    ("tcp:11211:backlog=5", "tcp:11211:backlog=5"),
    ("tcp:11211:backlog=5:interface=127.0.0.1", "tcp:11211:backlog=5:interface=127.0.0.1"),
    # an escaped colon does not start a field
    (r"unix:/tmp/a\:backlog=5", r"unix:/tmp/a\:backlog=5:backlog=1024"),
    # endpoint types that may not take a backlog are left alone
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_with_backlog(description, expected):
    assert with_backlog(description, DEFAULT_BACKLOG) == expected


def test_memcached_default():
    assert DEFAULT_BACKLOG == 1024
    assert parse()["backlog"] == 1024
    assert parse("--backlog=4096")["backlog"] == parse("-b", "4096")["backlog"] == 4096


def test_a_backlog_below_one_is_refused():
    with pytest.raises(usage.UsageError, match="--backlog"):
        parse("--backlog=0")


def test_proxy_service_listens_with_the_backlog():
    service = ProxyService(None, ["tcp:0:interface=127.0.0.1", "tcp:0:backlog=7"],
                           reactor=MemoryReactorClock())
    assert backlogs(service) == [DEFAULT_BACKLOG, 7]
    service = ProxyService(None, ["tcp:0"], reactor=MemoryReactorClock(), backlog=300)
    assert backlogs(service) == [300]


def test_backlog_option_reaches_the_endpoints():
    service = makeService(parse("--backlog=2000", "--listen=tcp:0:interface=127.0.0.1",
                                "--listen=tcp:0:interface=127.0.0.1:backlog=9")).proxy
    assert backlogs(service) == [2000, 9]
    assert backlogs(makeService(parse("--listen=tcp:0:interface=127.0.0.1")).proxy) == [1024]


class RecordingSocket(socket.socket):
    """A socket that remembers the backlog it listens with."""

    listened: list[int] = []

    def listen(self, backlog: int) -> None:
        self.listened.append(backlog)
        super().listen(backlog)


@pytest.mark.parametrize("reuseport", [True, False])
def test_the_supervisor_binds_with_the_backlog(monkeypatch, reuseport):
    monkeypatch.setattr(workers.socket, "socket", RecordingSocket)
    monkeypatch.setattr(RecordingSocket, "listened", [])
    supervisor = WorkerSupervisor(2, ["tcp:0:interface=127.0.0.1",
                                      "tcp:0:interface=127.0.0.1:backlog=9"],
                                  [], reactor=MemoryReactorClock(), backlog=1500)
    supervisor.reuseport = reuseport
    supervisor._bind()
    try:
        per_endpoint = 2 if reuseport else 1
        assert RecordingSocket.listened == [1500] * per_endpoint + [9] * per_endpoint
    finally:
        for sockets in supervisor.sockets:
            for s in sockets:
                s.close()


def test_workers_are_not_given_the_backlog():
    options = parse("--workers=2", "--backlog=2000", "--listen=tcp:0")
    assert worker_arguments(options) == []
    assert makeService(options).proxy.backlog == 2000
