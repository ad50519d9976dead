"""README's Quick start, run as written: the commands of its literal blocks,
with free ports in place of 11211-11213."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import docutils.core
import docutils.nodes
import pytest

from tests.servers import MEMCACHED, TWISTD, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.rst").read_text()


def quick_start_blocks() -> list[str]:
    """The literal blocks of the Quick start section, in order."""
    doctree = docutils.core.publish_doctree(README, settings_overrides={"report_level": 4})
    [section] = [s for s in doctree.findall(docutils.nodes.section)
                 if s[0].astext() == "Quick start"]
    return [block.astext() for block in section.findall(docutils.nodes.literal_block)]


BLOCKS = quick_start_blocks()


def lines_starting(prefix: str) -> list[str]:
    """The Quick start's command lines that start with ``prefix``."""
    return [line for block in BLOCKS for line in block.splitlines() if line.startswith(prefix)]


def client_example() -> tuple[str, str]:
    """The ``$ `` command line talking to the proxy, and the output shown for it."""
    [block] = [b for b in BLOCKS if b.startswith("$ ")]
    command, *output = block.splitlines()
    return command[2:], "\n".join(output) + "\n"


def twistd_args(line: str) -> list[str]:
    """The mcproxy options of a README ``twistd -n mcproxy ...`` line."""
    words = shlex.split(line.split("&&")[-1])
    assert words[:3] == ["twistd", "-n", "mcproxy"]
    return words[3:]


class Substituted:
    """README's ports replaced by free ones."""

    def __init__(self) -> None:
        self.ports = {port: str(free_port()) for port in ("11211", "11212", "11213")}

    def __call__(self, text: str) -> str:
        return re.sub(r"\b1121[123]\b", lambda m: self.ports[m.group()], text)


def start_proxy(args: list[str], tmp: Path, env: dict[str, str] | None = None,
                ) -> subprocess.Popen:
    """``twistd -n mcproxy ARGS`` from the checkout, as the README runs it."""
    return subprocess.Popen([sys.executable, "-c", TWISTD, "-n", "--pidfile=",
                             f"--logfile={tmp / 'twistd.log'}", "mcproxy", *args],
                            cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_client(command: str) -> str:
    """Run a README client line in bash; its output, with ``\\r\\n`` as ``\\n``."""
    done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=10, check=True)
    return done.stdout.decode().replace("\r\n", "\n")


@pytest.fixture
def substituted() -> Substituted:
    return Substituted()


def test_quick_start_leads_with_the_embedded_cache():
    [first] = lines_starting("pip install . && twistd")
    assert "--config" not in first
    assert not any(re.search(r"\bnc\b", block) for block in BLOCKS)  # not on a fresh Debian


def test_embedded_cache_answers_the_client_example(substituted, tmp_path):
    [line] = lines_starting("pip install . && twistd")
    proc = start_proxy([substituted(arg) for arg in twistd_args(line)], tmp_path)
    try:
        wait_for_port(int(substituted.ports["11211"]), proc=proc)
        command, output = client_example()
        assert run_client(substituted(command)) == output
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_routed_example_starts_its_servers(substituted):
    """The memcached lines start what examples/route.lua routes to; the
    proxy started as shown answers the client example from them."""
    servers = lines_starting("memcached ")
    defaults = re.findall(r'or "(\d+)"', (ROOT / "examples" / "route.lua").read_text())
    assert sorted(re.search(r"-p (\d+)", s).group(1) for s in servers) == sorted(defaults)
    if shutil.which("memcached") is None:
        pytest.skip("memcached is not installed")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("memcache")
        except KeyError:
            pytest.skip("no user memcache (Debian's memcached package creates it)")
    # memcached writes its pidfile as user memcache: a directory it can write to
    tmp = Path(tempfile.mkdtemp(prefix="mcproxy-quickstart-"))
    tmp.chmod(0o777)
    proc = None
    try:
        for line in servers:
            line = substituted(line).replace("/tmp/", f"{tmp}/")
            subprocess.run(["bash", "-c", line.replace("memcached", MEMCACHED, 1)],
                           check=True, timeout=10)
        [line] = lines_starting("twistd -n mcproxy --config")
        env = {"MAIN1_PORT": substituted.ports["11212"], "MAIN2_PORT": substituted.ports["11213"]}
        proc = start_proxy([substituted(arg) for arg in twistd_args(line)], tmp, env)
        wait_for_port(int(substituted.ports["11211"]), proc=proc)
        command, output = client_example()
        assert run_client(substituted(command)) == output
        holder = re.search(r"``hello`` is stored on\s+the server on port (\d+)", README).group(1)
        for port in ("11212", "11213"):
            got = run_client(substituted(
                f"(exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'get hello\\r\\nquit\\r\\n' >&3; "
                "cat <&3)"))
            assert ("VALUE hello" in got) == (port == holder), (port, got)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        for pidfile in tmp.glob("memcached-*.pid"):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
