"""End to end: ``twistd -n mcproxy`` without a config is a memcached.

Three views of the embedded cache through a real client connection:
memccapable's ASCII suite run against mcproxy and against a real memcached
1.6.18; pymemcache's whole API run against both, transcripts compared; and
the cache filled five times past ``--memory``, watching the LRU order, the
``evictions`` stat and the resident memory of the proxy process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from mcproxy.cache.items import STAT_NAMES, item_size
from tests.servers import Proxy

README = (Path(__file__).resolve().parents[2] / "README.rst").read_text()
MEMCCAPABLE = shutil.which("memccapable") or shutil.which("memcapable")
MB = 2**20

#: memccapable tests that memcached passes and mcproxy may fail, each with
#: the README.rst passage explaining why. Empty: mcproxy passes them all.
ALLOWED_MEMCCAPABLE_FAILURES: dict[str, str] = {}

#: One memccapable result line: the test's name, padded, then [pass] etc.
RESULT_LINE = re.compile(r"^(ascii \S.*?)\s+\[(\w+)\]\s*$", re.MULTILINE)


def client(port: int, **kwargs) -> Client:
    return Client(("127.0.0.1", port), timeout=10, connect_timeout=5, **kwargs)


@pytest.fixture
def proxy():
    """A fresh ``twistd -n mcproxy`` with no config: only the cache."""
    proxy = Proxy(None).start()
    yield proxy
    proxy.stop()


# -- memccapable ---------------------------------------------------------------


def memccapable_results(output: str) -> dict[str, str]:
    """Test name -> memccapable's verdict (``pass``, ``FAIL``, ``skip``)."""
    return dict(RESULT_LINE.findall(output))


def readme_memccapable_table() -> dict[str, tuple[str, str]]:
    """The README's table: test name -> (memcached, mcproxy) verdicts."""
    rows = re.findall(r"^``(ascii [^`]+)``\s+(\w+)\s+(\w+)\s*$", README, re.MULTILINE)
    return {name: (theirs, ours) for name, theirs, ours in rows}


@pytest.mark.skipif(MEMCCAPABLE is None,
                    reason="memccapable (Debian package libmemcached-tools) is not installed")
def test_memccapable_ascii_suite(memcached, proxy):
    # -a: ASCII protocol only; -v: print the failing assertion; -t: I/O
    # timeout, so a silent server fails a test instead of hanging the run.
    runs = {name: subprocess.Popen(
                [MEMCCAPABLE, "-h", "127.0.0.1", "-p", str(port), "-a", "-v", "-t", "5"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for name, port in (("memcached", memcached.port), ("mcproxy", proxy.port))}
    outputs = {name: run.communicate(timeout=60)[0].decode(errors="replace")
               for name, run in runs.items()}
    theirs = memccapable_results(outputs["memcached"])
    ours = memccapable_results(outputs["mcproxy"])
    table = "\n".join(f"{name:32} memcached={verdict:5} mcproxy={ours.get(name, '-')}"
                      for name, verdict in theirs.items())
    print(f"\nmemccapable -a:\n{table}")
    assert len(theirs) > 20, outputs["memcached"]
    assert set(ours) == set(theirs), outputs["mcproxy"]
    missing = {name for name, verdict in theirs.items()
               if verdict == "pass" and ours[name] != "pass"}
    assert missing <= set(ALLOWED_MEMCCAPABLE_FAILURES), (
        f"{table}\n\nmcproxy's run:\n{outputs['mcproxy']}")
    # The README's result table is this run's.
    assert readme_memccapable_table() == {
        name: (verdict, ours[name]) for name, verdict in theirs.items()}


# -- pymemcache's API ----------------------------------------------------------------

#: The largest value memcached's 1 MB item limit admits under a 3-byte key.
BIG = MB - item_size(3, 0, 2)
#: Keys holding every byte from 0x80 to 0xff; the str one is sent as UTF-8.
HIGH_KEYS = [bytes(range(0x80, 0x100)), b"\xff\xfe\x80", "ключ-€"]
#: Stats compared with memcached's. Those counting dead items are left out:
#: memcached's LRU crawler may reclaim a flushed or expired item before a
#: client fetches it, which changes them.
COMPARED_STATS = tuple(name for name in STAT_NAMES if name not in (
    "get_expired", "get_flushed", "expired_unfetched", "evicted_unfetched",
    "reclaimed", "curr_items", "bytes"))


@pytest.mark.skipif(MEMCCAPABLE is None,
                    reason="memccapable (Debian package libmemcached-tools) is not installed")
def test_memccapable_binary_sees_a_refusal(proxy):
    """The binary protocol is refused, recognisably: memccapable's first
    binary test reads a whole response and fails on its status (before,
    on a read of a text line), at once rather than after its timeout."""
    run = subprocess.run([MEMCCAPABLE, "-h", "127.0.0.1", "-p", str(proxy.port), "-b", "-v",
                          "-t", "5", "-T", "binary noop"],
                         capture_output=True, timeout=30, text=True)
    output = run.stdout + run.stderr
    assert "header.response.status == status" in output
    assert "retry_read" not in output



def outcome(call, *args, **kwargs) -> object:
    """What a pymemcache call returned, or which error it raised."""
    try:
        return call(*args, **kwargs)
    except (MemcacheClientError, MemcacheServerError) as e:
        return type(e).__name__, str(e)


def patterned(size: int) -> bytes:
    """A value of ``size`` bytes holding every byte value and ``\\r\\n``."""
    return ((b"\r\n" + bytes(range(256))) * (size // 258 + 1))[:size]


def api_round_trip(c: Client) -> dict[str, object]:
    """Every pymemcache command, with replies and noreply: label -> result.

    The transcript is compared between mcproxy and memcached; the test
    then asserts the important entries by hand.
    """
    t: dict[str, object] = {}
    # storage and retrieval
    t["set"] = c.set("a", b"1", noreply=False)
    t["get"] = c.get("a")
    t["get miss"] = c.get("missing")
    t["set_many"] = c.set_many({"b": b"2", "c": b"3"}, noreply=False)
    t["get_many"] = c.get_many(["a", "b", "c", "missing"])
    t["add existing"] = c.add("a", b"x", noreply=False)
    t["add"] = c.add("d", b"4", noreply=False)
    t["replace miss"] = c.replace("missing", b"x", noreply=False)
    t["replace"] = c.replace("d", b"44", noreply=False)
    t["append"] = c.append("d", b"5", noreply=False)
    t["prepend"] = c.prepend("d", b"3", noreply=False)
    t["append miss"] = c.append("missing", b"x", noreply=False)
    t["prepend miss"] = c.prepend("missing", b"x", noreply=False)
    t["after append/prepend"] = c.get("d")
    # cas
    t["gets"] = value_cas = c.gets("d")
    t["gets miss"] = c.gets("missing")
    t["cas"] = c.cas("d", b"new", value_cas[1], noreply=False)
    t["cas stale"] = c.cas("d", b"newer", value_cas[1], noreply=False)
    t["cas miss"] = c.cas("missing", b"x", b"1", noreply=False)
    t["gets_many"] = c.gets_many(["a", "d", "missing"])
    # incr / decr
    t["incr miss"] = c.incr("n", 1, noreply=False)
    c.set("n", b"10", noreply=False)
    t["incr"] = c.incr("n", 5, noreply=False)
    t["decr"] = c.decr("n", 3, noreply=False)
    t["decr below 0"] = c.decr("n", 100, noreply=False)
    t["incr wraps"] = c.incr("n", 2**64 - 1, noreply=False)
    t["incr non-numeric"] = outcome(c.incr, "d", 1, noreply=False)
    # touch / delete
    t["touch"] = c.touch("a", 100, noreply=False)
    t["touch miss"] = c.touch("missing", 100, noreply=False)
    t["delete"] = c.delete("a", noreply=False)
    t["delete miss"] = c.delete("a", noreply=False)
    t["delete_many"] = c.delete_many(["b", "c", "missing"], noreply=False)
    t["after deletes"] = c.get_many(["a", "b", "c", "d"])
    t["set expired"] = c.set("dead", b"x", expire=-1, noreply=False)
    t["get expired"] = c.get("dead")
    # noreply: nothing comes back, so a stray reply would shift all later ones
    c.set("q", b"1", noreply=True)
    c.add("q", b"2", noreply=True)
    c.add("q2", b"2", noreply=True)
    c.replace("q", b"3", noreply=True)
    c.replace("missing", b"3", noreply=True)
    c.append("q", b"4", noreply=True)
    c.prepend("q", b"5", noreply=True)
    c.set_many({"q3": b"7", "q4": b"8"}, noreply=True)
    c.set("n2", b"5", noreply=True)
    c.incr("n2", 1, noreply=True)
    c.decr("n2", 3, noreply=True)
    c.incr("missing", 1, noreply=True)
    c.touch("q", 100, noreply=True)
    c.touch("missing", 100, noreply=True)
    c.delete("q4", noreply=True)
    c.delete("missing", noreply=True)
    c.delete_many(["q3", "missing"], noreply=True)
    cas = c.gets("q2")[1]
    c.cas("q2", b"9", cas, noreply=True)
    c.cas("q2", b"0", cas, noreply=True)
    t["after noreply"] = c.get_many(["q", "q2", "q3", "q4", "n2"])
    # flush_all, with and without a reply
    t["flush_all"] = c.flush_all(noreply=False)
    t["after flush_all"] = c.get_many(["d", "q", "q2", "n", "n2"])
    c.set("f", b"1", noreply=False)
    t["flush_all noreply"] = c.flush_all(noreply=True)
    t["after flush_all noreply"] = c.get("f")
    # values up to the 1 MB item limit, and just past it
    for size in (1000, 100_000, 2**19, BIG):
        t[f"set {size}"] = c.set("big", patterned(size), noreply=False)
        t[f"get {size}"] = c.get("big") == patterned(size)
    t["set too large"] = outcome(c.set, "big", b"v" * (BIG + 1), noreply=False)
    t["too large drops old"] = c.get("big")
    c.set("big", b"v" * BIG, noreply=False)
    c.set("big", b"v" * (BIG + 1), noreply=True)
    t["too large noreply drops old"] = c.get("big")
    t["set 1 MB"] = outcome(c.set, "big", b"v" * MB, noreply=False)
    # keys with bytes 0x80-0xff
    for i, key in enumerate(HIGH_KEYS):
        t[f"set high {i}"] = c.set(key, b"high%d" % i, noreply=False)
        t[f"get high {i}"] = c.get(key)
    t["get_many high"] = c.get_many(HIGH_KEYS)
    t["gets_many high"] = c.gets_many(HIGH_KEYS)
    t["delete high"] = c.delete(HIGH_KEYS[0], noreply=False)
    t["after delete high"] = c.get_many(HIGH_KEYS)
    return t


def test_pymemcache_api_round_trip(memcached, proxy):
    with_memcached = client(memcached.port, allow_unicode_keys=True)
    with_mcproxy = client(proxy.port, allow_unicode_keys=True)
    try:
        expected = api_round_trip(with_memcached)
        got = api_round_trip(with_mcproxy)
        version = with_mcproxy.version()
        theirs = with_memcached.stats()
        ours = with_mcproxy.stats()
    finally:
        with_memcached.close()
        with_mcproxy.close()
    assert got == expected
    # what both agree on is what memcached is documented to do
    assert got["get_many"] == {"a": b"1", "b": b"2", "c": b"3"}
    assert (got["add existing"], got["replace miss"], got["append miss"]) == (False,) * 3
    assert got["after append/prepend"] == b"3445"
    assert (got["cas"], got["cas stale"], got["cas miss"]) == (True, False, None)
    assert (got["incr"], got["decr"], got["decr below 0"]) == (15, 12, 0)
    assert got["incr wraps"] == 2**64 - 1
    assert got["incr non-numeric"] == (
        "MemcacheClientError", "b'cannot increment or decrement non-numeric value'")
    assert got["get expired"] is None
    assert got["after noreply"] == {"q": b"534", "q2": b"9", "n2": b"3"}
    assert got["after flush_all"] == {}
    assert got["after flush_all noreply"] is None
    assert all(got[f"get {size}"] for size in (1000, 100_000, 2**19, BIG))
    too_large = ("MemcacheServerError", "b'object too large for cache'")
    assert got["set too large"] == got["set 1 MB"] == too_large
    assert got["too large drops old"] is got["too large noreply drops old"] is None
    assert got["get_many high"] == {
        key: b"high%d" % i for i, key in enumerate(HIGH_KEYS)}
    assert re.fullmatch(rb"1\.6\.\d+-mcproxy-\S+", version), version
    # the cache's counters agree with memcached's after the same work
    assert {name: int(ours[name.encode()]) for name in COMPARED_STATS} == {
        name: int(theirs[name.encode()]) for name in COMPARED_STATS}


# -- memory: eviction in LRU order, bounded RSS ------------------------------------

MEMORY_MB = 8
#: Bytes of values written: five times the cache.
WRITTEN = 40 * MB
#: Value sizes, cycled (about 1.1 KB on average).
VALUE_SIZES = (150, 400, 900, 1500, 2500)
HOT_KEYS = [f"hot{i}" for i in range(16)]


def rss(pid: int) -> int:
    """The resident set size of process ``pid``, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE).group(1)) * 1024


def cache_stats(c: Client) -> dict[str, int]:
    return {name: int(c.stats()[name.encode()]) for name in STAT_NAMES}


def test_filling_past_memory_evicts_lru_and_keeps_rss_bounded(record_property):
    proxy = Proxy(None, f"--memory={MEMORY_MB}").start()
    c = client(proxy.port)
    try:
        pid = proxy.proc.pid
        c.version()
        base = rss(pid)
        c.set_many({key: b"h" * 1000 for key in HOT_KEYS}, noreply=False)
        cold: list[str] = []
        written = 0
        halfway: tuple[int, dict[str, int]] | None = None
        while written < WRITTEN:
            # about 1 MB of new keys, then a read of every hot key
            batch = {}
            batch_bytes = 0
            while batch_bytes < MB:
                key = f"cold{len(cold)}"
                batch[key] = b"c" * VALUE_SIZES[len(cold) % len(VALUE_SIZES)]
                batch_bytes += len(batch[key])
                cold.append(key)
            c.set_many(batch, noreply=True)
            written += batch_bytes
            assert len(c.get_many(HOT_KEYS)) == len(HOT_KEYS), f"after {written} bytes"
            if halfway is None and written >= WRITTEN // 2:
                halfway = rss(pid), cache_stats(c)
        end = rss(pid)
        stats = cache_stats(c)
        present = set()
        for i in range(0, len(cold), 1000):
            present.update(c.get_many(cold[i:i + 1000]))
    finally:
        c.close()
        proxy.stop()

    limit = MEMORY_MB * MB
    half_rss, half_stats = halfway
    report = (f"--memory={MEMORY_MB}: RSS {base / MB:.1f} MB at start, "
              f"{half_rss / MB:.1f} MB after {WRITTEN // 2 // MB} MB written, "
              f"{end / MB:.1f} MB after {WRITTEN // MB} MB; {stats['curr_items']} items "
              f"holding {stats['bytes']} bytes, {stats['evictions']} evictions")
    print(f"\n{report}")
    record_property("rss", report)
    # the oldest cold keys went, in order: the survivors are the newest ones
    first = len(cold) - len(present)
    assert first > 0 and present == set(cold[first:]), report
    assert stats["curr_items"] == len(present) + len(HOT_KEYS), report
    assert 0 < half_stats["evictions"] < stats["evictions"], report
    assert stats["evictions"] == len(cold) - len(present), report
    assert half_stats["bytes"] <= limit and stats["bytes"] <= limit, report
    assert stats["limit_maxbytes"] == limit
    # the process stops growing once the cache is full
    assert end < base + 4 * limit, report
    assert end < half_rss + limit, report
