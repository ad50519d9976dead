"""examples/mcproxy.service: its command lines parse with mcproxy's own option
parsers, reload sends SIGHUP, and ``systemd-analyze verify`` (when installed)
finds nothing to say."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.scripts.twistd import ServerOptions

from mcproxy import __main__ as cli
from mcproxy.app.tap import Options

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples" / "mcproxy.service"
#: a config that loads, standing in for the unit's /etc/mcproxy/route.lua
EXAMPLE_CONFIG = ROOT / "examples" / "route.lua"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) pairs in order; keys may repeat
    (several ``ExecReload=`` lines run one after the other)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{key} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


SERVICE = parse_unit(UNIT.read_text())["Service"]


def values(key: str) -> list[str]:
    return [value for name, value in SERVICE if name == key]


def command(line: str) -> list[str]:
    """An Exec*= line as argv, without systemd's prefixes (``-``, ``@``, ``+`` ...)."""
    return shlex.split(line.lstrip("-@+!:|"))


def the_config(argv: list[str], config: str) -> list[str]:
    """argv with the unit's config path replaced by a config that exists here."""
    return [arg.replace(config, str(EXAMPLE_CONFIG)) for arg in argv]


def config_path() -> str:
    [start] = values("ExecStart")
    [path] = [arg.split("=", 1)[1] for arg in command(start) if arg.startswith("--config=")]
    return path


def test_exec_start_is_twistd_in_the_foreground_with_valid_mcproxy_options():
    [start] = values("ExecStart")
    argv = command(start)
    assert os.path.isabs(argv[0]) and Path(argv[0]).name == "twistd"
    twistd = ServerOptions()
    twistd.parseOptions(the_config(argv[1:], config_path()))
    assert twistd["nodaemon"], "Type=simple needs twistd -n"
    assert not twistd["pidfile"]
    assert twistd.subCommand == "mcproxy"
    assert isinstance(twistd.subOptions, Options)
    mcproxy = Options()
    mcproxy.parseOptions(the_config(argv[argv.index("mcproxy") + 1:], config_path()))
    assert mcproxy["config"] == str(EXAMPLE_CONFIG)
    assert mcproxy["listen"] == ["tcp:11211"]


@pytest.mark.parametrize("key", ["ExecStartPre", "ExecReload"])
def test_the_config_is_checked_with_mcproxy_check(key, capsys):
    [check] = [line for line in values(key) if "check" in command(line)]
    argv = command(check)
    assert os.path.isabs(argv[0]) and Path(argv[0]).name == "mcproxy"
    assert argv[1:] == ["check", config_path()]
    assert cli.main(the_config(argv[1:], config_path())) == 0
    assert capsys.readouterr().out == "OK\n"


def test_reload_checks_then_sends_sighup():
    *checks, last = [command(line) for line in values("ExecReload")]
    assert last == ["/bin/kill", "-HUP", "$MAINPID"]
    assert all("check" in argv for argv in checks)


def test_service_settings():
    assert values("Type") == ["simple"]
    assert values("Restart") == ["on-failure"]
    [user] = values("User")
    assert user and user != "root"
    [limit] = values("LimitNOFILE")
    assert int(limit) >= 65536


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
@pytest.mark.e2e
def test_systemd_analyze_verify(tmp_path):
    """systemd checks the executables exist: point them at this checkout's."""
    text = UNIT.read_text()
    for name in ("twistd", "mcproxy"):
        stand_in = tmp_path / name
        stand_in.write_text(f"#!{sys.executable}\n")
        stand_in.chmod(0o755)
        text = text.replace(f"/opt/mcproxy/bin/{name} ", f"{stand_in} ")
    unit = tmp_path / "mcproxy.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "mcproxy.service" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
