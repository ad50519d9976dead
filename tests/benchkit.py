"""bench/'s modules, for the tests of the benchmark.

bench/ is a directory of scripts that import each other by bare name
(``import report``), as ``python bench/run.py`` puts bench/ first on
sys.path; importing this module does the same, once.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import report  # noqa: E402
import run  # noqa: E402
import systems  # noqa: E402

__all__ = ["BENCH_DIR", "report", "run", "systems"]
