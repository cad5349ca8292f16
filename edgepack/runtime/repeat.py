"""One benchmark as several fresh processes, and a sweep over batch sizes and concurrency.

Within one process the median is known to ±0.05%, yet two processes on the same host differ by
several percent (memory layout, the allocator's arenas, load that lasts seconds), so a single
process's interval says nothing about the next run. Like pyperf, the report's interval is taken
over the medians of several processes, run one after another and interleaved across the sweep's
configurations so slow drifts of the host touch every configuration alike.

Standard library only: this process waits beside the benchmarks inside their memory limit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .errors import EdgepackError

# Two-sided 95% Student t quantiles for 1..30 degrees of freedom; beyond, the normal's 1.96 is close.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

# Figures kept per process: the spread between processes is their noise, and `bench --compare` needs it.
PER_PROCESS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms", "throughput_per_s", "runs",
               "session_create_ms", "first_inference_ms", "peak_rss_mb")
_AVERAGED = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s")


def t975(degrees: float) -> float:
    """The 97.5% quantile of Student's t; fractional degrees (Welch) round down, which widens it."""
    whole = max(int(degrees), 1)
    return _T975[whole - 1] if whole <= len(_T975) else 1.96 + 2.4 / whole


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval); a half-width of 0 for a single value."""
    centre = statistics.fmean(values)
    if len(values) < 2:
        return centre, 0.0
    return centre, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Config:
    batch: int
    concurrency: int

    def flags(self) -> list[str]:
        return ["--batch", str(self.batch), "--concurrency", str(self.concurrency)]


def run_repeated(child: list[str], configs: list[Config], processes: int, timeout_s: float) -> list[dict[str, Any]]:
    """Run ``child`` (a ``runtime bench`` command for one process) ``processes`` times per config."""
    runs: dict[Config, list[dict[str, Any]]] = {config: [] for config in configs}
    for _ in range(processes):
        for config in configs:
            runs[config].append(_run_child(child + config.flags(), timeout_s))
    return [combine(reports) for reports in runs.values()]


def _run_child(command: list[str], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise EdgepackError(f"a benchmark process did not finish in {timeout_s:.0f} s",
                            "lower --min-time or check the model") from None
    except OSError as err:  # e.g. an emulated interpreter (qemu-user without binfmt) cannot start itself
        raise EdgepackError(f"cannot start a benchmark process ({err.strerror}: {command[0]})",
                            "run with --processes 1 to time in this process only") from None
    if done.returncode < 0:
        # Killed (the memory limit's SIGKILL): die the same way so the launcher sees what happened.
        sys.stderr.write(done.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), -done.returncode)
        signal.pause()
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout)


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several processes' reports of the same configuration.

    Percentiles, mean and throughput are averaged over processes (averaging quantile functions keeps
    the distribution's shape); the p50 interval is Student's t over the process medians. Cold start
    and memory stay per process too: each process started cold.
    """
    if len(reports) == 1:
        return {**reports[0], "interval": "within one process (order statistics of its runs)"}
    by_p50 = sorted(reports, key=lambda report: report["p50_ms"])
    combined = dict(by_p50[(len(by_p50) - 1) // 2])  # descriptive fields from the median process
    for key in _AVERAGED:
        combined[key] = statistics.fmean(report[key] for report in reports)
    centre, half = mean_interval([report["p50_ms"] for report in reports])
    combined["p50_ci95_ms"] = [centre - half, centre + half]
    combined["p50_ci95_rel"] = half / centre if centre else 0.0
    combined["interval"] = f"between {len(reports)} processes (Student t, {len(reports) - 1} df)"
    combined["min_ms"] = min(report["min_ms"] for report in reports)
    combined["max_ms"] = max(report["max_ms"] for report in reports)
    combined["runs"] = sum(report["runs"] for report in reports)
    combined["warmup_runs"] = sum(report.get("warmup_runs", 0) for report in reports)
    combined["warmup_settled"] = all(report.get("warmup_settled", True) for report in reports)
    combined["converged"] = all(report.get("converged", True) for report in reports)
    for key in ("session_create_ms", "first_inference_ms"):
        combined[key] = statistics.median(report[key] for report in reports)
    for key in ("peak_rss_mb", "session_rss_mb"):
        values = [report[key] for report in reports if report.get(key) is not None]
        combined[key] = max(values) if values else None
    quantiles = [report["latency_quantiles_ms"] for report in reports if "latency_quantiles_ms" in report]
    if len(quantiles) == len(reports):
        combined["latency_quantiles_ms"] = [statistics.fmean(column) for column in zip(*quantiles)]
        # The ends are the extremes of all runs, as min_ms and max_ms say, not an average of extremes.
        combined["latency_quantiles_ms"][0], combined["latency_quantiles_ms"][-1] = combined["min_ms"], combined["max_ms"]
    combined["processes"] = [{key: report.get(key) for key in PER_PROCESS} for report in reports]
    return combined
