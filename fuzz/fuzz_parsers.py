"""Coverage-guided fuzzing of mcproxy's parsers with atheris (libFuzzer).

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
* ``all``: each of the above in turn, ``--seconds`` each.

The first input byte of ``response`` and ``server`` seeds the chunking (and
picks multi-key mode, or the hooked commands).
The checks are the ones in ``tests/test_properties.py``, imported from there,
so this needs the ``test`` extra (hypothesis, pytest) and ``pip install
atheris``. New corpus entries and crash files go to a scratch directory (or
``--work``); the seeds in ``fuzz/corpus/<target>`` are only read.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ("request", "response", "server")

try:
    import atheris
except ImportError:
    atheris = None


def _load_checks():
    """Import the shared checks, instrumenting only mcproxy's own code."""
    sys.path.insert(0, ROOT)
    import hypothesis  # noqa: F401  (imported uninstrumented: it is large)
    import twisted.internet.testing  # noqa: F401

    with atheris.instrument_imports(include=["mcproxy"]):
        from tests import test_properties
    return test_properties


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split the input into (stream, chunks of it) using its first byte."""
    if not data:
        return b"", []
    rng = random.Random(data[0])
    stream = data[1:]
    cuts = [rng.randrange(len(stream) + 1) for _ in range(rng.randrange(1, 16))]
    return stream, tp.chunked(stream, cuts)


def fuzz_request(data: bytes) -> None:
    try:
        req = tp.parse_request(data)
    except tp.ParseError:
        return
    tp.check_wire(req)
    if req.command in tp.rq.GET_COMMANDS:
        keys = tp.split_multiget(req)
        assert keys is None or all(keys)
        assert data.startswith(tp.multiget_prefix(req))


def fuzz_response(data: bytes) -> None:
    stream, chunks = _chunks(data)
    multi = bool(data) and data[0] & 1 == 1
    whole = tp.read_chunks([stream], multi)
    split = tp.read_chunks(chunks, multi)
    assert split == whole, (split, whole)
    if not multi:
        assert tp.read_one_piece(stream) == whole[:2]
    # As the replies to a run with multi-key gets (read_raw with widths).
    seed = data[0] if data else 0
    widths = {index: 2 + (seed >> 2) % 4 for index in range(0, 12, 1 + (seed >> 4) % 3)}
    raw = tp.read_raw_chunks([stream], [1 + seed % 3], widths)
    assert tp.read_raw_chunks(chunks, [1, 4, 2], widths) == raw


def fuzz_server(data: bytes) -> None:
    stream, chunks = _chunks(data)
    hooked = _hook_sets[data[0] % len(_hook_sets)] if data else frozenset()
    whole = tp.run_protocol([stream], hooked)
    split = tp.run_protocol(chunks, hooked, later=True)
    runs = tp.run_protocol(chunks, hooked, later=True, runs=True)
    tp.check_output(stream, *split[:2], split[3])
    assert runs[:3] == split[:3], (runs[:3], split[:3])
    if all(len(line) <= tp.MAX_UNTERMINATED for line in stream.split(b"\n")):
        # Longer lines close the connection only when they arrive in pieces
        # (memcached's rule is about buffered bytes), so they may differ.
        assert whole[:3] == split[:3], (whole[:3], split[:3])


def _run_all(args: argparse.Namespace, extra: list[str]) -> int:
    failed = 0
    for target in TARGETS:
        cmd = [sys.executable, os.path.abspath(__file__), "--target", target,
               "--seconds", str(args.seconds)]
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
    parser.add_argument("--work", help="directory for the grown corpus and crash "
                        "files (default: a new temporary directory)")
    args, extra = parser.parse_known_args()
    if atheris is None:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    if args.target == "all":
        return _run_all(args, extra)

    global tp, _hook_sets
    tp = _load_checks()
    _hook_sets = [frozenset(tp.rq.COMMANDS.values()), frozenset(),
                  frozenset((tp.rq.CMD_GET, tp.rq.CMD_MG, tp.rq.CMD_MS, tp.rq.CMD_SET))]
    if any(not arg.startswith("-") for arg in extra):
        # Files or directories given: libFuzzer runs just those (to
        # reproduce a crash) or uses them as the corpus.
        libfuzzer = [sys.argv[0], *extra]
    else:
        work = args.work or tempfile.mkdtemp(prefix=f"mcproxy-fuzz-{args.target}-")
        os.makedirs(work, exist_ok=True)
        print(f"corpus and crash files: {work}", flush=True)
        libfuzzer = [sys.argv[0], f"-max_total_time={args.seconds}",
                     f"-artifact_prefix={work}/", "-max_len=4096",
                     f"-dict={os.path.join(HERE, 'memcached.dict')}", *extra,
                     work, os.path.join(HERE, "corpus", args.target)]
    target = {"request": fuzz_request, "response": fuzz_response,
              "server": fuzz_server}[args.target]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()
    return 0


tp = None
_hook_sets: list[frozenset[int]] = []

if __name__ == "__main__":
    sys.exit(main())
