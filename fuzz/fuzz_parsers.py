"""Coverage-guided fuzzing of mcproxy's parsers and cache with atheris (libFuzzer).

Targets (``--target``):

* ``request``: ``parse_request`` on arbitrary bytes; only ``ParseError`` may
  escape, and a parsed request's backend line must parse to the same
  command and key with no noreply/quiet left.
* ``response``: a backend byte stream parsed in one piece by
  ``parse_response`` and in chunks by ``ResponseReader`` (also as the
  items of a multi-key get reply) must give the same replies and the same
  error, and so must ``read_raw`` framing it as the replies to a run of
  single- and multi-key gets; only ``BackendProtocolError`` may escape.
* ``server``: a client byte stream fed to ``ProxyServerProtocol`` in one
  chunk (answers at once) and in many (answers late, backwards) must route
  and write the same; every byte written must be a reply to a request made.
* ``cache``: a client byte stream run on the embedded cache, as sent and
  as its backend lines (``mcp.internal``), must leave both caches alike,
  answer each request once and whole, and keep memory in bounds.
* ``all``: each of the above in turn, ``--seconds`` each.

The first input byte of ``response``, ``server`` and ``cache`` seeds the
chunking (and picks multi-key mode, the hooked commands, or the cache's
memory and clock). The checks are in ``fuzz/checks.py``, written against
mcproxy's public functions; the property tests in ``tests/`` run them too.

Without atheris (``--engine hypothesis``, the default then), hypothesis
generates the inputs instead: random bytes, the seed corpus and
``memcached.dict``'s tokens spliced together, for ``--seconds``. It is not
coverage-guided, so it finds less, but it runs the same checks. New corpus
entries (atheris) and crash files go to a scratch directory (or
``--work``); the seeds in ``fuzz/corpus/<target>`` are only read.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ("request", "response", "server", "cache")
MAX_LEN = 4096

try:
    import atheris
except ImportError:
    atheris = None


def _load_checks(instrument: bool):
    """Import the checks, instrumenting only mcproxy's own code for atheris."""
    sys.path.insert(0, ROOT)
    import twisted.internet.testing  # noqa: F401  (imported uninstrumented: it is large)

    if not instrument:
        from fuzz import checks
        return checks
    with atheris.instrument_imports(include=["mcproxy"]):
        from fuzz import checks
    return checks


def fuzz_request(data: bytes) -> None:
    checks.check_request_line(data)


def fuzz_response(data: bytes) -> None:
    stream, chunks = checks.seeded_chunks(data)
    seed = data[0] if data else 0
    checks.check_reply_chunks(stream, chunks, multi=seed & 1 == 1)
    checks.check_raw_chunks(stream, chunks, seed)


def fuzz_server(data: bytes) -> None:
    stream, chunks = checks.seeded_chunks(data)
    hooked = _hook_sets[data[0] % len(_hook_sets)] if data else frozenset()
    checks.check_client_stream(stream, chunks, hooked)
    checks.check_client_stream_1_6_45(stream, chunks, hooked)


def fuzz_cache(data: bytes) -> None:
    checks.check_cache_stream(data[1:], data[0] if data else 0)


def _seeds(target: str) -> list[bytes]:
    folder = os.path.join(HERE, "corpus", target)
    seeds = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            seeds.append(f.read())
    return seeds


def _tokens() -> list[bytes]:
    """The tokens of memcached.dict (libFuzzer's quoted, escaped strings)."""
    tokens = []
    with open(os.path.join(HERE, "memcached.dict"), encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line.startswith('"'):
                tokens.append(ast.literal_eval("b" + line))
    return tokens


def _hypothesis(target: str, run, seconds: int, work: str, replay: list[str]) -> int:
    """Run ``run`` on hypothesis-made inputs until ``seconds`` are up, or
    on the files in ``replay``; a failing input is written to ``work``."""
    if replay:
        for path in replay:
            with open(path, "rb") as f:
                run(f.read())
            print(f"{path}: passed", flush=True)
        return 0
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    seeds, tokens = _seeds(target), _tokens()
    piece = st.one_of(st.sampled_from(tokens), st.sampled_from(seeds),
                      st.binary(max_size=16))
    spliced = st.lists(piece, max_size=48).map(b"".join)
    inputs = st.one_of(spliced, st.binary(max_size=512),
                       st.builds(bytes.__add__, st.binary(min_size=1, max_size=1), spliced))
    runs = [0]
    failing: list[bytes] = []

    @settings(max_examples=2000, deadline=None, database=None, derandomize=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(inputs)
    def batch(data: bytes) -> None:
        data = data[:MAX_LEN]
        runs[0] += 1
        try:
            run(data)
        except BaseException:
            failing[:] = [data]
            raise

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            batch()
        except Exception:
            path = os.path.join(work, f"crash-{int(time.time())}")
            with open(path, "wb") as f:
                f.write(failing[0])
            print(f"failing input (shrunk) written to {path}", flush=True)
            raise
    print(f"{target}: {runs[0]} runs in {time.monotonic() - start:.0f} s, nothing found",
          flush=True)
    return 0


def _run_all(args: argparse.Namespace, extra: list[str]) -> int:
    failed = 0
    for target in TARGETS:
        cmd = [sys.executable, os.path.abspath(__file__), "--target", target,
               "--seconds", str(args.seconds), "--engine", args.engine]
        if args.work:
            cmd += ["--work", os.path.join(args.work, target)]
        print(f"== {target}: {' '.join(cmd + extra)}", flush=True)
        failed |= subprocess.call(cmd + extra) != 0
    return int(failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    parser.add_argument("--seconds", type=int, default=60,
                        help="how long to fuzz (each target, for 'all')")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"),
                        default="atheris" if atheris is not None else "hypothesis",
                        help="atheris (coverage-guided; the default when installed) "
                        "or hypothesis (random and spliced inputs)")
    parser.add_argument("--work", help="directory for the grown corpus and crash "
                        "files (default: a new temporary directory)")
    args, extra = parser.parse_known_args()
    if args.engine == "atheris" and atheris is None:
        print("atheris is not installed: pip install atheris, or --engine hypothesis",
              file=sys.stderr)
        return 2
    if args.target == "all":
        return _run_all(args, extra)

    global checks, _hook_sets
    checks = _load_checks(instrument=args.engine == "atheris")
    from mcproxy.wire import request as rq  # (instrumented by now, with atheris)

    _hook_sets = [frozenset(rq.COMMANDS.values()), frozenset(),
                  frozenset((rq.CMD_GET, rq.CMD_MG, rq.CMD_MS, rq.CMD_SET))]
    target = {"request": fuzz_request, "response": fuzz_response,
              "server": fuzz_server, "cache": fuzz_cache}[args.target]
    files = [arg for arg in extra if not arg.startswith("-")]
    work = None
    if not files:
        work = args.work or tempfile.mkdtemp(prefix=f"mcproxy-fuzz-{args.target}-")
        os.makedirs(work, exist_ok=True)
        print(f"corpus and crash files: {work}", flush=True)
    if args.engine == "hypothesis":
        return _hypothesis(args.target, target, args.seconds, work, files)
    if files:
        # Files or directories given: libFuzzer runs just those (to
        # reproduce a crash) or uses them as the corpus.
        libfuzzer = [sys.argv[0], *extra]
    else:
        libfuzzer = [sys.argv[0], f"-max_total_time={args.seconds}",
                     f"-artifact_prefix={work}/", f"-max_len={MAX_LEN}",
                     f"-dict={os.path.join(HERE, 'memcached.dict')}", *extra,
                     work, os.path.join(HERE, "corpus", args.target)]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()
    return 0


checks = None
_hook_sets: list[frozenset[int]] = []

if __name__ == "__main__":
    sys.exit(main())
