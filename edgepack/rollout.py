"""``edgepack rollout report``: what a shadow or phased run showed, read from the server's prediction log.

The log is the runtime's (``edgepack.runtime.prediction_log``): ``role: primary`` lines, one per
answered request (``shadow: dropped`` when the shadow queue was full; in phased mode ``variant``
says which model answered), ``role: shadow`` lines in ``shadow.jsonl``, one per pair a shadow
candidate ran (its worker process writes them),
``role: check`` lines, one per phased request the primary also ran, and ``role: rollout`` lines,
one per decision (and the spec the server started with). Rows are the unit of agreement: a
request of 8 rows counts 8.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import InputError
from edgepack.runtime.prediction_log import LOG_NAME, SHADOW_LOG_NAME

Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval: sound near 0 % and 100 % and for few trials, unlike p ± z·se."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class ShadowReport:
    files: int
    requests: int  # primary lines
    pairs: int  # shadow lines
    candidate_errors: int
    dropped: int
    rows: int
    agreed_rows: int
    agreement: float | None
    agreement_95: tuple[float, float] | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    primary_run_ms: dict[str, float | None]
    candidate_run_ms: dict[str, float | None]
    p50_ratio: float | None
    p99_ratio: float | None
    primary_versions: list[str]
    candidate_versions: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def log_files(folder: Path) -> list[Path]:
    """Every part of the log, oldest first (``predictions.jsonl.N`` … ``.1``, then the current file),
    then the shadow worker's (``shadow.jsonl.N`` … ``shadow.jsonl``)."""
    if not folder.is_dir():
        raise InputError(f"--log-dir {folder}: no such folder", "give the folder `edgepack serve --log-dir` wrote")
    files: list[Path] = []
    for name in (LOG_NAME, SHADOW_LOG_NAME):
        parts = [p for p in folder.glob(name + ".*") if p.suffix[1:].isdigit()]
        parts.sort(key=lambda p: -int(p.suffix[1:]))
        current = folder / name
        files += parts + ([current] if current.is_file() else [])
    if not files:
        raise InputError(f"--log-dir {folder}: no {LOG_NAME} in it",
                         "serve with --log-dir pointing there, then send requests")
    return files


def read_records(folder: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    files = log_files(folder)
    records: list[dict[str, Any]] = []
    for path in files:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise InputError(f"{path}:{number}: not a JSON line (a garbled or foreign file)",
                                     "the prediction log holds one JSON object per line; move other files out "
                                     "of --log-dir") from None
                if not isinstance(record, dict) or "role" not in record:
                    raise InputError(f"{path}:{number}: not a prediction log record (no \"role\")",
                                     "move other files out of --log-dir")
                records.append(record)
    return files, records


def shadow_report(folder: Path) -> ShadowReport:
    files, records = read_records(folder)
    if not records:
        raise InputError(f"--log-dir {folder}: the prediction log is empty", "send requests to the server first")
    primary = [r for r in records if r["role"] == "primary"]
    pairs = [r for r in records if r["role"] == "shadow"]
    if not pairs and not any(r.get("shadow") for r in primary):
        raise InputError(f"--log-dir {folder}: {len(primary)} requests but no shadow pairs",
                         "serve with --shadow CANDIDATE_BUNDLE to compare a candidate")
    ok = [r for r in pairs if r.get("status") == "ok"]
    rows = sum(r.get("rows", 0) for r in ok)
    agreed = sum(r.get("agreed_rows", 0) for r in ok)
    diffs = [r for r in ok if "max_abs_diff" in r]
    primary_ms = [r["primary"]["run_ms"] for r in pairs]
    candidate_ms = [r["candidate"]["run_ms"] for r in ok]
    primary_run = {"p50": percentile(primary_ms, 50), "p99": percentile(primary_ms, 99)}
    candidate_run = {"p50": percentile(candidate_ms, 50), "p99": percentile(candidate_ms, 99)}

    def ratio(q: str) -> float | None:
        mine, theirs = primary_run[q], candidate_run[q]
        return theirs / mine if mine and theirs is not None else None

    mean_diff = (sum(r["mean_abs_diff"] * r.get("rows", 1) for r in diffs) / sum(r.get("rows", 1) for r in diffs)
                 if diffs else None)
    return ShadowReport(
        files=len(files), requests=len(primary), pairs=len(pairs),
        candidate_errors=sum(1 for r in pairs if r.get("status") == "error"),
        dropped=sum(1 for r in primary if r.get("shadow") == "dropped"),
        rows=rows, agreed_rows=agreed, agreement=agreed / rows if rows else None,
        agreement_95=wilson_interval(agreed, rows) if rows else None,
        max_abs_diff=max((r["max_abs_diff"] for r in diffs), default=None), mean_abs_diff=mean_diff,
        primary_run_ms=primary_run, candidate_run_ms=candidate_run, p50_ratio=ratio("p50"), p99_ratio=ratio("p99"),
        primary_versions=sorted({r["primary"]["version"] for r in pairs}),
        candidate_versions=sorted({r["candidate"]["version"] for r in pairs}))


def render_shadow_report(report: ShadowReport) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}×"

    lines = [f"shadow pairs: {report.pairs} of {report.requests} requests ({report.files} log file(s)); "
             f"primary {', '.join(report.primary_versions) or '-'}, candidate {', '.join(report.candidate_versions) or '-'}"]
    if report.agreement is not None and report.agreement_95 is not None:
        low, high = report.agreement_95
        lines.append(f"agreement: {report.agreement:.1%} of {report.rows} rows (95% interval {low:.1%}–{high:.1%})")
    else:
        lines.append("agreement: - (no classifier labels in the outputs)")
    if report.max_abs_diff is not None:
        lines.append(f"float outputs: max abs diff {report.max_abs_diff:.3g}, mean abs diff {report.mean_abs_diff:.3g}")
    lines.append(f"session.run p50: primary {ms(report.primary_run_ms['p50'])}, candidate "
                 f"{ms(report.candidate_run_ms['p50'])} ({times(report.p50_ratio)})")
    lines.append(f"session.run p99: primary {ms(report.primary_run_ms['p99'])}, candidate "
                 f"{ms(report.candidate_run_ms['p99'])} ({times(report.p99_ratio)})")
    lines.append(f"candidate errors: {report.candidate_errors}; shadow runs dropped (queue full): {report.dropped}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PhasedReport:
    files: int
    requests: dict[str, int]  # answered requests by variant (primary, candidate)
    fallbacks: int  # candidate failures the primary answered
    latency_ms: dict[str, dict[str, float | None]]  # by variant: p50, p99 of the server's time per request
    checked_rows: int
    agreed_rows: int
    agreement: float | None
    agreement_95: tuple[float, float] | None
    decisions: list[dict[str, Any]]
    state: str | None  # after the last decision
    spec: dict[str, Any] | None  # the rollout spec the server last started with

    def to_json(self) -> dict[str, Any]:
        return {"mode": "phased", **asdict(self)}


def report(folder: Path) -> ShadowReport | PhasedReport:
    """A phased report when the log holds a phased rollout, else a shadow report."""
    files, records = read_records(folder)
    if any(r["role"] == "rollout" for r in records):
        return phased_report(files, records)
    return shadow_report(folder)


def phased_report(files: list[Path], records: list[dict[str, Any]]) -> PhasedReport:
    answered = [r for r in records if r["role"] == "primary" and r.get("status") == 200 and "variant" in r]
    requests = {v: sum(1 for r in answered if r["variant"] == v) for v in ("primary", "candidate")}
    latency = {v: {"p50": percentile([r["latency_ms"] for r in answered if r["variant"] == v], 50),
                   "p99": percentile([r["latency_ms"] for r in answered if r["variant"] == v], 99)}
               for v in ("primary", "candidate")}
    checks = [r for r in records if r["role"] == "check"]
    rows, agreed = sum(r["rows"] for r in checks), sum(r["agreed_rows"] for r in checks)
    events = [r for r in records if r["role"] == "rollout"]
    decisions = [{k: r.get(k) for k in ("time", "event", "state", "step", "weight", "reason")}
                 for r in events if r.get("event") != "serve"]
    started = [r for r in events if r.get("event") == "serve"]
    return PhasedReport(files=len(files), requests=requests,
                        fallbacks=sum(1 for r in answered if "fallback" in r), latency_ms=latency,
                        checked_rows=rows, agreed_rows=agreed, agreement=agreed / rows if rows else None,
                        agreement_95=wilson_interval(agreed, rows) if rows else None, decisions=decisions,
                        state=events[-1].get("state") if events else None,
                        spec=started[-1].get("spec") if started else None)


def render_report(summary: ShadowReport | PhasedReport) -> str:
    if isinstance(summary, ShadowReport):
        return render_shadow_report(summary)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    total = sum(summary.requests.values())
    lines = [f"phased rollout: {total} answered requests ({summary.files} log file(s)); state now {summary.state}"]
    for variant in ("primary", "candidate"):
        share = summary.requests[variant] / total if total else 0
        lines.append(f"{variant}: {summary.requests[variant]} requests ({share:.1%}), p50 "
                     f"{ms(summary.latency_ms[variant]['p50'])}, p99 {ms(summary.latency_ms[variant]['p99'])}")
    lines.append(f"candidate failures answered by the primary: {summary.fallbacks}")
    if summary.agreement is not None and summary.agreement_95 is not None:
        low, high = summary.agreement_95
        lines.append(f"agreement: {summary.agreement:.1%} of {summary.checked_rows} checked rows "
                     f"(95% interval {low:.1%}–{high:.1%})")
    for decision in summary.decisions:
        lines.append(f"- {decision['event']} -> {decision['state']} at step {decision['step']} "
                     f"({decision['weight']:g}%): {decision['reason']}")
    return "\n".join(lines)
