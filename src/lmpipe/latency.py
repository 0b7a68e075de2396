"""The one latency timer, shared by the compress and export stages.

Cases (models, or backends of one model) are timed in blocks: each block is one case's untimed settling
calls, then ``BLOCK`` timed calls; the cases take turns block by block, in an order rotated every round.

* Turns against drift: a change in machine load during the measurement (another job starting, a CPU
  throttling) hits every case alike, so the ratios between them stay meaningful.
* Blocks against interference: a runtime's worker threads can keep the cores busy for a while after
  their call returns (ONNX Runtime spin-waits by default; OpenMP pools do too). Timed call by call in
  turns, the next case pays for the previous one's leftover work: PyTorch timed right after ONNX Runtime
  ran 3x slower on 2 cores. The settling calls (``SETTLE_S`` of them) absorb it; the timed calls after
  them follow their own case only. ONNX Runtime's spinning threads keep a core busy
  for as long as calls keep coming, so the export stage also times it with spinning off
  (``export.allow_spinning`` is for serving).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

BLOCK = 5  # timed calls of one case in a row, after its settling calls
# untimed calls of a case before its block, for at least this long: an OpenMP pool (PyTorch's) spin-waits
# ~10 ms after its last call, so the previous case's threads go idle while this one's calls run untimed (a
# pause instead would let the caches and clocks cool, and the block's first calls would run slow)
SETTLE_S = 0.02


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    desc: str = "latency",
    returned: dict[str, list] | None = None,
) -> dict[str, np.ndarray]:
    """Seconds per call of each case: ``warmup`` untimed calls each, then ``repeats`` timed calls each,
    in rotating blocks of ``BLOCK`` (the last block may be shorter), each after ``SETTLE_S`` of untimed
    calls (one at least). With ``returned``, what each timed call returns is kept there, by case (a
    call that measures a part of itself, such as the time to its first token)."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = -(-repeats // BLOCK) if names else 0
    for r in tqdm(range(rounds), desc=desc, unit="round"):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            settled = time.perf_counter() + SETTLE_S
            fn()  # settles, untimed: the previous case's leftover work lands here
            while time.perf_counter() < settled:
                fn()
            for _ in range(min(BLOCK, repeats - len(times[name]))):
                start = time.perf_counter()
                value = fn()
                times[name].append(time.perf_counter() - start)
                if returned is not None:
                    returned.setdefault(name, []).append(value)
    return {name: np.asarray(t) for name, t in times.items()}


def time_alone(call: Callable[[], object], warmup: int, repeats: int) -> np.ndarray:
    """Seconds per call of one case timed by itself: the reference the interleaved timer must agree with
    (``benchmarks/latency_timer.py``, ``tests/code/test_latency.py``)."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return np.asarray(out)


def summary(seconds: np.ndarray, batch_size: int) -> dict[str, float]:
    """The one shape of a latency figure, in compress and export alike: p50/p95 in milliseconds and
    throughput (examples per second at the median), keyed by the batch size."""
    p50, p95 = (float(x) * 1000 for x in np.percentile(seconds, [50, 95]))
    return {
        f"latency_b{batch_size}_p50_ms": round(p50, 3),
        f"latency_b{batch_size}_p95_ms": round(p95, 3),
        f"throughput_b{batch_size}_per_s": round(batch_size * 1000 / round(p50, 3), 2),
    }


def agreement(
    calls: Mapping[str, Callable[[], object]], warmup: int, repeats: int, attempts: int = 3
) -> dict[str, dict[str, float]]:
    """Each case's median seconds timed alone and timed by ``time_interleaved`` with the others, and
    their ratio (interleaved / alone): near 1 when no case's measurement carries another's leftover work.
    Each figure is the smallest median of ``attempts`` measurements: other load on the machine slows some
    attempts, while a real coupling between the cases slows every interleaved one."""
    alone = {name: np.inf for name in calls}
    together = dict(alone)
    for _ in range(attempts):
        for name, fn in calls.items():
            alone[name] = min(alone[name], float(np.median(time_alone(fn, warmup, repeats))))
        for name, seconds in time_interleaved(calls, warmup, repeats, desc="interleaved").items():
            together[name] = min(together[name], float(np.median(seconds)))
    return {
        name: {"alone_s": alone[name], "interleaved_s": together[name], "ratio": together[name] / alone[name]}
        for name in calls
    }
