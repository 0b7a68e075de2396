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


def summary(seconds: np.ndarray, batch_size: int) -> dict[str, float]:
    """The one shape of a latency figure, in compress and export alike: p50/p95 in milliseconds and
    throughput (examples per second at the median), keyed by the batch size."""
    p50, p95 = (float(x) * 1000 for x in np.percentile(seconds, [50, 95]))
    return {
        f"latency_b{batch_size}_p50_ms": round(p50, 3),
        f"latency_b{batch_size}_p95_ms": round(p95, 3),
        f"throughput_b{batch_size}_per_s": round(batch_size * 1000 / round(p50, 3), 2),
    }
