"""Start real memcached servers and mcproxy processes for end-to-end tests.

Every server listens on a free loopback port chosen here; nothing assumes a
memcached is already running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
#: twistd, run by the interpreter running the tests.
TWISTD = "from twisted.scripts.twistd import run; run()"


#: Every port free_port has handed out in this test process.
_HANDED: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that
    this process has not handed out before: the kernel may give the same
    free port twice while the first taker has yet to bind it (proxies
    started without waiting), and the second process would then fail to
    bind while a test talks to the first, unaware."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED:
            _HANDED.add(port)
            return port


def wait_for_port(port: int, timeout: float = 10.0, proc=None,
                  host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port}")


def _all_threads_stopped(pid: int) -> bool:
    """True when every thread of pid is in state T (stopped) in /proc."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            # The state follows the parenthesised command name.
            states.append(stat.read_text().rpartition(")")[2].split()[0])
        except (OSError, IndexError):
            return False
    return bool(states) and all(state in ("T", "t") for state in states)


class Memcached:
    """A memcached process on a free loopback port."""

    def __init__(self, port: int | None = None, memory_mb: int = 64,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def options(self) -> list[str]:
        """Further command-line options (for subclasses)."""
        return []

    def start(self) -> Memcached:
        args = [MEMCACHED, "-l", self.host, "-p", str(self.port), "-U", "0",
                "-m", str(self.memory_mb), "-t", "1", *self.options()]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc, host=self.host)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing.

        Returns once every thread of the server is stopped: the signal is
        delivered asynchronously, and a test that sends right after pausing
        must not be answered by a thread that has not stopped yet.
        """
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise TimeoutError("memcached did not stop on SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def call(self, data: bytes, until: bytes = b"\r\n") -> bytes:
        """Send raw bytes straight to this server; read until ``until``."""
        with socket.create_connection(self.address, timeout=5) as s:
            s.sendall(data)
            return read_until(s, until)

    def get(self, key: bytes) -> bytes | None:
        """The value this server holds for key, or None."""
        reply = self.call(b"get " + key + b"\r\n", b"END\r\n")
        if reply == b"END\r\n":
            return None
        header, _, rest = reply.partition(b"\r\n")
        length = int(header.split()[3])
        return rest[:length]


def read_until(sock: socket.socket, until: bytes) -> bytes:
    """Read from sock until the received bytes end with ``until``, the peer
    closes, or the socket times out (then return what arrived, so that the
    test's assertion shows it)."""
    data = b""
    try:
        while not data.endswith(until):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def exchange(sock: socket.socket, request: bytes, expected: bytes) -> bytes:
    """Send request; read as many bytes as ``expected`` has (or until the
    peer closes or times out) and return them."""
    sock.sendall(request)
    data = b""
    try:
        while len(data) < len(expected):
            chunk = sock.recv(len(expected) - len(data))
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


class Proxy:
    """``twistd -n mcproxy`` as a child process on a free loopback port."""

    def __init__(self, config: str | Path | None, *extra: str,
                 config_text: str | None = None, env: dict | None = None) -> None:
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="mcproxy-test-"))
        if config_text is not None:
            config = self.tmp / "route.lua"
            Path(config).write_text(config_text)
        self.config = config
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.logfile = self.tmp / "twistd.log"
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        args = [sys.executable, "-c", TWISTD, "-n",
                "--logfile", str(self.logfile),
                "--pidfile", str(self.tmp / "twistd.pid"), "mcproxy",
                f"--listen=tcp:{self.port}:interface=127.0.0.1"]
        if self.config is not None:
            args.append(f"--config={self.config}")
        return args + list(self.extra)

    def start(self, wait: bool = True) -> Proxy:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT,
                                     cwd=str(self.tmp), env=self.env)
        if wait:
            try:
                wait_for_port(self.port, proc=self.proc)
            except RuntimeError as e:
                output = self.proc.stdout.read().decode(errors="replace")
                raise RuntimeError(f"{e}: {output} {self.log()}") from None
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def log(self) -> str:
        try:
            return self.logfile.read_text()
        except FileNotFoundError:
            return ""

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def call(self, data: bytes, until: bytes = b"\r\n") -> bytes:
        with self.connect() as s:
            s.sendall(data)
            return read_until(s, until)
