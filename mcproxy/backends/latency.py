"""Reply latency of backends: a count, a sum, and a sliding window of samples.

Pure. Recording is on the hot path (every backend reply), so it only writes
one slot of a fixed-size ring and bumps two integers; percentiles are
computed, by sorting a copy of the window, only when someone asks (a
metrics scrape, the status page).

The window is the last :data:`WINDOW` replies rather than the last N
seconds: a busy backend's figures then cover a fraction of a second, an
idle one's may be old. ``count`` and ``total`` are for ever (since the
backend was created), as a Prometheus summary's ``_count`` and ``_sum``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: Samples kept per backend (a power of two).
WINDOW = 1024

#: The percentiles reported.
QUANTILES = (0.5, 0.9, 0.99)


class LatencyWindow:
    """Reply times of one backend, in microseconds."""

    __slots__ = ("samples", "count", "total", "_mask")

    def __init__(self, size: int = WINDOW) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError("window size must be a power of two")
        self.samples = [0] * size
        #: replies recorded, and the sum of their times (µs), since creation
        self.count = 0
        self.total = 0
        self._mask = size - 1

    def record(self, micros: int, times: int = 1) -> None:
        """Add one reply time (µs), ``times`` times (the keys of a multi-key
        get answered by one reply count one each)."""
        count = self.count
        if times == 1:
            self.samples[count & self._mask] = micros
        else:
            # The slots count, count + 1, ... modulo the window, by slices.
            samples = self.samples
            start = count & self._mask
            stop = start + times
            if stop <= len(samples):  # most often: a multiget's keys, no wrap
                samples[start:stop] = [micros] * times
            else:
                first = len(samples) - start
                samples[start:] = [micros] * first
                rest = min(times - first, start)
                samples[:rest] = [micros] * rest
        self.count = count + times
        self.total += micros * times

    def window(self) -> list[int]:
        """The samples in the window, oldest first."""
        count = self.count
        size = self._mask + 1
        if count <= size:
            return self.samples[:count]
        start = count & self._mask
        return self.samples[start:] + self.samples[:start]

    def percentiles(self, quantiles: Sequence[float] = QUANTILES) -> dict[float, int] | None:
        """``{quantile: µs}`` over the window; None when it is empty."""
        return percentiles(self.window(), quantiles)


def percentiles(samples: Iterable[int],
                quantiles: Sequence[float] = QUANTILES) -> dict[float, int] | None:
    """Nearest-rank percentiles of ``samples``; None when there are none."""
    ordered = sorted(samples)
    n = len(ordered)
    if not n:
        return None
    result = {}
    for q in quantiles:
        # nearest rank: the smallest sample with at least q*n samples <= it
        rank = max(1, math.ceil(round(q * n, 9)))  # round: 0.9 * 10 is 9.000...02
        result[q] = ordered[min(rank, n) - 1]
    return result


def merged(windows: Iterable[LatencyWindow],
           quantiles: Sequence[float] = QUANTILES) -> tuple[int, int, dict[float, int] | None]:
    """``(count, total, percentiles)`` of several windows taken as one (a pool)."""
    count = total = 0
    samples: list[int] = []
    for w in windows:
        count += w.count
        total += w.total
        samples += w.window()
    return count, total, percentiles(samples, quantiles)
