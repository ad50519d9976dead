"""Operations: twistd daemonizing (pidfile, SIGHUP, SIGTERM, --uid/--gid),
the JSON logger, and the version commands."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mcproxy import __version__
from tests.servers import TWISTD, Memcached, free_port, read_until, wait_for_port

CONFIG = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("b1", "127.0.0.1", "%d") })
end

function mcp_config_routes(main)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return main(r) end)
end
"""


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie nobody reaps counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def log_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture
def backend():
    server = Memcached().start()
    yield server
    server.stop()


def daemon(tmp: Path, backend: Memcached, *twistd_options: str):
    """Start a daemonized proxy; its port, pid, pidfile and log file."""
    config = tmp / "route.lua"
    config.write_text(CONFIG % backend.port)
    pidfile, logfile, port = tmp / "twistd.pid", tmp / "twistd.log", free_port()
    started = subprocess.run(
        [sys.executable, "-c", TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}",
         *twistd_options, "mcproxy", f"--listen=tcp:{port}:interface=127.0.0.1",
         f"--config={config}"],
        cwd=tmp, capture_output=True, timeout=30)
    # twistd's first process returns once the daemon has started.
    assert started.returncode == 0, started.stderr.decode() + log_text(logfile)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                       what="the pidfile"))
    wait_for_port(port)
    return port, pid, pidfile, logfile


def check_lifecycle(port: int, pid: int, pidfile: Path, logfile: Path,
                    backend: Memcached) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"set daemon/k 0 0 2\r\nhi\r\n")
        assert read_until(s, b"\r\n") == b"STORED\r\n"
    assert backend.get(b"daemon/k") == b"hi"

    os.kill(int(pidfile.read_text()), signal.SIGHUP)
    wait_for(lambda: "reloaded route config" in log_text(logfile), what="the reload")

    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), what="the pidfile to go")
    wait_for(lambda: gone(pid), what="the process to exit")
    assert "Server Shut Down." in log_text(logfile)


def test_daemonized(tmp_path, backend):
    port, pid, pidfile, logfile = daemon(tmp_path, backend)
    try:
        assert pid != os.getpid()
        check_lifecycle(port, pid, pidfile, logfile, backend)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="--uid/--gid need root")
def test_daemonized_as_nobody(backend):
    nobody = pwd.getpwnam("nobody")
    # nobody must reach and read the config (SIGHUP re-reads it), and remove
    # the pidfile: pytest's tmp_path is under a directory only root may enter.
    tmp = Path(tempfile.mkdtemp(prefix="mcproxy-nobody-"))
    tmp.chmod(0o777)
    port, pid, pidfile, logfile = daemon(tmp, backend,
                                         f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == [str(nobody.pw_uid)] * 4
        check_lifecycle(port, pid, pidfile, logfile, backend)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp)


def test_json_logger(tmp_path):
    port, log = free_port(), tmp_path / "log.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", TWISTD, "-n", f"--pidfile={tmp_path / 'twistd.pid'}",
         "--logger=mcproxy.logging.json_observer", "mcproxy",
         f"--listen=tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path, env={**os.environ, "MCPROXY_JSON_LOG": str(log)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        # A reply means the reactor runs, so its SIGTERM handler is in place
        # (twistd opens the port before it starts the reactor).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"version\r\n")
            assert read_until(s, b"\r\n").startswith(b"VERSION ")
    finally:
        proc.terminate()
        proc.wait(10)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0]["log_format"].startswith("twistd {version}")
    assert any(e.get("log_format") == "Server Shut Down." for e in events)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "mcproxy", "--version"],
    [sys.executable, "-c", TWISTD, "mcproxy", "--version"],
])
def test_version(command):
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, f"mcproxy {__version__}\n")


def test_twistd_help_lists_every_option():
    out = subprocess.run([sys.executable, "-c", TWISTD, "mcproxy", "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for option in ("--config=", "--listen=", "--memory=", "--max-connections=",
                   "--idle-timeout=", "--version"):
        assert option in out
    assert "string, e.g. tcp:11211:interface=127.0.0.1 or" in out  # docstrings joined
