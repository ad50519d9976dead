"""Clients' own test suites through routes, compared with plain memcached.

pymemcache's integration tests, Django's memcached cache tests
(PyMemcacheCache, and PyLibMCCache where pylibmc installs) and memccapable's
ASCII tests are run against a plain memcached and through ``twistd -n
mcproxy`` with a route config: the cookbook's ``examples/route.lua``,
sharding over two memcached servers, and a replicated route
(``routes.all_sync`` over two single-server pools; PyLibMCCache through the
sharded route only). Every test that passes against memcached must pass
through the proxy; the differences are printed.

The suites are fetched from PyPI at test time (see tests/suites.py); a
test skips when the registry cannot be reached. Selected with ``-m suites``,
left out with ``-m "not suites"``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import suites
from tests.servers import Memcached, Proxy

pytestmark = [pytest.mark.suites, pytest.mark.timeout(170)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.rst").read_text()
MEMCCAPABLE = shutil.which("memccapable") or shutil.which("memcapable")
MODES = ("sharded", "replicated")

@contextmanager
def target(mode: str) -> Iterator[int]:
    """Fresh servers for one suite run; yields the port a client uses.

    ``memcached``: one plain memcached. ``sharded``: mcproxy with
    examples/route.lua over two memcached servers. ``replicated``: mcproxy
    with ``routes.all_sync`` over two memcached servers.
    """
    servers = [Memcached().start() for _ in range(1 if mode == "memcached" else 2)]
    proxy: Proxy | None = None
    try:
        if mode == "sharded":
            proxy = Proxy(EXAMPLES / "route.lua", env={
                "MAIN1_PORT": str(servers[0].port), "MAIN2_PORT": str(servers[1].port)})
        elif mode == "replicated":
            proxy = Proxy(None, config_text=suites.REPLICATED.format(
                a=servers[0].port, b=servers[1].port))
        if proxy is None:
            yield servers[0].port
        else:
            proxy.start()
            yield proxy.port
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()


def run_in(mode: str, suite: Callable[[int], suites.Run]) -> suites.Run:
    with target(mode) as port:
        return suite(port)


def side_by_side(mode: str, suite: Callable[[int], suites.Run]) -> tuple[suites.Run, suites.Run]:
    """The suite against memcached and through ``mode`` at once (both runs
    mostly wait, on sleeps in the tests and on the network)."""
    with ThreadPoolExecutor(2) as pool:
        baseline = pool.submit(run_in, "memcached", suite)
        proxied = pool.submit(run_in, mode, suite)
        return baseline.result(), proxied.result()


def compare(name: str, mode: str, baseline: suites.Run, proxied: suites.Run,
            record_property) -> None:
    """Print and record both runs' counts; fail on every test memcached
    passes and the proxy does not."""
    summary = (f"{name}: memcached {baseline.counts()}; "
               f"through {mode} route {proxied.counts()}")
    lost = suites.lost(baseline, proxied)
    listing = "\n".join(f"  {test}: {outcome}" for test, outcome in lost.items())
    print(f"\n{summary}" + (f"\npassed against memcached only:\n{listing}" if lost else ""))
    record_property("counts", summary)
    assert sum(o == "passed" for o in baseline.outcomes.values()) > 10, baseline.output
    assert not lost, f"{summary}\npassed against memcached only:\n{listing}\n\n" \
                     f"{name} through the {mode} route:\n{proxied.output[-20000:]}"


# -- pymemcache ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pymemcache_suite() -> Path:
    return suites.pymemcache_suite()


@pytest.fixture(scope="module")
def pymemcache_baseline(pymemcache_suite) -> suites.Run:
    return run_in("memcached", lambda port: suites.run_pymemcache(pymemcache_suite, port))


@pytest.mark.parametrize("mode", MODES)
def test_pymemcache_integration(mode, pymemcache_suite, pymemcache_baseline, record_property):
    proxied = run_in(mode, lambda port: suites.run_pymemcache(pymemcache_suite, port))
    compare("pymemcache test_integration", mode, pymemcache_baseline, proxied,
            record_property)


# -- Django -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_tests() -> Path:
    return suites.django_suite()


@pytest.mark.parametrize(("backend", "mode"), [
    ("PyMemcacheCache", "sharded"), ("PyMemcacheCache", "replicated"),
    ("PyLibMCCache", "sharded")])
def test_django_memcached_cache(backend, mode, django_tests, record_property):
    if backend == "PyLibMCCache":
        suites.ensure_installed("pylibmc", "pylibmc")
    baseline, proxied = side_by_side(
        mode, lambda port: suites.run_django(django_tests, backend, port))
    compare(f"Django {suites.DJANGO_CLASSES[backend]}", mode, baseline, proxied,
            record_property)


# -- memccapable --------------------------------------------------------------------


@pytest.mark.skipif(MEMCCAPABLE is None,
                    reason="memccapable (Debian package libmemcached-tools) is not installed")
@pytest.mark.parametrize("mode", MODES)
def test_memccapable_ascii(mode, record_property):
    baseline, proxied = side_by_side(
        mode, lambda port: suites.run_memccapable(MEMCCAPABLE, port))
    assert set(proxied.outcomes) == set(baseline.outcomes), proxied.output
    compare("memccapable -a", mode, baseline, proxied, record_property)
