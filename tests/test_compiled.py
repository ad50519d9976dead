"""mcproxy.compiled: which modules run compiled, and the switch that runs
mcproxy without them."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import SourceFileLoader

import pytest

import mcproxy.server
import mcproxy.wire
from mcproxy import compiled


@pytest.mark.parametrize(("value", "names"), [
    (None, set()), ("", set()), ("0", set()), ("1", set(compiled.MODULES)),
    ("mcproxy.server.protocol", {"mcproxy.server.protocol"}),
    # and what uses their extension types, built against them (USES)
    (" mcproxy.wire._frames , mcproxy.writes", {"mcproxy.wire._frames", "mcproxy.writes",
                                                "mcproxy.server.protocol",
                                                "mcproxy.backends.connection"}),
    ("mcproxy.units", {"mcproxy.units", "mcproxy.routing.runs"}),
    ("mcproxy.backends.latency", {"mcproxy.backends.latency", "mcproxy.backends.connection"}),
])
def test_the_switch_names_none_all_or_some(monkeypatch, value, names):
    if value is None:
        monkeypatch.delenv(compiled.ENVIRON, raising=False)
    else:
        monkeypatch.setenv(compiled.ENVIRON, value)
    assert compiled.switched() == names


def test_the_switch_takes_users_of_users_too(monkeypatch):
    monkeypatch.setattr(compiled, "USES", {"mcproxy.units": ("mcproxy.writes",),
                                           "mcproxy.routing.runs": ("mcproxy.units",)})
    monkeypatch.setenv(compiled.ENVIRON, "mcproxy.writes")
    assert compiled.switched() == {"mcproxy.writes", "mcproxy.units", "mcproxy.routing.runs"}


def test_the_switch_refuses_a_module_that_is_not_compiled(monkeypatch):
    monkeypatch.setenv(compiled.ENVIRON, "mcproxy.server.protocl")
    with pytest.raises(ValueError, match="not a compiled module: mcproxy.server.protocl"):
        compiled.switched()


def test_the_finder_finds_the_source_of_a_switched_module(monkeypatch):
    monkeypatch.setenv(compiled.ENVIRON, "1")
    spec = compiled.PurePython.find_spec("mcproxy.server.protocol", mcproxy.server.__path__)
    assert isinstance(spec.loader, SourceFileLoader)
    assert spec.origin.endswith(os.path.join("mcproxy", "server", "protocol.py"))
    # a module without a source of its own is not imported at all
    with pytest.raises(ModuleNotFoundError, match="MCPROXY_PURE_PYTHON is set"):
        compiled.PurePython.find_spec("mcproxy.wire._frames", mcproxy.wire.__path__)


def test_the_finder_leaves_every_other_module_alone(monkeypatch):
    monkeypatch.setenv(compiled.ENVIRON, "mcproxy.server.protocol")
    assert compiled.PurePython.find_spec("mcproxy.wire._frames", mcproxy.wire.__path__) is None
    assert compiled.PurePython.find_spec("mcproxy.wire.request", mcproxy.wire.__path__) is None
    assert compiled.PurePython.find_spec("json", None) is None
    monkeypatch.delenv(compiled.ENVIRON)
    assert compiled.PurePython.find_spec("mcproxy.server.protocol",
                                         mcproxy.server.__path__) is None


_REPORT = ("from mcproxy import compiled; import mcproxy.server.protocol as p; "
           "from mcproxy.wire import reader; "
           "print(*compiled.running(), p.__file__.endswith('.py'), reader.plain_run is None)")


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["1", "mcproxy.server.protocol", "0"])
def test_a_fresh_interpreter_runs_what_the_switch_says(value):
    """The switch works from the first import of mcproxy on; this checkout's
    install builds every compiled module (gcc, Cython from PyPI)."""
    env = {**os.environ, compiled.ENVIRON: value}
    out = subprocess.run([sys.executable, "-c", _REPORT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    expected = {
        "1": ["True", "True"],
        "mcproxy.server.protocol": [*(name for name in compiled.MODULES if name != value),
                                    "True", "False"],
        "0": [*compiled.MODULES, "False", "False"],
    }
    assert out == expected[value]


def test_uses_lists_every_cimport_of_another_compiled_module():
    """A compiled module that cimports another's types is switched with it."""
    root = os.path.dirname(os.path.dirname(compiled.__file__))
    found = {}
    for name, sourced in compiled.MODULES.items():
        pxd = os.path.join(root, *name.split(".")) + ".pxd"
        if sourced and os.path.exists(pxd):
            with open(pxd) as f:
                used = tuple(line.split()[1] for line in f
                             if line.startswith("from mcproxy.") and " cimport " in line)
            if used:
                found[name] = used
    assert found == compiled.USES
