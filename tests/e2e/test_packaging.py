"""Packaging: twistd finds the plugin after a plain and an editable install,
and ProxyService runs from a .tac file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from mcproxy import compiled
from tests.servers import TWISTD, Memcached, free_port, read_until, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    [built] = out.glob("mcproxy-*.whl")
    return built


def test_wheel_holds_plugin_and_lua_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mcproxy_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "mcproxy/routing/mcp.lua" in names
    # the compiled modules (gcc and Cython are here), and the Python of those
    # built from their own beside their builds; not what they are built from
    built = {name.split(".")[0] for name in names if name.endswith(".so")}
    assert built == {name.replace(".", "/") for name in compiled.MODULES}
    assert {name.replace(".", "/") + ".py" for name, sourced in compiled.MODULES.items()
            if sourced} <= set(names)
    assert not [name for name in names if name.endswith((".c", ".pxd", ".pyx"))]


def test_metrics_needs_no_extra(wheel):
    """--metrics works after a plain install: prometheus_client is a dependency."""
    [metadata] = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/METADATA")]
    lines = zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
    requires = [line for line in lines if line.startswith("Requires-Dist: prometheus")]
    assert requires and all("extra ==" not in line for line in requires)
    assert "Provides-Extra: metrics" not in lines


def test_without_a_compiler_the_install_is_pure_python(tmp_path):
    """Where the C compiler fails, setup.py warns and builds the wheel
    without the compiled modules; mcproxy then imports their Python."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "*.c", "__pycache__"))
    out, target = tmp_path / "wheel", tmp_path / "site"
    env = {**os.environ, "CC": "false", "LDSHARED": "false"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], env=env, check=True, capture_output=True)
    [built] = out.glob("mcproxy-*.whl")
    names = zipfile.ZipFile(built).namelist()
    assert "mcproxy/server/protocol.py" in names
    assert not [name for name in names if name.endswith((".so", ".c", ".pxd", ".pyx"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                    "--target", str(target), str(built)], check=True, capture_output=True)
    probe = (f"import sys; sys.path[1:1] = [{str(target)!r}, "
             f"{sysconfig.get_paths()['purelib']!r}]; "
             "from mcproxy import compiled; import mcproxy.server.protocol as p; "
             "print(compiled.running(), p.__file__)")
    found = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, check=True,
                           capture_output=True, text=True).stdout
    assert found == f"[] {target / 'mcproxy' / 'server' / 'protocol.py'}\n"


def test_plain_install_is_found_by_twistd(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    # -S: no site-packages .pth files, so the editable checkout is not on
    # sys.path; only the installed copy and the dependencies are.
    code = (f"import sys; sys.path[1:1] = [{str(target)!r}, "
            f"{sysconfig.get_paths()['purelib']!r}]; {TWISTD}")
    out = subprocess.run([sys.executable, "-S", "-c", code, "--help"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "mcproxy" in out
    probe = ("import sys; sys.path[1:1] = [{!r}, {!r}]; import mcproxy; print(mcproxy.__file__)"
             .format(str(target), sysconfig.get_paths()["purelib"]))
    where = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))


def test_editable_install_is_found_by_twistd(tmp_path):
    """The development install (compat mode) puts the checkout on sys.path."""
    out = subprocess.run([sys.executable, "-c", TWISTD, "--help"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "A memcached proxy whose routes are scripted in Lua." in out
    probe = "import mcproxy; print(mcproxy.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(ROOT))


def test_tac_file(tmp_path):
    memcached = Memcached().start()
    try:
        config = tmp_path / "route.lua"
        config.write_text(textwrap.dedent(f"""
            function mcp_config_pools()
                return mcp.pool({{ mcp.backend("m", "127.0.0.1", "{memcached.port}") }})
            end
            function mcp_config_routes(pool)
                mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
            end
        """))
        port = free_port()
        tac = tmp_path / "mcproxy.tac"
        tac.write_text(textwrap.dedent(f"""
            from twisted.application.service import Application
            from mcproxy import ProxyService

            application = Application("mcproxy")
            proxy = ProxyService({str(config)!r}, ["tcp:{port}:interface=127.0.0.1"])
            proxy.setServiceParent(application)
        """))
        proc = subprocess.Popen([sys.executable, "-c", TWISTD, "-ny", str(tac),
                                 "--pidfile", str(tmp_path / "pid")],
                                cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, proc=proc)
            import socket
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"set tac 0 0 2\r\nok\r\nget tac\r\n")
                assert read_until(s, b"END\r\n") == b"STORED\r\nVALUE tac 0 2\r\nok\r\nEND\r\n"
            assert memcached.get(b"tac") == b"ok"
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        memcached.stop()
