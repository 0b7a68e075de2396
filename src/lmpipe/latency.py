"""The one latency timer, shared by the compress and export stages.

Cases are timed round by round, one call each per round and the order rotated, so a change in machine
load during the measurement (another job starting, a CPU throttling) affects every case alike and the
ratios between them stay meaningful even when the absolute figures do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm


def time_interleaved(
    calls: Mapping[str, Callable[[], object]], warmup: int, repeats: int, desc: str = "latency"
) -> dict[str, np.ndarray]:
    """Seconds per call of each case: ``warmup`` untimed calls each, then ``repeats`` rotating rounds."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc, unit="round"):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def milliseconds(seconds: np.ndarray) -> dict[str, float]:
    """p50, p95 and mean of timings in seconds, as milliseconds."""
    p50, p95 = np.percentile(seconds, [50, 95])
    return {
        "p50_ms": round(float(p50) * 1000, 3),
        "p95_ms": round(float(p95) * 1000, 3),
        "mean_ms": round(float(np.mean(seconds)) * 1000, 3),
    }
