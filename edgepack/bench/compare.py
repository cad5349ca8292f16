"""Two benchmark reports side by side: the change per metric, its noise interval, and a verdict.

A change counts as a regression only when it is larger than the noise both runs measured: the
95% interval of the difference of means over the runs' processes (Welch), so noise the host made
is not reported as a slower model. Reports timed in one process carry an interval for p50 only,
and that interval is blind to what varies between processes; the comparison says so.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgepack.bench.runner import results
from edgepack.errors import BudgetExceeded, InputError
from edgepack.runtime.repeat import t975

Direction = Literal["lower", "higher"]  # which way is better
METRICS: tuple[tuple[str, str, Direction], ...] = (
    ("p50_ms", "p50 ms", "lower"),
    ("p90_ms", "p90 ms", "lower"),
    ("p99_ms", "p99 ms", "lower"),
    ("mean_ms", "mean ms", "lower"),
    ("throughput_per_s", "throughput/s", "higher"),
    ("session_create_ms", "session ms", "lower"),
    ("first_inference_ms", "first run ms", "lower"),
    ("peak_rss_mb", "peak RSS MB", "lower"),
)
Verdict = Literal["regression", "improvement", "within noise", "no interval"]
# Only these fail a comparison by default: each judged metric adds a 5% chance of a false alarm, and
# tail figures (p90, p99, mean) swing with every burst of load on a shared host.
DEFAULT_GATE = ("p50_ms", "peak_rss_mb")
DEFAULT_MIN_CHANGE = 0.02


@dataclass(frozen=True)
class MetricChange:
    metric: str
    label: str
    old: float
    new: float
    noise: float | None  # half-width of the 95% interval of (new - old), in the metric's unit
    verdict: Verdict
    gated: bool = False  # a regression here fails the comparison

    @property
    def change(self) -> float:
        return (self.new - self.old) / self.old if self.old else 0.0

    @property
    def noise_rel(self) -> float | None:
        return None if self.noise is None or not self.old else self.noise / self.old

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "old": self.old, "new": self.new, "change": self.change,
                "noise": self.noise, "noise_rel": self.noise_rel, "verdict": self.verdict, "gated": self.gated}


@dataclass
class ConfigComparison:
    profile: str
    measured_on: str
    batch: int
    concurrency: int
    changes: list[MetricChange] = field(default_factory=list)
    processes: tuple[int, int] = (1, 1)

    @property
    def name(self) -> str:
        return f"{self.measured_on}, batch {self.batch}, concurrency {self.concurrency}"

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "measured_on": self.measured_on, "batch": self.batch,
                "concurrency": self.concurrency, "processes": list(self.processes),
                "changes": [change.to_json() for change in self.changes]}


@dataclass
class Comparison:
    old: str
    new: str
    configs: list[ConfigComparison]
    unmatched: list[str]  # configurations measured in only one of the two reports
    warnings: list[str]

    @property
    def regressions(self) -> list[tuple[ConfigComparison, MetricChange]]:
        return [(config, change) for config in self.configs for change in config.changes
                if change.verdict == "regression" and change.gated]

    def to_json(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "configs": [config.to_json() for config in self.configs],
                "unmatched": self.unmatched, "warnings": self.warnings,
                "regressions": [f"{config.name}: {change.label} {change.change:+.1%}"
                                for config, change in self.regressions]}


def load_reports(path: Path) -> list[dict[str, Any]]:
    """The measured configurations in a JSON file that `edgepack bench --json` or `build` wrote."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such report", "save one with `edgepack bench BUNDLE --json > FILE`") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: not a JSON benchmark report ({err})",
                         "give files saved from `edgepack bench --json`") from None
    if isinstance(data, dict) and "device" in data and "emulated" in data:  # bench --ssh
        reports = _configs(data["device"]) + (_configs(data["emulated"]) if data["emulated"] else [])
    elif isinstance(data, dict) and "chosen_bench" in data:  # a build's <bundle>.bench.json
        reports = _configs(data["chosen_bench"]) if data["chosen_bench"] else []
    else:
        reports = _configs(data)
    if not reports or not all(isinstance(r, dict) and "p50_ms" in r and "batch" in r for r in reports):
        raise InputError(f"{path}: no benchmark figures in it",
                         "give files saved from `edgepack bench --json` (or a build's .bench.json)")
    return reports


def _configs(data: Any) -> list[dict[str, Any]]:
    """A report's configurations (see ``runner.results``); nothing when the file holds no report object."""
    return list(results(data)) if isinstance(data, dict) else []


def compare_files(old: Path, new: Path, min_change: float = DEFAULT_MIN_CHANGE,
                  gate: tuple[str, ...] = DEFAULT_GATE) -> Comparison:
    return compare_reports(load_reports(old), load_reports(new), str(old), str(new), min_change, gate)


def check_gate(gate: tuple[str, ...]) -> tuple[str, ...]:
    known = [metric for metric, _, _ in METRICS]
    unknown = [metric for metric in gate if metric not in known]
    if unknown or not gate:
        raise InputError(f"--gate {','.join(gate)!r}: {', '.join(unknown) or 'empty'} is not a metric",
                         f"choose among {', '.join(known)}")
    return gate


def compare_reports(old: list[dict[str, Any]], new: list[dict[str, Any]], old_name: str = "old",
                    new_name: str = "new", min_change: float = DEFAULT_MIN_CHANGE,
                    gate: tuple[str, ...] = DEFAULT_GATE) -> Comparison:
    """Match configurations by profile, place, batch and concurrency; judge every metric against its noise.

    Every metric gets a verdict; only regressions of the ``gate`` metrics count as failures.
    """
    check_gate(gate)
    before = {_key(report): report for report in old}
    after = {_key(report): report for report in new}
    configs, warnings = [], []
    for key, report in after.items():
        if key not in before:
            continue
        previous = before[key]
        counts = (len(previous.get("processes") or [None]), len(report.get("processes") or [None]))
        config = ConfigComparison(*key, processes=counts)
        for metric, label, direction in METRICS:
            if previous.get(metric) is None or report.get(metric) is None:
                continue
            noise = _noise(metric, previous, report)
            was, now = _value(metric, previous), _value(metric, report)
            config.changes.append(MetricChange(metric, label, was, now, noise,
                                               _verdict(was, now, noise, direction, min_change), metric in gate))
        configs.append(config)
        if min(counts) < 2:
            warnings.append(f"{config.name}: timed in one process, so only p50 has an interval and it misses "
                            "the noise between runs; bench with --processes 3 or more")
    unmatched = [", ".join(map(str, key)) for key in (before.keys() ^ after.keys())]
    if not configs:
        raise InputError(f"{old_name} and {new_name} share no configuration (profile, where measured, batch, "
                         "concurrency)", "benchmark both with the same --profile, --batch and --concurrency")
    return Comparison(old_name, new_name, configs, unmatched, warnings)


def _key(report: dict[str, Any]) -> tuple[str, str, int, int]:
    return (str(report.get("profile", "?")), str(report.get("measured_on", "?")), int(report["batch"]),
            int(report.get("concurrency", 1)))


def _per_process(metric: str, report: dict[str, Any]) -> list[float]:
    return [float(p[metric]) for p in report.get("processes") or [] if p.get(metric) is not None]


def _value(metric: str, report: dict[str, Any]) -> float:
    """The mean over processes where known (what the interval is about), else the reported figure."""
    values = _per_process(metric, report)
    return statistics.fmean(values) if len(values) >= 2 else float(report[metric])


def _noise(metric: str, old: dict[str, Any], new: dict[str, Any]) -> float | None:
    """Half-width of the 95% interval of the difference: Welch over processes, else the p50 intervals."""
    a, b = _per_process(metric, old), _per_process(metric, new)
    if len(a) >= 2 and len(b) >= 2:
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        if va + vb == 0:
            return 0.0
        degrees = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        return t975(degrees) * math.sqrt(va + vb)
    if metric == "p50_ms" and "p50_ci95_ms" in old and "p50_ci95_ms" in new:
        halves = [(report["p50_ci95_ms"][1] - report["p50_ci95_ms"][0]) / 2 for report in (old, new)]
        return math.hypot(*halves)
    return None


def _verdict(old: float, new: float, noise: float | None, direction: Direction, min_change: float) -> Verdict:
    if noise is None:
        return "no interval"
    difference = new - old
    if abs(difference) <= noise or (old and abs(difference) / old < min_change):
        return "within noise"
    worse = difference > 0 if direction == "lower" else difference < 0
    return "regression" if worse else "improvement"


def fail_on_regressions(comparison: Comparison) -> None:
    """Exit 6 with one line naming every regression, for CI."""
    found = comparison.regressions
    if found:
        named = "; ".join(f"{change.label} {change.change:+.1%} (noise ±{change.noise_rel or 0:.1%}) on "
                          f"{config.profile}, {config.name}" for config, change in found)
        raise BudgetExceeded(f"{len(found)} regression(s) beyond the noise: {named}",
                             "look into the change, or re-run both benchmarks with more --processes if the noise "
                             "interval is wide")
