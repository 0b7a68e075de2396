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

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

BLOCK = 5  # timed calls of one case in a row, after its settling calls
# untimed calls of a case before its block, for at least this long: an OpenMP pool (PyTorch's) spin-waits
# ~10 ms after its last call, so the previous case's threads go idle while this one's calls run untimed (a
# pause instead would let the caches and clocks cool, and the block's first calls would run slow)
SETTLE_S = 0.02

# ------------------------------------------------------------------------------------- the busy check
# Wall-clock times hold only on a quiet machine: when other processes hold the cores, PyTorch's thread
# pool (its threads wait for each other at every op) degrades far more than ONNX Runtime's, so a ratio
# of wall times measures the contention. The CPU time this process spends per call moves far less: it
# is what a request costs to serve. The timer records both, and the load other processes put on the
# machine while each case ran, from the kernel's CPU counters less this process's own CPU time.
PROC_STAT = "/proc/stat"


def machine_cpu() -> tuple[float, int] | None:
    """Busy CPU seconds of the whole machine since boot (every process, from ``/proc/stat``) and its
    number of cores; None where the kernel does not expose them (not Linux)."""
    try:
        with open(PROC_STAT, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest time is inside user)
    fields = [int(x) for x in lines[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), max(cores, 1)


@dataclass
class OtherLoad:
    """Accumulates, over the windows it is given, the CPU time of every other process on the machine:
    its ``share`` is their average use of the machine's cores while the windows ran (0 = quiet, 1 = every
    core taken), None where the counters are unavailable."""

    other_cpu_s: float = 0.0
    wall_s: float = 0.0
    cores: int = 1
    available: bool = True

    def window(self) -> Callable[[], None]:
        """Starts a window; the returned function ends it and adds it."""
        start, own, machine = time.perf_counter(), time.process_time(), machine_cpu()

        def end() -> None:
            after = machine_cpu()
            if machine is None or after is None:
                self.available = False
                return
            elapsed = time.perf_counter() - start
            others = (after[0] - machine[0]) - (time.process_time() - own)
            self.other_cpu_s += max(others, 0.0)
            self.wall_s += elapsed
            self.cores = after[1]

        return end

    @property
    def share(self) -> float | None:
        if not self.available or self.wall_s <= 0:
            return None
        return round(min(self.other_cpu_s / (self.wall_s * self.cores), 1.0), 3)


@dataclass
class Timings:
    """What ``time_interleaved`` measured, by case: seconds per timed call (``wall``), this process's CPU
    seconds per timed call (``cpu``: every thread of it), what each timed call returned (``returned``),
    and the share of the machine's cores other processes used while the case's blocks ran (``other_load``,
    None where unknown)."""

    wall: dict[str, np.ndarray]
    cpu: dict[str, np.ndarray]
    returned: dict[str, list] = field(default_factory=dict)
    other_load: dict[str, float | None] = field(default_factory=dict)

    def summary(self, name: str, batch_size: int) -> dict[str, float]:
        return summary(self.wall[name], batch_size, self.cpu[name])


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    desc: str = "latency",
) -> Timings:
    """Each case's ``Timings``: ``warmup`` untimed calls each, then ``repeats`` timed calls each, in
    rotating blocks of ``BLOCK`` (the last block may be shorter), each after ``SETTLE_S`` of untimed
    calls (one at least). What each timed call returns is kept (a call that measures a part of itself,
    such as the time to its first token); the other processes' load is sampled around every block."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list] = {name: [] for name in names}
    load = {name: OtherLoad() for name in names}
    rounds = -(-repeats // BLOCK) if names else 0
    for r in tqdm(range(rounds), desc=desc, unit="round"):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            end_window = load[name].window()
            settled = time.perf_counter() + SETTLE_S
            fn()  # settles, untimed: the previous case's leftover work lands here
            while time.perf_counter() < settled:
                fn()
            for _ in range(min(BLOCK, repeats - len(wall[name]))):
                start_cpu, start = time.process_time(), time.perf_counter()
                value = fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                returned[name].append(value)
            end_window()
    return Timings(
        wall={name: np.asarray(t) for name, t in wall.items()},
        cpu={name: np.asarray(t) for name, t in cpu.items()},
        returned=returned,
        other_load={name: load[name].share for name in names},
    )


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


def summary(seconds: np.ndarray, batch_size: int, cpu: np.ndarray | None = None) -> dict[str, float]:
    """The one shape of a latency figure, in compress and export alike: p50/p95 in milliseconds and
    throughput (examples per second at the median), keyed by the batch size; with ``cpu``, the mean CPU
    milliseconds this process spent per call (``cpu_b<n>_ms``: the timed calls' CPU time over their number)."""
    p50, p95 = (float(x) * 1000 for x in np.percentile(seconds, [50, 95]))
    out = {
        f"latency_b{batch_size}_p50_ms": round(p50, 3),
        f"latency_b{batch_size}_p95_ms": round(p95, 3),
        f"throughput_b{batch_size}_per_s": round(batch_size * 1000 / round(p50, 3), 2),
    }
    if cpu is not None and len(cpu):
        out[f"cpu_b{batch_size}_ms"] = round(float(np.mean(cpu)) * 1000, 3)
    return out


def speedup(reference: Mapping[str, float], row: Mapping[str, float], batch_size: int, basis: str):
    """``row``'s speed-up over ``reference`` at ``batch_size`` from their wall-clock p50 (``basis`` wall)
    or their CPU cost per call (cpu); None where either figure is missing or zero."""
    key = f"latency_b{batch_size}_p50_ms" if basis == "wall" else f"cpu_b{batch_size}_ms"
    slow, fast = reference.get(key), row.get(key)
    return round(slow / fast, 3) if slow and fast else None


def reliability(
    shares: list[float | None],
    threshold: float,
    where: str,
    threads: int = 1,
    one_thread: Callable[[], object] | None = None,
) -> dict[str, object]:
    """The busy check's verdict over every timed case of a stage: the largest share of the machine's
    cores other processes used while one ran (``other_load``), whether it stayed within ``threshold``
    (``latency_reliable``: None where the counters are unavailable) and which figure the stage's
    speed-ups therefore come from (``speedup_basis``: wall, or cpu when the timing was disturbed). A
    disturbed timing prints one warning line.

    A disturbed timing on ``threads`` > 1 also calls ``one_thread``, which measures the CPU cost again on
    one thread (``cpu_threads`` says on how many it was measured): a thread pool's threads spin-wait for
    each other, and while another process holds a core that waiting is CPU time too (PyTorch's OpenMP
    pool tripled its CPU cost per call beside a training job; on one thread it held within 5%)."""
    known = [s for s in shares if s is not None]
    worst = max(known) if known else None
    reliable = None if worst is None else worst <= threshold
    verdict = {
        "other_load": worst,
        "latency_reliable": reliable,
        "speedup_basis": "cpu" if reliable is False else "wall",
        "cpu_threads": threads,
    }
    if reliable is False:
        print(
            f"{where}: WARNING: other processes used {100 * worst:.0f}% of the machine's cores while timing "
            f"(threshold {100 * threshold:.0f}%): wall-clock latencies are not reliable, speed-ups come from "
            "CPU cost per call (latency_reliable: false; docs/compression.md, 'Latency on a busy machine')"
        )
        if threads > 1 and one_thread is not None:
            print(f"{where}: timing the CPU cost again on one thread, where no thread waits on another")
            one_thread()
            verdict["cpu_threads"] = 1
    return verdict


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
        for name, seconds in time_interleaved(calls, warmup, repeats, desc="interleaved").wall.items():
            together[name] = min(together[name], float(np.median(seconds)))
    return {
        name: {"alone_s": alone[name], "interleaved_s": together[name], "ratio": together[name] / alone[name]}
        for name in calls
    }
