"""The timing loop and its statistics: how long one inference takes, and how well that is known.

Used by ``edgepack bench`` here and by ``python -m runtime.bench`` on a device: one loop for both, so
that numbers measured here and on a device are comparable. The loop does the least it can between
two clock reads: a prebuilt feed, a bound ``run``, integer nanoseconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the functions that need it: the process that only starts and combines
# benchmark processes (``repeat``) stays small, because it shares their memory limit.


@dataclass(frozen=True)
class LoopConfig:
    warmup_runs: int = 20  # at least this many warm-up runs and seconds, then until the median settles
    warmup_s: float = 0.2
    max_warmup_s: float = 2.0
    min_runs: int = 100  # at least this many timed runs and seconds...
    min_time_s: float = 1.0
    max_time_s: float = 10.0  # ...and at most this long
    # Stop once the 95% confidence interval of the median is within this share of it (None: time only).
    target_ci: float | None = 0.02


@dataclass(frozen=True)
class TimedRuns:
    samples: list[int]  # nanoseconds per timed run
    warmup_runs: int
    warmup_settled: bool  # False: the warm-up hit max_warmup_s with the median still moving
    converged: bool  # the confidence interval reached target_ci (always True without a target)


_SETTLED = 0.05  # warm-up ends when two consecutive block medians are this close
_Z95 = 1.96


def time_runs(run: Callable[[], object], config: LoopConfig, warm: bool = True) -> TimedRuns:
    """Warm up until the median settles, then time ``run`` until the median is known well enough.

    Warm-up goes in blocks until two consecutive block medians agree within 5% (after at least
    ``warmup_runs`` and ``warmup_s``, at most ``max_warmup_s``). Timed runs go on until
    ``min_runs`` and ``min_time_s`` are met and the 95% confidence interval of the median is
    within ``target_ci``, or ``max_time_s`` ends. Checks happen between runs, never inside the
    timed region, at geometrically spaced counts so their cost stays small.
    """
    warmed, settled = warm_up(run, config) if warm else (0, True)  # warm=False: the caller warmed it up
    clock = time.perf_counter_ns
    samples: list[int] = []
    record = samples.append
    start = clock()
    min_ns, max_ns = int(config.min_time_s * 1e9), int(config.max_time_s * 1e9)
    next_check = config.min_runs
    while True:
        t0 = clock()
        run()
        t1 = clock()
        record(t1 - t0)
        elapsed = t1 - start
        if elapsed >= max_ns and len(samples) >= 5:
            converged = config.target_ci is None or median_ci(samples)[2] <= config.target_ci
            return TimedRuns(samples, warmed, settled, converged)
        if len(samples) >= next_check and elapsed >= min_ns:
            if config.target_ci is None or median_ci(samples)[2] <= config.target_ci:
                return TimedRuns(samples, warmed, settled, True)
            next_check = len(samples) + max(len(samples) // 4, 50)


def warm_up(run: Callable[[], object], config: LoopConfig) -> tuple[int, bool]:
    """Run ``run`` in blocks until two consecutive block medians agree; (runs done, settled)."""
    clock = time.perf_counter_ns
    started = clock()
    min_warm, max_warm = started + int(config.warmup_s * 1e9), started + int(config.max_warmup_s * 1e9)
    block, previous, warmed, settled = max(5, config.warmup_runs // 2), None, 0, False
    while True:
        times = []
        for _ in range(block):
            t0 = clock()
            run()
            times.append(clock() - t0)
        warmed += block
        median = sorted(times)[block // 2]
        settled = previous is not None and abs(median - previous) <= _SETTLED * previous
        now = clock()
        if (settled and warmed >= config.warmup_runs and now >= min_warm) or now >= max_warm:
            break
        previous = median
    return warmed, settled


@dataclass(frozen=True)
class ConcurrentRuns:
    samples: list[int]  # nanoseconds per request, every thread's together
    wall_ns: int  # from the threads' common start to the last one's end
    warmup_runs: int
    warmup_settled: bool


def time_concurrent(run: Callable[[], object], config: LoopConfig, concurrency: int) -> ConcurrentRuns:
    """``concurrency`` threads call ``run`` at once for ``min_time_s``, as concurrent requests would.

    onnxruntime releases the GIL inside ``run``, so the threads overlap in the model; throughput is
    requests over wall time, latency is per request. Time-bounded only: the threads' samples are not
    independent, so no confidence target is pursued here.
    """
    warmed, settled = warm_up(run, config)
    per_thread: list[list[int]] = [[] for _ in range(concurrency)]
    start_line = threading.Barrier(concurrency + 1)
    deadline = [0]

    def worker(samples: list[int]) -> None:
        clock, record = time.perf_counter_ns, samples.append
        start_line.wait()
        while True:
            t0 = clock()
            run()
            t1 = clock()
            record(t1 - t0)
            if t1 >= deadline[0]:
                return

    threads = [threading.Thread(target=worker, args=(samples,), daemon=True) for samples in per_thread]
    for thread in threads:
        thread.start()
    started = time.perf_counter_ns()
    deadline[0] = started + int(config.min_time_s * 1e9)
    start_line.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter_ns() - started
    return ConcurrentRuns([value for samples in per_thread for value in samples], wall, warmed, settled)


def median_ci(samples: list[int] | np.ndarray) -> tuple[float, float, float]:
    """Distribution-free 95% confidence interval of the median: (low, high, half-width / median).

    From order statistics: the median lies between the j-th and k-th smallest of n samples with
    95% confidence for j, k = n/2 -/+ 1.96 * sqrt(n) / 2; no assumption about the distribution,
    which for latencies is skewed and often multi-modal.
    """
    import numpy as np

    ordered = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(ordered)
    half = _Z95 * np.sqrt(n) / 2
    low = ordered[max(int(np.floor(n / 2 - half)), 0)]
    high = ordered[min(int(np.ceil(n / 2 + half)), n - 1)]
    median = float(np.median(ordered))
    return float(low), float(high), float((high - low) / 2 / median) if median else 0.0


def summarize(samples_ns: list[int], batch: int) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    low, high, relative = median_ci(ms)
    return {
        "runs": int(ms.size),
        "p50_ms": float(p50),
        "p50_ci95_ms": [low, high],  # 95% confidence interval of the median
        "p50_ci95_rel": relative,  # its half-width over the median
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_per_s": float(batch * 1000.0 / ms.mean()),
        # The whole distribution in 101 numbers (percentiles 0..100): enough to plot it and to
        # compare two runs beyond their medians, small enough for every report.
        "latency_quantiles_ms": [float(q) for q in np.percentile(ms, np.arange(101))],
    }
