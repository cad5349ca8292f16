"""Budgets for CI: p99 latency, bundle size and peak memory, from flags or the profile's [budgets].

A flag wins over the profile. Exceeding one raises BudgetExceeded (exit 6) with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgepack.bench.profiles import Profile
from edgepack.errors import BudgetExceeded


@dataclass(frozen=True)
class Budgets:
    max_p99_ms: float | None = None
    max_size_mb: float | None = None
    max_memory_mb: float | None = None

    def merged_with(self, profile: Profile) -> "Budgets":
        own = profile.budgets
        return Budgets(self.max_p99_ms or own.max_p99_ms, self.max_size_mb or own.max_size_mb,
                       self.max_memory_mb or own.max_memory_mb)


def check_bench(report: dict[str, Any] | None, budgets: Budgets, profile: Profile) -> None:
    """p99 and peak memory of every configuration of a benchmark report (none when it was not measured)."""
    if not report:
        return
    from edgepack.bench.runner import results

    configurations = results(report)
    for one in configurations:
        where = profile.name
        if len(configurations) > 1:
            where += f" (batch {one['batch']}, concurrency {one.get('concurrency', 1)})"
        if budgets.max_p99_ms and one["p99_ms"] > budgets.max_p99_ms:
            raise BudgetExceeded(
                f"p99 latency {one['p99_ms']:.3f} ms on {where} exceeds the budget of {budgets.max_p99_ms:g} ms",
                "use a faster variant (--quantize auto), a smaller model, or raise --max-p99-ms",
            )
        peak = one.get("peak_rss_mb")
        if budgets.max_memory_mb and peak is not None and peak > budgets.max_memory_mb:
            raise BudgetExceeded(
                f"peak memory {peak:.0f} MB on {where} exceeds the budget of {budgets.max_memory_mb:g} MB",
                "use a smaller variant (--quantize int8-dynamic), or raise --max-memory-mb",
            )


def check_size(size_bytes: int, budgets: Budgets) -> None:
    if budgets.max_size_mb and size_bytes > budgets.max_size_mb * 2**20:
        raise BudgetExceeded(f"bundle size {size_bytes / 2**20:.2f} MB exceeds the budget of {budgets.max_size_mb:g} MB",
                             "try --quantize int8-dynamic or raise --max-size-mb")
