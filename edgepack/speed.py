"""Is a variant faster than fp32? A paired test over timing rounds, with a margin and a confidence.

Variants are timed in one process in alternating rounds (``runtime.bench.compare_models``): each
round gives every model's median, measured moments apart, so a burst of load on a shared host lifts
both halves of a pair. The per-round ratios candidate/fp32 are log-normal enough that a Student's t
interval on their logarithms is honest at 5-15 rounds: the figure is their geometric mean, with a
95% interval. A variant is **faster** only when the whole interval lies below ``1 - margin``; **not
faster** when it lies at or above it; otherwise the test is **inconclusive**, and fp32 ships. So a
variant within noise of fp32 never flips a build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

FASTER_MARGIN = 0.03  # a variant must be at least this much faster: smaller gains are not worth a change
CONFIDENCE = 0.95


class Speed(str, Enum):
    FASTER = "faster"
    NOT_FASTER = "not faster"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class RatioInterval:
    ratio: float  # geometric mean of per-round candidate/baseline medians
    low: float
    high: float
    rounds: int

    def describe(self) -> str:
        return f"{self.ratio:.2f}x ({CONFIDENCE:.0%} {self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"

    def to_json(self) -> dict[str, float | int]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "rounds": self.rounds}


def paired_interval(candidate: list[float], baseline: list[float]) -> RatioInterval:
    """The ratio candidate/baseline over paired rounds, with its two-sided interval."""
    from scipy import stats

    logs = [math.log(a / b) for a, b in zip(candidate, baseline) if a > 0 and b > 0]
    count = len(logs)
    if count == 0:
        return RatioInterval(1.0, 0.0, math.inf, 0)
    mean = sum(logs) / count
    if count < 2:
        return RatioInterval(math.exp(mean), 0.0, math.inf, count)
    spread = math.sqrt(sum((value - mean) ** 2 for value in logs) / (count - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, count - 1)) * spread / math.sqrt(count)
    return RatioInterval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), count)


def judge(interval: RatioInterval, margin: float = FASTER_MARGIN) -> Speed:
    if interval.high < 1 - margin:
        return Speed.FASTER
    if interval.low >= 1 - margin:
        return Speed.NOT_FASTER
    return Speed.INCONCLUSIVE


def separable(interval: RatioInterval) -> bool:
    """Whether the first of two variants is slower than the second with confidence."""
    return interval.low > 1
