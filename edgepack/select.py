"""Choosing the variant that ships: accuracy gate, interleaved timing, the fastest that passes.

Used by ``edgepack build`` and ``edgepack quantize``. A variant is never chosen when it is slower
than fp32 on the target profile or fails the gate; every verdict carries its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgepack.bench.profiles import Profile
from edgepack.bench.runner import BenchSettings, bench_onnx, compare_onnx, paired_ratio
from edgepack.convert.base import OutputKind
from edgepack.quantize import VARIANTS_FOR_MODE, QuantizeConfig, QuantizeMode, Variant, make_variant, sensitive_nodes
from edgepack.runtime.session import create_session
from edgepack.validate import (VARIANT, Metric, ParityReport, compare, is_embedding, mean_cosine, metric_gate,
                               task_metric)

# A variant must beat fp32's median by this much to be chosen: smaller gains are within noise.
FASTER_MARGIN = 0.03
BENCH_ROUNDS = 5
SENSITIVE_NODES = 3


class Reporter(Protocol):
    def start(self, stage: str, text: str) -> None: ...

    def finish(self, stage: str, text: str) -> None: ...


@dataclass(frozen=True)
class SelectOptions:
    mode: QuantizeMode = "auto"
    min_agreement: float = 0.99
    max_accuracy_drop: float = 1.0  # accuracy points, or percent of RMSE
    batch: int = 1
    bench_time_s: float = 0.5  # timed seconds per variant


@dataclass(frozen=True)
class EvalData:
    rows: np.ndarray
    labels: np.ndarray | None
    origin: str


@dataclass
class VariantRow:
    name: str
    size_bytes: int | None
    accuracy: str  # short text for the table
    verdict: str  # candidate, then chosen | dropped | skipped
    reason: str  # stable across runs: it goes into the manifest
    bench: dict[str, Any] | None = None
    speed: str = ""  # the measured figure behind the verdict, for the summary and report
    agreement: ParityReport | None = None
    metric: Metric | None = None
    excluded_nodes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        bench = self.bench or {}
        return {"name": self.name, "size_bytes": self.size_bytes, "accuracy": self.accuracy,
                "metric": None if self.metric is None else self.metric.__dict__,
                "verdict": self.verdict, "reason": self.reason, "speed": self.speed,
                "excluded_nodes": list(self.excluded_nodes),
                "p50_ms": bench.get("p50_ms"), "p99_ms": bench.get("p99_ms")}


@dataclass
class Selection:
    rows: list[VariantRow]
    variants: list[Variant]
    chosen: VariantRow
    chosen_path: Path
    chosen_bench: dict[str, Any] | None  # a standalone run of the chosen variant (memory, cold start)
    metric_basis: str


def choose_variant(fp32: Variant, kinds: tuple[OutputKind, ...], evaluation: EvalData,
                   bench_sample: dict[str, np.ndarray], profile: Profile, options: SelectOptions,
                   config: QuantizeConfig, workdir: Path, reporter: Reporter) -> Selection:
    reporter.start("quantize", f"Making variants ({options.mode})")
    assert fp32.path is not None
    # Every variant starts from the optimized fp32 graph (typed for the quantizers in make_variant).
    variants = [fp32] + [make_variant(name, fp32.path, workdir, config) for name in VARIANTS_FOR_MODE[options.mode][1:]]
    names, reference = run_model(fp32.path, evaluation.rows)
    if evaluation.labels is not None:
        basis = f"labels in {evaluation.origin}"
    elif is_embedding(reference, kinds):
        basis = f"cosine similarity to fp32 on {evaluation.origin} (no labelled validation data given)"
    else:
        basis = f"agreement with fp32 on {evaluation.origin} (no labelled validation data given)"
    rows = [_reference_row(fp32, kinds, reference, evaluation)]
    for index, variant in enumerate(variants[1:], start=1):
        row = _evaluate(variant, names, kinds, reference, evaluation, rows[0].metric, options)
        if row.verdict == "dropped" and variant.name.startswith("int8-static") and config.calibration is not None:
            variant, row = _retry_without_sensitive(variant, row, fp32.path, names, kinds, reference, evaluation,
                                                    rows[0].metric, options, config, workdir)
            variants[index] = variant
        rows.append(row)
    reporter.finish("quantize", ", ".join(f"{r.name}: {r.accuracy if r.verdict != 'skipped' else 'skipped, ' + r.reason}"
                                          for r in rows[1:]) or "fp32 only")

    chosen_bench = None
    if profile.runnable_here():
        candidates = {row.name: v.path for row, v in zip(rows, variants) if row.verdict == "candidate" and v.path}
        reporter.start("bench", f"Timing {len(candidates)} variant(s) on {profile.name}, {BENCH_ROUNDS} alternating rounds")
        compared = compare_onnx(candidates, bench_sample, profile,
                                BenchSettings.timed(options.bench_time_s, options.batch), rounds=BENCH_ROUNDS)
        for row in rows:
            if row.name in compared["models"]:
                row.bench = {**compared["models"][row.name], "variant": row.name,
                             **{key: compared[key] for key in ("limits", "environment", "profile", "measured_on")}}
        reporter.finish("bench", "; ".join(f"{r.name} p50 {r.bench['p50_ms']:.4f} ms" for r in rows if r.bench))
    chosen = _decide(rows, profile, options)
    chosen_path = next(v.path for v in variants if v.name == chosen.name)
    assert chosen_path is not None  # only made variants can be chosen
    if profile.runnable_here():
        reporter.start("bench", f"Benchmarking {chosen.name} alone on {profile.name}")
        chosen_bench = bench_onnx(chosen_path, bench_sample, profile,
                                  BenchSettings.timed(options.bench_time_s, options.batch))
        reporter.finish("bench", f"{chosen.name} on {profile.name}: p50 {chosen_bench['p50_ms']:.4f} ms, "
                                 f"p99 {chosen_bench['p99_ms']:.4f} ms, peak RSS {chosen_bench['peak_rss_mb']:.0f} MB")
    return Selection(rows, variants, chosen, chosen_path, chosen_bench, basis)


def run_model(model: Path, rows: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    # One thread: figures must not depend on how the host splits reductions.
    session, _ = create_session(model, threads=1)
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {session.get_inputs()[0].name: rows})


def _reference_row(fp32: Variant, kinds: tuple[OutputKind, ...], outputs: list[np.ndarray],
                   evaluation: EvalData) -> VariantRow:
    metric = None
    if evaluation.labels is not None:
        name, value = task_metric(outputs, kinds, evaluation.labels)
        metric = Metric(name, value, value, "reference", f"labels in {evaluation.origin}", True)
    return VariantRow("fp32", fp32.size_bytes, metric.describe() if metric else "reference", "candidate",
                      "baseline", metric=metric)


def _evaluate(variant: Variant, names: list[str], kinds: tuple[OutputKind, ...], reference: list[np.ndarray],
              evaluation: EvalData, fp32_metric: Metric | None, options: SelectOptions) -> VariantRow:
    if variant.path is None:
        return VariantRow(variant.name, None, "-", "skipped", variant.skipped or "not made")
    _, outputs = run_model(variant.path, evaluation.rows)
    agreement = compare(reference, outputs, names, kinds, replace(VARIANT, min_label_agreement=options.min_agreement))
    row = VariantRow(variant.name, variant.size_bytes, "", "candidate", "", agreement=agreement,
                     excluded_nodes=variant.excluded_nodes)
    if evaluation.labels is not None and fp32_metric is not None:
        name, value = task_metric(outputs, kinds, evaluation.labels)
        row.metric = metric_gate(name, value, fp32_metric.value, options.max_accuracy_drop, fp32_metric.basis)
        row.accuracy = row.metric.describe()
        if not row.metric.passed:
            unit = "points" if name == "accuracy" else "% RMSE"
            row.verdict, row.reason = "dropped", (f"{name} drop beyond --max-accuracy-drop "
                                                  f"{options.max_accuracy_drop:g} {unit}")
    elif is_embedding(reference, kinds):
        # Without labels, a vector output is judged by direction, as its consumers compare it.
        row.metric = metric_gate("cosine", mean_cosine(reference[0], outputs[0]), 1.0, options.max_accuracy_drop,
                                 f"cosine similarity to fp32 on {evaluation.origin}")
        row.accuracy = f"cosine {row.metric.value:.4f}"
        if not row.metric.passed:
            row.verdict, row.reason = "dropped", (f"cosine similarity to fp32 below "
                                                  f"{1 - options.max_accuracy_drop / 100:g}")
    else:
        gated = [d for d in agreement.outputs if d.gated]
        row.accuracy = "; ".join(f"{d.agreement:.2%} agree" if d.kind == "label" else f"rel. RMSE {d.relative_rmse:.3f}"
                                 for d in gated)
        if not agreement.passed:
            row.verdict, row.reason = "dropped", "outside tolerance of fp32: " + "; ".join(agreement.failures())
    return row


def _retry_without_sensitive(variant: Variant, first: VariantRow, fp32_path: Path, names: list[str],
                             kinds: tuple[OutputKind, ...], reference: list[np.ndarray], evaluation: EvalData,
                             fp32_metric: Metric | None, options: SelectOptions, config: QuantizeConfig,
                             workdir: Path) -> tuple[Variant, VariantRow]:
    """Name the nodes whose quantization hurts most, keep them in float, and try once more."""
    assert variant.path is not None and config.calibration is not None
    try:
        worst = sensitive_nodes(fp32_path, variant.path, config.calibration[:64], workdir, top=SENSITIVE_NODES)
    except Exception as err:  # the debugger is best effort; the first verdict stands
        first.reason += f"; could not rank sensitive nodes ({type(err).__name__})"
        return variant, first
    if not worst:
        return variant, first
    named = ", ".join(f"{node} ({sqnr:.1f} dB)" for node, sqnr in worst)
    retry_config = replace(config, exclude={**config.exclude, variant.name: tuple(node for node, _ in worst)})
    (workdir / "retry").mkdir(exist_ok=True)
    retried = make_variant(variant.name, fp32_path, workdir / "retry", retry_config)
    row = _evaluate(retried, names, kinds, reference, evaluation, fp32_metric, options)
    if row.verdict == "candidate":
        row.reason = f"passed after keeping its most sensitive nodes in float: {named}"
        return retried, row
    first.reason += f"; most sensitive nodes {named}; still failing with them in float"
    return variant, first


def _decide(rows: list[VariantRow], profile: Profile, options: SelectOptions) -> VariantRow:
    baseline = rows[0]
    candidates = [r for r in rows[1:] if r.verdict == "candidate"]
    measured = profile.runnable_here()
    best = baseline
    for row in candidates:
        if not measured:
            if options.mode != "auto":
                best, row.reason = row, f"requested; speed on {profile.name} not measured here"
            else:
                row.reason = (f"speed on {profile.name} not measured here; auto keeps fp32 "
                              f"(force with --quantize {row.name.split('-per-channel')[0]})")
            continue
        assert row.bench is not None and baseline.bench is not None
        ratio = paired_ratio(row.bench, baseline.bench)
        row.speed = f"p50 {ratio:.2f}x of fp32"
        if ratio >= 1 - FASTER_MARGIN:
            row.reason = f"not faster than fp32 on {profile.name}" + (
                " (fp16 has no fast kernels on most CPUs)" if row.name == "fp16" else "")
        elif best is baseline or paired_ratio(row.bench, best.bench) < 1:  # type: ignore[arg-type]
            best = row
    for row in candidates:
        if row is not best and not row.reason.startswith(("not faster", "speed on")):
            row.reason = (row.reason + "; " if row.reason else "") + f"accurate, but slower than {best.name}"
    best.verdict = "chosen"
    if best is baseline:
        tried = any(r.verdict != "skipped" for r in rows[1:])
        baseline.reason = "no variant was faster and accurate enough" if tried else (
            "fp32 only" if options.mode == "none" else "no other variant applies")
    else:
        if best.bench:
            best.reason = (best.reason + "; " if best.reason else "") + f"fastest accurate variant on {profile.name}"
        baseline.reason = f"baseline; {best.name} is faster" if best.bench else "baseline"
    for row in rows:
        if row is not best and row.verdict != "skipped":
            row.verdict = "dropped"
    return best
