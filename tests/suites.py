"""Other clients' own test suites, fetched from PyPI and run as subprocesses.

Used by test_client_suites.py. The suites are not our code: each is taken
from the sdist of the installed client's version, downloaded at test time
into a cache directory (``$MCPROXY_SUITES_CACHE``, else
``~/.cache/mcproxy-test-suites``) and unpacked there, never into the repo.
Each run reports per-test outcomes, so that a run against mcproxy can be
compared test by test with a run against memcached.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Outcomes of one suite run: test id -> "passed", "failed" or "skipped".
Outcomes = dict[str, str]

#: Route config of the replicated mode: two single-server pools, every
#: storage and retrieval command to both (routes.all_sync).
REPLICATED = """
local routes = require("mcproxy.routes")

mcp_config_pools, mcp_config_routes = routes.config{{
    pools = {{
        a = {{ backends = {{ "127.0.0.1:{a}" }} }},
        b = {{ backends = {{ "127.0.0.1:{b}" }} }},
    }},
    routes = routes.all_sync{{ "a", "b" }},
}}
"""


def cache_dir() -> Path:
    """Where downloaded sdists are kept between runs."""
    path = Path(os.environ.get("MCPROXY_SUITES_CACHE")
                or Path.home() / ".cache" / "mcproxy-test-suites")
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_installed(module: str, requirement: str) -> str:
    """Import ``module``, pip-installing ``requirement`` first if it is missing.

    Returns the installed distribution's version. Skips the test, with
    pip's own words, when it cannot be installed.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             requirement], capture_output=True, text=True, timeout=300)
        importlib.invalidate_caches()
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.skip(f"{requirement} could not be installed: {tail(run.stderr)}")
    return importlib.metadata.version(requirement_name(requirement))


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def sdist(name: str, version: str) -> Path:
    """The unpacked sdist of ``name==version``, downloaded once into cache_dir().

    Skips the test when the registry cannot be reached.
    """
    root = cache_dir()
    unpacked = root / f"{name}-{version}"
    if (unpacked / ".complete").exists():
        return unpacked
    archives = [p for p in root.glob("*.tar.gz") if is_sdist_of(p, name, version)]
    if not archives:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--no-binary", ":all:", f"{name}=={version}", "-d", str(root)],
            capture_output=True, text=True, timeout=300)
        archives = [p for p in root.glob("*.tar.gz") if is_sdist_of(p, name, version)]
        if run.returncode != 0 or not archives:
            pytest.skip(f"could not download the {name} {version} sdist from PyPI: "
                        f"{tail(run.stderr)}")
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(archives[0]) as tar:
        tar.extractall(tmp, filter="data")
        (top,) = Path(tmp).iterdir()
        (top / ".complete").touch()
        shutil.rmtree(unpacked, ignore_errors=True)  # left by an interrupted run
        top.rename(unpacked)
    return unpacked


def is_sdist_of(archive: Path, name: str, version: str) -> bool:
    """True for ``name-version.tar.gz`` (names compared as PyPI normalises them)."""
    stem = archive.name.removesuffix(".tar.gz")
    dist, _, dist_version = stem.rpartition("-")
    return normalise(dist) == normalise(name) and dist_version == version


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tail(text: str, lines: int = 3) -> str:
    """pip's last words, its warnings left out."""
    said = [line for line in text.strip().splitlines() if not line.startswith("WARNING")]
    return " | ".join(said[-lines:]) or "(no output)"


@dataclass
class Run:
    """One suite run: per-test outcomes and the runner's output."""

    outcomes: Outcomes
    output: str
    #: What a failed test said (its traceback), where the runner reports it.
    failures: dict[str, str] = field(default_factory=dict)

    def counts(self) -> str:
        counted = Counter(self.outcomes.values())
        return ", ".join(f"{counted[k]} {k}" for k in ("passed", "failed", "skipped"))


def lost(baseline: Run, run: Run) -> dict[str, str]:
    """Tests that passed in baseline and did not in run: id -> outcome."""
    return {test: run.outcomes.get(test, "missing")
            for test, outcome in sorted(baseline.outcomes.items())
            if outcome == "passed" and run.outcomes.get(test) != "passed"}


def junit_run(path: Path, output: str) -> Run:
    """Per-test outcomes and failures from a JUnit XML report."""
    run = Run({}, output)
    for case in ET.parse(path).iter("testcase"):
        test = f"{case.get('classname')}.{case.get('name')}"
        failed = [child for child in case if child.tag in ("failure", "error")]
        if failed:
            run.outcomes[test] = "failed"
            run.failures[test] = "\n".join(
                f"{child.get('message', '')}\n{child.text or ''}" for child in failed)
        elif case.find("skipped") is not None:
            run.outcomes[test] = "skipped"
        else:
            run.outcomes[test] = "passed"
    return run


# -- pymemcache ---------------------------------------------------------------------


#: pytest's ini file for pymemcache's tests: the sdist's registers their
#: markers, but also adds coverage options that need pytest-cov.
PYMEMCACHE_INI = """[pytest]
markers =
    unit
    integration
    benchmark
"""


def pymemcache_suite() -> Path:
    """pymemcache's test_integration.py, from the installed version's sdist.

    It is run from a directory of its own beside the unpacked sdist, with
    the conftest.py that gives it ``--server``/``--port``: run inside the
    sdist, it would import the sdist's copy of pymemcache instead of the
    installed one.
    """
    version = ensure_installed("pymemcache", "pymemcache")
    tests = sdist("pymemcache", version) / "pymemcache" / "test"
    suite = cache_dir() / f"pymemcache-{version}-integration"
    if not (suite / "pytest.ini").exists():
        suite.mkdir(exist_ok=True)
        for name in ("conftest.py", "test_integration.py"):
            (suite / name).write_bytes((tests / name).read_bytes())
        (suite / "pytest.ini").write_text(PYMEMCACHE_INI)
    return suite


def run_pymemcache(suite: Path, port: int, timeout: float = 90) -> Run:
    """pymemcache's integration tests against 127.0.0.1:port, as pymemcache
    runs them (``-m integration --server --port``)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-c", str(suite / "pytest.ini"), "--rootdir", str(suite), "-o", "timeout=30",
             "-m", "integration", "--server", "127.0.0.1", "--port", str(port),
             f"--junitxml={report}", str(suite / "test_integration.py")],
            cwd=tmp, capture_output=True, text=True, timeout=timeout)
        output = run.stdout + run.stderr
        if not report.exists():
            raise AssertionError(f"pymemcache's suite did not run:\n{output}")
        return junit_run(report, output)


# -- Django -------------------------------------------------------------------------

DJANGO_REQUIREMENT = "django>=5.2,<5.3"

#: Django's memcached test classes (its tests/cache/tests.py).
DJANGO_CLASSES = {
    "PyMemcacheCache": "cache.tests.PyMemcacheCacheTests",
    "PyLibMCCache": "cache.tests.PyLibMCCacheTests",
}

DJANGO_SETTINGS = '''"""Django's test settings (tests/test_sqlite.py); CACHES names a memcached."""
from test_sqlite import *  # noqa

CACHES = {{
    "default": {{"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    "memcached": {{"BACKEND": "django.core.cache.backends.memcached.{backend}",
                  "LOCATION": "127.0.0.1:{port}"}},
}}
'''

#: One line of unittest's verbose output: "test (module.Class.test) ... ok".
DJANGO_RESULT = re.compile(
    r"^(test\w*) \(([\w.]+)\)(?: \[[^\]]*\])?(?: \(.*?\))?(?:\n.*?)*? \.\.\. "
    r"(ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$", re.MULTILINE)
DJANGO_VERDICTS = {"ok": "passed", "FAIL": "failed", "ERROR": "failed",
                   "expected failure": "passed", "unexpected success": "failed"}
#: A subtest's failure, reported after the run: "FAIL: test (id) [subtest]".
DJANGO_SUBTEST_FAILURE = re.compile(r"^(?:FAIL|ERROR): (test\w*) \(([\w.]+)\)", re.MULTILINE)


def django_suite() -> Path:
    """Django's tests/ directory, from the installed version's sdist."""
    version = ensure_installed("django", DJANGO_REQUIREMENT)
    return sdist("django", version) / "tests"


def run_django(tests: Path, backend: str, port: int, timeout: float = 120) -> Run:
    """Django's memcached cache tests of ``backend`` against 127.0.0.1:port,
    through Django's own runtests.py with a settings module whose CACHES
    name that server (how tests/cache/tests.py finds a memcached)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Path(tmp) / "mcproxy_suite_settings.py"
        settings.write_text(DJANGO_SETTINGS.format(backend=backend, port=port))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, str(tests)])}
        run = subprocess.run(
            [sys.executable, str(tests / "runtests.py"), "--settings=mcproxy_suite_settings",
             "--parallel=1", "--noinput", "-v", "2", DJANGO_CLASSES[backend]],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    output = run.stdout + run.stderr
    outcomes = django_outcomes(output)
    if not outcomes:
        raise AssertionError(f"Django's suite did not run:\n{output}")
    return Run(outcomes, output)


def django_outcomes(output: str) -> Outcomes:
    """Per-test outcomes from unittest's verbose output; a test with a
    failing subtest counts as failed."""
    outcomes: Outcomes = {}
    for name, test_id, verdict in DJANGO_RESULT.findall(output):
        key = test_id if test_id.endswith("." + name) else f"{test_id}.{name}"
        outcomes[key] = DJANGO_VERDICTS.get(verdict, "skipped")
    for name, test_id in DJANGO_SUBTEST_FAILURE.findall(output):
        key = test_id if test_id.endswith("." + name) else f"{test_id}.{name}"
        outcomes[key] = "failed"
    return outcomes


# -- memccapable --------------------------------------------------------------------

#: A memccapable test's name at the start of a line; its verdict, [pass],
#: [FAIL] or [skip], follows on the same line, or (with -v) after the
#: failure's diagnostic lines.
MEMCCAPABLE_NAME = re.compile(r"^(ascii [a-z]+(?: [a-z]+)*)(?:\s|$)")
MEMCCAPABLE_VERDICT = re.compile(r"\[(pass|FAIL|skip)\]")
MEMCCAPABLE_VERDICTS = {"pass": "passed", "FAIL": "failed", "skip": "skipped"}


def run_memccapable(binary: str, port: int, timeout: float = 60) -> Run:
    """memccapable's ASCII tests (``-a``) against 127.0.0.1:port; ``-t`` makes
    a silent server fail a test instead of hanging the run. Unbuffered
    (stdbuf), so that its stdout and stderr interleave in order."""
    unbuffered = ["stdbuf", "-o0", "-e0"] if shutil.which("stdbuf") else []
    run = subprocess.run([*unbuffered, binary, "-h", "127.0.0.1", "-p", str(port),
                          "-a", "-v", "-t", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    return Run(memccapable_outcomes(run.stdout), run.stdout)


def memccapable_outcomes(output: str) -> Outcomes:
    """Per-test outcomes from memccapable's output; a test without a
    verdict (the run stopped) counts as failed."""
    outcomes: Outcomes = {}
    test: str | None = None
    for line in output.splitlines():
        if name := MEMCCAPABLE_NAME.match(line):
            if test is not None:
                outcomes[test] = "failed"
            test = name.group(1)
        if test is not None and (verdict := MEMCCAPABLE_VERDICT.search(line)):
            outcomes[test] = MEMCCAPABLE_VERDICTS[verdict.group(1)]
            test = None
    if test is not None:
        outcomes[test] = "failed"
    return outcomes
