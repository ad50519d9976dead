"""Proxy memory: RSS per idle client connection and per in-flight request."""

from __future__ import annotations

import os
import resource
import signal
import socket
import time

from systems import HOST, System, open_fds, settled_rss

#: Connections opened before waiting for the proxy to accept them: below the
#: smallest listen backlog in play (Twisted's 50), so no SYN is dropped.
ACCEPT_BATCH = 40


def raise_nofile(needed: int) -> None:
    """Raise RLIMIT_NOFILE (children started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))


def _wait_for_fds(pid: int, wanted: int, deadline: float) -> bool:
    while open_fds(pid) < wanted:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def idle_connections(system: System, count: int, timeout: float = 60) -> dict:
    """Open ``count`` connections that never send anything; RSS before and after.

    Connections go out in batches, each waited for until the proxy holds a
    descriptor for it, so the figure is for connections the proxy accepted.
    """
    pid = system.pid
    rss_before = settled_rss(pid)
    fds_before = open_fds(pid)
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    note = ""
    try:
        while len(socks) < count and not note:
            socks.append(socket.create_connection((HOST, system.port), timeout=5))
            if len(socks) % ACCEPT_BATCH == 0 or len(socks) == count:
                if not _wait_for_fds(pid, fds_before + len(socks), deadline):
                    note = "the proxy stopped accepting within the time limit"
    except OSError as e:
        note = f"connection {len(socks) + 1} failed: {e}"
    try:
        rss = settled_rss(pid)
        accepted = open_fds(pid) - fds_before
    finally:
        for s in socks:
            s.close()
    return {
        "connections": len(socks),
        "accepted": accepted,
        "rss_before_bytes": rss_before,
        "rss_bytes": rss,
        "bytes_per_connection": (rss - rss_before) / len(socks) if socks else None,
        "note": note,
    }


def _unread_bytes(port: int) -> int:
    """Bytes queued on established sockets of ``port`` that the server has not read."""
    total = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                total += int(fields[4].partition(":")[2], 16)
    return total


def _read_replies(sock: socket.socket, replies: int, deadline: float) -> int:
    """Read until ``replies`` get replies (END lines) arrived or the deadline."""
    data = b""
    while data.count(b"END\r\n") < replies:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data.count(b"END\r\n")


def inflight_requests(system: System, memcached: System, conns: int = 100,
                      per_conn: int = 100, timeout: float = 15) -> dict:
    """RSS growth per request held in flight by the proxy.

    ``conns`` connections each answer one get first (so per-connection state
    exists in the baseline); then memcached is SIGSTOPped, each connection
    pipelines ``per_conn`` gets, and once the proxy has read them all (nothing
    left unread in its sockets) and its RSS is stable, RSS is read again.
    memcached is continued and every reply is awaited before returning.
    """
    pid = system.pid
    deadline = time.monotonic() + timeout
    get = b"get bench:00000000\r\n"
    payload = b"".join(f"get bench:{i:08d}\r\n".encode() for i in range(per_conn))
    socks = [socket.create_connection((HOST, system.port), timeout=5) for _ in range(conns)]
    try:
        for s in socks:
            s.sendall(get)
            if _read_replies(s, 1, deadline) != 1:
                return {"error": "no reply to the warm-up get"}
        rss_before = settled_rss(pid)
        os.kill(memcached.pid, signal.SIGSTOP)
        try:
            for s in socks:
                s.sendall(payload)
            while _unread_bytes(system.port) and time.monotonic() < deadline - 5:
                time.sleep(0.05)
            unread = _unread_bytes(system.port)
            rss = settled_rss(pid)
        finally:
            os.kill(memcached.pid, signal.SIGCONT)
        answered = sum(_read_replies(s, per_conn, deadline) for s in socks)
    finally:
        for s in socks:
            s.close()
    requests = conns * per_conn
    return {
        "requests": requests,
        "answered": answered,
        "unread_bytes": unread,
        "rss_before_bytes": rss_before,
        "rss_bytes": rss,
        "bytes_per_request": (rss - rss_before) / requests,
        "note": "" if not unread else
                "the proxy left requests unread (backpressure): growth is a lower bound",
    }
