"""Machine instructions mcproxy runs per request, under valgrind's callgrind.

``bench/opcodes.py`` counts Python opcodes, which leave out C: lupa's
crossings into Lua, the Lua a route runs, the interpreter's own work per
opcode, allocation. This tool runs the same in-process harness (opcodes.py's
``Proxy``: clients and a backend on fake transports, with the garbage
collector's threshold of the ``twistd`` process) under callgrind with
instrumentation off, switches it on for ``--rounds`` rounds after a
warm-up, and again for three times as many; the difference divided by the
extra requests is the instructions per request, without the start-up and
the warm-up. Unlike CPU time on a shared machine it is nearly the same on
every run (``PYTHONHASHSEED`` is fixed), so two builds or two routes can be
compared while other work runs. The harness's own Python (answering the
backend's gets, the fake transports) is in the figure, the same for every
route: compare routes and builds with each other, never with peers; those
figures come from ``bench/run.py``.

``python bench/instructions.py [--multiget N] [--pipeline N] [--route FILE]``; needs
``valgrind`` (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: set in the child that valgrind runs
CHILD = "MCPROXY_INSTRUCTIONS_CHILD"


def child(clients: int, multiget: int, pipeline: int, route: Path, rounds: int) -> None:
    """Run under callgrind: instrument only the measured rounds."""
    sys.path.insert(0, str(HERE))
    import opcodes

    from mcproxy.app.process import raise_gc_threshold

    raise_gc_threshold()  # as twistd's process runs (mcproxy.app.process)
    proxy = opcodes.Proxy(clients, multiget, route, pipeline)
    for _ in range(3):
        proxy.round()
    control = ["callgrind_control", "--instr"]
    pid = str(os.getpid())
    subprocess.run([*control, "on", pid], check=True, capture_output=True)
    for _ in range(rounds):
        proxy.round()
    subprocess.run([*control, "off", pid], check=True, capture_output=True)


def collected(clients: int, multiget: int, pipeline: int, route: Path, rounds: int) -> int:
    """Instructions callgrind counted over ``rounds`` rounds (and the two
    switches)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, CHILD: "1", "PYTHONHASHSEED": "0"}
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, __file__,
             "--clients", str(clients), "--multiget", str(multiget),
             "--pipeline", str(pipeline),
             "--route", str(route), "--rounds", str(rounds)],
            env=env, capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(f"no count from callgrind: {done.stderr[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--multiget", type=int, default=1, help="keys per get")
    parser.add_argument("--pipeline", type=int, default=1, help="gets per read")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--route", type=Path, default=HERE / "route.lua",
                        help="route config (one pool of one backend)")
    args = parser.parse_args(argv)
    if os.environ.get(CHILD):
        child(args.clients, args.multiget, args.pipeline, args.route, args.rounds)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    run = (args.clients, args.multiget, args.pipeline, args.route)
    few = collected(*run, args.rounds)
    many = collected(*run, 3 * args.rounds)
    requests = 2 * args.rounds * args.clients * args.pipeline
    print(f"{(many - few) / requests:,.0f} instructions per request "
          f"({args.clients} clients x {args.pipeline}, {args.multiget}-key gets, "
          f"route {args.route.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
