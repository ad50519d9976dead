"""Fixtures shared by the suite, and the line between unit and end-to-end.

Tests live beside the layer they test (``tests/wire``, ``tests/backends``,
... ``tests/app``) and run in-process on in-memory transports; tests that
start processes (memcached, twistd, workers, other clients' suites) are
marked ``e2e``: everything under ``tests/e2e`` and any layer test that asks
for a real memcached. ``pytest -m "not e2e"`` runs the unit tests alone and
refuses any of them that starts a process, so the mark stays true.
"""

from __future__ import annotations

import importlib.util
import subprocess
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest
from _pytest import unittest as pytest_unittest

from mcproxy import compiled
from mcproxy.writes import batch

from .enginekit import engine, load  # noqa: F401  (fixtures)
from .servers import Memcached

E2E_DIR = Path(__file__).resolve().parent / "e2e"

#: Fixtures that start real processes: a test using one is end-to-end.
PROCESS_FIXTURES = frozenset(("memcached", "memcached_factory"))


def _stale_builds() -> list[str]:
    """Compiled modules that are older than their sources (their own
    Python, its .pxd, or their .pyx): Python would import the old build (an
    editable install builds in place), not the code under test."""
    stale = []
    for name in compiled.MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:  # switched off (compiled.PurePython)
            continue
        if spec is None or not spec.origin.endswith(tuple(EXTENSION_SUFFIXES)):
            continue
        built = Path(spec.origin)
        stem = built.parent / name.rpartition(".")[2]
        sources = [stem.with_suffix(suffix) for suffix in (".py", ".pxd", ".pyx")]
        if any(path.stat().st_mtime > built.stat().st_mtime for path in sources if path.exists()):
            stale.append(name)
    return stale


def _remember_twisted_version() -> None:
    """Ask for Twisted's version once, not before every test.

    Once ``twisted.trial.unittest`` is imported (``twisted.internet.testing``
    imports it), pytest's unittest plugin reads Twisted's version from the
    installed distributions' metadata around every test: a scan of
    ``sys.path`` that cost about 2 ms a test, a twentieth of the suite. The
    answer cannot change during a run once Twisted is imported, so the first
    one that finds it is kept (pytest without that function: nothing to do).
    """
    probe = getattr(pytest_unittest, "_get_twisted_version", None)
    if probe is None:
        return
    known = []

    def remembered():
        if not known:
            version = probe()
            if version is pytest_unittest.TwistedVersion.NotInstalled:
                return version
            known.append(version)
        return known[0]

    pytest_unittest._get_twisted_version = remembered


def pytest_sessionstart(session) -> None:
    _remember_twisted_version()
    stale = _stale_builds()
    if stale:
        pytest.exit(f"{', '.join(stale)}: the build is older than the source; rebuild it "
                    "(./scripts/test does) or set MCPROXY_PURE_PYTHON=1", returncode=4)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if E2E_DIR in Path(item.fspath).parents or PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """A test not marked e2e that starts a process fails, naming the command."""
    if request.node.get_closest_marker("e2e") is None:
        def refuse(self, args, *rest, **kwargs):
            raise AssertionError(f"a unit test started a process ({args!r}): mark it e2e")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def memcached_factory():
    """Start any number of memcached servers; all are killed afterwards."""
    started: list[Memcached] = []

    def start(**kwargs) -> Memcached:
        server = Memcached(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def memcached(memcached_factory) -> Memcached:
    """One memcached server on a free loopback port."""
    return memcached_factory()


@pytest.fixture(autouse=True)
def immediate_writes(monkeypatch):
    """In-process tests drive protocols by hand: write at once instead of
    at the end of a reactor iteration that never comes."""
    monkeypatch.setattr(batch, "schedule", lambda f: f())


#: The framing loops mcproxy/wire/_frames.pyx compiles, by their modules and
#: their names there (None when the module is not built).
COMPILED_FRAMING = (("reader", "plain_run"), ("reader", "aligned_values"),
                    ("request", "scan_compiled"))


@pytest.fixture(scope="module", params=["compiled", "pure"])
def framing(request):
    """Run a test with the compiled framing loops, then with the pure-Python
    code alone (what mcproxy runs where no compiler built them): both must
    frame every reply alike. Module-scoped, so hypothesis's tests take it."""
    from mcproxy.wire import reader
    from mcproxy.wire import request as request_module

    modules = {"request": request_module, "reader": reader}
    saved = {(module, name): getattr(modules[module], name)
             for module, name in COMPILED_FRAMING}
    if request.param == "compiled":
        if reader.plain_run is None:
            pytest.skip("mcproxy.wire._frames is not built (no C compiler or Cython)")
    else:
        for module, name in COMPILED_FRAMING:
            setattr(modules[module], name, None)
    yield request.param
    for (module, name), value in saved.items():
        setattr(modules[module], name, value)
