"""Choosing the variant that ships: made once each, gated per output, timed until the answer is sure.

Used by ``edgepack build`` and ``edgepack quantize``. A variant replaces fp32 only when it passes
every gate (``edgepack.gates``) and is faster with confidence (``edgepack.speed``); byte-identical
variants are made once and shown as one; ``--variant`` pins a choice and ``--locked`` reuses a
recorded one without timing. Every row carries a verdict, a reason code and a reason whose words do
not depend on timing, so the manifest (and the bundle) is the same whenever the decision is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgepack.bench.profiles import Profile
from edgepack.bench.runner import BenchSettings, bench_onnx, compare_onnx
from edgepack.errors import InputError, ParityError
from edgepack.gates import GateReport, GateSettings, Metric, OutputGates, TaskMetric, join_runs, judge_metric
from edgepack.output_kinds import OutputKind
from edgepack.quantize import VARIANTS, VARIANTS_FOR_MODE, QuantizeConfig, QuantizeMode, Variant, make_variants, \
    sensitive_nodes
from edgepack.reporting import Reporter
from edgepack.runtime.session import create_session, quiet_run
from edgepack.samples import Examples
from edgepack.speed import FASTER_MARGIN, RatioInterval, Speed, judge, paired_interval, separable

ROUNDS = 6  # timing rounds of a first comparison...
MAX_ROUNDS = 18  # ...and at most this many, adding rounds while a comparison is inconclusive
SENSITIVE_NODES = 3
SENSITIVITY_EXAMPLES = 16  # enough to rank nodes; the debugger runs two augmented models over them
EVAL_CHUNK = 64  # rows per run of the evaluation data


class Verdict(str, Enum):
    CHOSEN = "chosen"
    DROPPED = "dropped"
    SKIPPED = "skipped"


class Reason(str, Enum):
    BASELINE = "baseline"  # fp32, not chosen
    NO_FASTER_VARIANT = "no-faster-variant"  # fp32, chosen
    FASTER = "faster"  # chosen: faster than fp32 with confidence
    NOT_CHOSEN = "not-chosen"  # accurate, but not the faster choice
    NOT_MEASURED = "not-measured"  # the profile cannot be timed here
    REQUESTED = "requested"  # --quantize MODE on a profile timed only on the device
    PINNED = "pinned"  # --variant
    LOCKED = "locked"  # --locked
    INACCURATE = "inaccurate"
    NOT_APPLICABLE = "not-applicable"
    NOT_MADE = "not-made"


@dataclass
class VariantRow:
    name: str
    variant: Variant
    verdict: Verdict = Verdict.DROPPED
    code: Reason = Reason.NOT_CHOSEN
    reason: str = ""  # stable words: they go into the manifest
    aliases: tuple[str, ...] = ()  # variants that came out byte-identical to this one
    sha256: str | None = None
    gate: GateReport | None = None
    metric: Metric | None = None
    speed: Speed | None = None
    interval: RatioInterval | None = None
    bench: dict[str, Any] | None = None
    size_bytes: int | None = None  # read when made: the file goes with the build's temporary folder

    @property
    def excluded_nodes(self) -> tuple[str, ...]:
        return self.variant.excluded_nodes

    @property
    def label(self) -> str:
        return " = ".join((self.name, *self.aliases))

    @property
    def accuracy(self) -> str:
        if self.verdict is Verdict.SKIPPED:
            return "-"
        if self.name == "fp32":
            return self.metric.describe() if self.metric else "reference"
        return self.gate.summary() if self.gate else "-"

    @property
    def speed_text(self) -> str:
        """The timing behind the verdict (tables and the bench report; never the manifest)."""
        if self.interval is None or self.speed is None:
            return ""
        return f"{self.speed.value}: {self.interval.describe()}"

    def to_json(self) -> dict[str, Any]:
        bench = self.bench or {}
        return {"name": self.name, "aliases": list(self.aliases), "size_bytes": self.size_bytes,
                "sha256": self.sha256, "accuracy": self.accuracy,
                "gate": None if self.gate is None else self.gate.to_dict(),
                "metric": None if self.metric is None else self.metric.__dict__,
                "verdict": self.verdict.value, "code": self.code.value, "reason": self.reason,
                "speed": None if self.speed is None else self.speed.value,
                "ratio": None if self.interval is None else self.interval.to_json(),
                "excluded_nodes": list(self.excluded_nodes), "note": self.variant.note,
                "p50_ms": bench.get("p50_ms"), "p99_ms": bench.get("p99_ms")}

    def record(self) -> dict[str, Any]:
        """The manifest's record of this row: no timing, so equal decisions give equal bytes."""
        return {"name": self.name, "verdict": self.verdict.value, "code": self.code.value, "reason": self.reason,
                "sha256": self.sha256, "size_bytes": self.size_bytes,
                "metric": None if self.metric is None else self.metric.__dict__,
                "excluded_nodes": list(self.excluded_nodes), "aliases": list(self.aliases),
                "accuracy": None if self.gate is None else self.gate.to_dict(), "note": self.variant.note}


@dataclass(frozen=True)
class Evaluation:
    examples: Examples
    labels: np.ndarray | None = None
    metric: TaskMetric | None = None  # labels' accuracy or RMSE, or a --metric function

    @property
    def origin(self) -> str:
        return self.examples.origin


@dataclass(frozen=True)
class SelectOptions:
    mode: QuantizeMode = "auto"
    variant: str | None = None  # --variant: pinned, not timed against the others
    gates: GateSettings = GateSettings()
    batch: int = 1
    bench_time_s: float = 0.5  # timed seconds per variant in the first comparison
    rounds: int = ROUNDS
    max_rounds: int = MAX_ROUNDS
    time_chosen: bool = True  # time the chosen variant alone (memory, cold start, budgets)


@dataclass(frozen=True)
class Locked:
    """A decision from edgepack.lock: the variant, its expected bytes, the records to write."""

    variant: str
    sha256: str
    excluded_nodes: tuple[str, ...]
    records: list[dict[str, Any]]


@dataclass
class Selection:
    rows: list[VariantRow]
    chosen: VariantRow
    chosen_bench: dict[str, Any] | None  # a standalone run of the chosen variant (memory, cold start)
    metric_basis: str
    records: list[dict[str, Any]] = field(default_factory=list)  # the manifest's variant records

    @property
    def chosen_path(self) -> Path:
        assert self.chosen.variant.path is not None  # only made variants are chosen
        return self.chosen.variant.path

    @property
    def variants(self) -> list[Variant]:
        return [row.variant for row in self.rows]


def choose_variant(fp32: Variant, names: Sequence[str], kinds: Sequence[OutputKind], dims: Sequence[Any],
                   evaluation: Evaluation, bench_feed: dict[str, np.ndarray], profile: Profile,
                   options: SelectOptions, config: QuantizeConfig, workdir: Path, reporter: Reporter,
                   locked: Locked | None = None) -> Selection:
    wanted = _wanted(options, locked)
    if config.calibration is not None and config.calibration_cache is None:  # one calibration for every static variant
        config = replace(config, calibration_cache=workdir / f"calibration.{config.method}.json")
    if locked is not None:
        config = replace(config, exclude={**config.exclude, locked.variant: locked.excluded_nodes})
    reporter.start("quantize", f"Making {len(wanted) - 1} variant(s)" if len(wanted) > 1 else "fp32 only")
    variants = make_variants(fp32, wanted, workdir, config,
                             made=lambda v: reporter.step("quantize", _made_text(v)))
    rows = _rows(variants)
    reference = run_model(fp32.path, evaluation.examples)  # type: ignore[arg-type]
    base = rows[0]
    fp32_value = None
    if evaluation.metric is not None:
        fp32_value = evaluation.metric.score(_joined(reference, evaluation.examples, names))
        base.metric = Metric(evaluation.metric.name, fp32_value, fp32_value, "reference", _metric_basis(evaluation), True)
    for index, row in enumerate(rows[1:], start=1):
        if row.variant.path is None:
            continue
        _gate_row(row, names, kinds, dims, reference, evaluation, fp32_value, options.gates)
        reporter.step("quantize", f"{row.label}: {'passes' if row.gate.passed else 'fails'} the gate: "  # type: ignore[union-attr]
                                  f"{row.accuracy}")
        if not row.gate.passed and VARIANTS[row.name].calibrated and config.calibration is not None \
                and locked is None and _near_miss(row.gate, options.gates):  # type: ignore[arg-type]
            rows[index] = _retry_without_sensitive(row, fp32.path, names, kinds, dims, reference,  # type: ignore[arg-type]
                                                   evaluation, fp32_value, options.gates, config, workdir, reporter)
    made = [r for r in rows[1:] if r.variant.path is not None]
    passing = [r.label for r in made if r.gate is not None and r.gate.passed]
    reporter.finish("quantize", f"{len(made)} variant(s) made, {len(rows) - 1 - len(made)} skipped; "
                                f"passing the gate: {', '.join(passing) or 'none'}" if len(rows) > 1 else "fp32 only")
    if locked is not None:
        chosen = _check_locked(rows, locked)
    elif options.variant is not None:
        chosen = _pinned(rows, options.variant)
    else:
        _time(rows, bench_feed, profile, options, reporter)
        chosen = _decide(rows, profile, options)
    chosen_bench = None
    if options.time_chosen and profile.runnable_here():
        reporter.start("bench", f"Benchmarking {chosen.name} alone on {profile.name}")
        chosen_bench = bench_onnx(chosen.variant.path, bench_feed, profile,  # type: ignore[arg-type]
                                  _alone(options.bench_time_s, options.batch))
        reporter.finish("bench", f"{chosen.name} on {profile.name}: p50 {chosen_bench['p50_ms']:.4f} ms, "
                                 f"p99 {chosen_bench['p99_ms']:.4f} ms, peak RSS {chosen_bench['peak_rss_mb']:.0f} MB")
    records = locked.records if locked is not None else [row.record() for row in rows]
    return Selection(rows, chosen, chosen_bench, _basis(evaluation, names, kinds), records)


def _alone(seconds: float, batch: int) -> BenchSettings:
    """The chosen variant's own timing (latency percentiles, memory, cold start): 100 runs or more,
    until the median's interval is within 2%, but no longer than a few times --bench-time (the
    default 10 s cap spent most of a slow model's build on a noisy host)."""
    settings = BenchSettings.timed(seconds, batch)
    return replace(settings, loop=replace(settings.loop, max_time_s=max(6 * seconds, 3.0)))


def _wanted(options: SelectOptions, locked: Locked | None) -> list[str]:
    if locked is not None:
        return ["fp32", locked.variant] if locked.variant != "fp32" else ["fp32"]
    if options.variant is not None:
        if options.variant not in VARIANTS:
            raise InputError(f"--variant {options.variant!r} is not a variant", f"choose one of {', '.join(VARIANTS)}")
        return ["fp32", options.variant] if options.variant != "fp32" else ["fp32"]
    return list(VARIANTS_FOR_MODE[options.mode])


def _made_text(variant: Variant) -> str:
    if variant.path is None:
        return f"{variant.name}: {variant.skipped}"
    return f"made {variant.name} ({variant.size_bytes / 1024:,.0f} KiB)" + (f", {variant.note}" if variant.note else "")


def _rows(variants: list[Variant]) -> list[VariantRow]:
    """One row per distinct model: a variant with the same bytes as an earlier one joins its row."""
    rows: list[VariantRow] = []
    by_digest: dict[str, VariantRow] = {}
    for variant in variants:
        if variant.path is None:
            code = Reason.NOT_APPLICABLE if variant.not_applicable else Reason.NOT_MADE
            rows.append(VariantRow(variant.name, variant, Verdict.SKIPPED, code, variant.skipped or "not made"))
            continue
        digest = hashlib.sha256(variant.path.read_bytes()).hexdigest()
        if digest in by_digest:
            twin = by_digest[digest]
            twin.aliases = (*twin.aliases, variant.name)
            continue
        row = VariantRow(variant.name, variant, sha256=digest, size_bytes=variant.size_bytes)
        by_digest[digest] = row
        rows.append(row)
    return rows


def run_model(model: Path, examples: Examples) -> list[list[np.ndarray]]:
    """The model's outputs on every run of the examples (one list of outputs per run)."""
    # One thread: figures must not depend on how the host splits reductions.
    session, _ = create_session(model, threads=1)
    try:
        quiet = quiet_run()
        return [session.run(None, feed, quiet) for feed in examples.chunks(EVAL_CHUNK)]
    except Exception as err:  # onnxruntime refuses inputs in many ways
        text = " ".join(str(err).split())
        raise InputError(f"{model.name} cannot run on {examples.describe()}: {text}",
                         "give inputs the model takes (--sample, or --input-shape/--input-range)") from None


def _joined(runs: list[list[np.ndarray]], examples: Examples, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: join_runs([run[index] for run in runs], examples.stacked) for index, name in enumerate(names)}


def _metric_basis(evaluation: Evaluation) -> str:
    return f"labels in {evaluation.origin}" if evaluation.labels is not None else f"{evaluation.origin}"


def _gate_row(row: VariantRow, names: Sequence[str], kinds: Sequence[OutputKind], dims: Sequence[Any],
              reference: list[list[np.ndarray]], evaluation: Evaluation, fp32_value: float | None,
              settings: GateSettings) -> None:
    metric = evaluation.metric
    gates = OutputGates(names, kinds, dims, settings, metric.reads if metric else frozenset())
    session, _ = create_session(row.variant.path, threads=1)  # type: ignore[arg-type]
    outputs = []
    for feed, expected in zip(evaluation.examples.chunks(EVAL_CHUNK), reference):
        got = session.run(None, feed)
        gates.add(expected, got)
        if metric is not None:
            outputs.append(got)
    if metric is not None and fp32_value is not None:
        value = metric.score(_joined(outputs, evaluation.examples, names))
        row.metric = judge_metric(metric, value, fp32_value, settings.max_accuracy_drop, _metric_basis(evaluation))
    row.gate = GateReport(gates.checks(), row.metric)
    if not row.gate.passed:
        row.verdict, row.code = Verdict.DROPPED, Reason.INACCURATE
        row.reason = "fails the accuracy gate: " + "; ".join(row.gate.failures())
    else:
        row.verdict = Verdict.DROPPED  # until the decision
        row.code, row.reason = Reason.NOT_CHOSEN, "accurate"


def _near_miss(gate: GateReport, settings: GateSettings) -> bool:
    """Whether a failed gate failed narrowly enough that keeping a few nodes in float may mend it.

    Keeping the three most sensitive nodes in float mends a variant a little off; one whose class
    agreement fell to 37% is broken throughout, and ranking its nodes (two augmented models over the
    examples) costs more than the whole rest of a build.
    """
    for check in gate.checks:
        if not check.gated or check.passed:
            continue
        if check.rule == "channel-error" and not check.value <= 3 * settings.max_channel_error:
            return False
        if check.rule != "channel-error" and check.value < 1 - 5 * (1 - settings.min_agreement):
            return False
    metric = gate.metric
    return metric is None or metric.passed or metric.loss <= 5 * max(settings.max_accuracy_drop, 0.2)


def _retry_without_sensitive(row: VariantRow, fp32_path: Path, names: Sequence[str], kinds: Sequence[OutputKind],
                             dims: Sequence[Any], reference: list[list[np.ndarray]], evaluation: Evaluation,
                             fp32_value: float | None, settings: GateSettings, config: QuantizeConfig,
                             workdir: Path, reporter: Reporter) -> VariantRow:
    """Name the nodes whose quantization hurts most, keep them in float, and try once more."""
    assert row.variant.path is not None and config.calibration is not None
    reporter.step("quantize", f"{row.name}: ranking the nodes whose quantization hurts most")
    try:
        worst = sensitive_nodes(fp32_path, row.variant.path, config.calibration.head(SENSITIVITY_EXAMPLES), workdir,
                                top=SENSITIVE_NODES)
    except Exception as err:  # the debugger is best effort; the first verdict stands
        row.reason += f"; could not rank sensitive nodes ({type(err).__name__})"
        return row
    if not worst:
        return row
    named = ", ".join(f"{node} ({sqnr:.1f} dB)" for node, sqnr in worst)
    retry_config = replace(config, exclude={**config.exclude, row.name: tuple(node for node, _ in worst)})
    (workdir / "retry").mkdir(exist_ok=True)
    retried = make_variants(Variant("fp32", fp32_path), [row.name], workdir / "retry", retry_config)[1]
    if retried.path is None:
        row.reason += f"; most sensitive nodes {named}; the retry with them in float could not be made"
        return row
    again = VariantRow(row.name, retried, sha256=hashlib.sha256(retried.path.read_bytes()).hexdigest(),
                       aliases=row.aliases, size_bytes=retried.size_bytes)
    _gate_row(again, names, kinds, dims, reference, evaluation, fp32_value, settings)
    reporter.step("quantize", f"{row.name} with {named} in float: {'passes' if again.gate.passed else 'fails'}"  # type: ignore[union-attr]
                              f" ({again.accuracy})")
    if again.gate.passed:  # type: ignore[union-attr]
        again.variant = replace(retried, note=f"accurate after keeping its most sensitive nodes in float: {named}")
        return again
    row.reason += f"; most sensitive nodes {named}; still failing with them in float"
    return row


def _time(rows: list[VariantRow], bench_feed: dict[str, np.ndarray], profile: Profile, options: SelectOptions,
          reporter: Reporter) -> None:
    """Alternating rounds of fp32 and every accurate variant; more rounds while a test is inconclusive."""
    accurate = [row for row in rows[1:] if row.gate is not None and row.gate.passed]
    if not accurate or not profile.runnable_here():
        return
    base = rows[0]
    pending = accurate
    per_round = options.bench_time_s / options.rounds
    rounds_done = 0
    reporter.start("bench", f"Timing fp32 and {len(accurate)} variant(s) on {profile.name}")
    while pending and rounds_done < options.max_rounds:
        count = min(options.rounds, options.max_rounds - rounds_done)
        timed = [base, *pending]
        done_before = rounds_done

        def said(progress: dict[str, Any]) -> None:
            medians = ", ".join(f"{name} {value:.4g} ms" for name, value in progress["p50_ms"].items())
            reporter.step("bench", f"round {done_before + progress['round']}: {medians}")

        compared = compare_onnx({row.name: row.variant.path for row in timed}, bench_feed, profile,  # type: ignore[misc]
                                BenchSettings.timed(per_round * count, options.batch), rounds=count, progress=said)
        rounds_done += count
        for row in timed:
            measured = compared["models"][row.name]
            if row.bench is None:
                row.bench = {**measured, "variant": row.name,
                             **{key: compared[key] for key in ("limits", "environment", "profile", "measured_on")}}
            else:
                row.bench["rounds_p50_ms"] = [*row.bench["rounds_p50_ms"], *measured["rounds_p50_ms"]]
        for row in pending:
            row.interval = paired_interval(row.bench["rounds_p50_ms"], base.bench["rounds_p50_ms"])  # type: ignore[index]
            row.speed = judge(row.interval)
        pending = [row for row in pending if row.speed is Speed.INCONCLUSIVE]
    reporter.finish("bench", "; ".join(f"{row.label} {row.speed.value} ({row.interval.describe()})"  # type: ignore[union-attr]
                                       for row in accurate))


def _decide(rows: list[VariantRow], profile: Profile, options: SelectOptions) -> VariantRow:
    base = rows[0]
    accurate = [row for row in rows[1:] if row.gate is not None and row.gate.passed]
    chosen = base
    if not profile.runnable_here():
        for row in accurate:
            row.code = Reason.NOT_MEASURED
            row.reason = (f"accurate; speed on {profile.name} not measured here; auto keeps fp32 "
                          f"(force with --variant {row.name})")
        if options.mode != "auto" and accurate:
            chosen = accurate[0]
            chosen.code, chosen.reason = Reason.REQUESTED, f"requested; speed on {profile.name} not measured here"
    else:
        faster = [row for row in accurate if row.speed is Speed.FASTER]
        if faster:
            best = min(faster, key=lambda row: row.interval.ratio)  # type: ignore[union-attr]
            # Equally fast within the noise: the earlier variant of the registry, so noise cannot flip it.
            ties = [row for row in faster if row is best or not separable(
                paired_interval(row.bench["rounds_p50_ms"], best.bench["rounds_p50_ms"]))]  # type: ignore[index]
            chosen = min(ties, key=lambda row: list(VARIANTS).index(row.name))
            chosen.code = Reason.FASTER
            chosen.reason = (f"faster than fp32 on {profile.name} by more than {FASTER_MARGIN:.0%} "
                             "with 95% confidence")
        for row in accurate:
            if row is not chosen:
                row.code, row.reason = Reason.NOT_CHOSEN, "accurate; not chosen on speed (see the bench report)"
    chosen.verdict = Verdict.CHOSEN
    if chosen is base:
        base.code = Reason.NO_FASTER_VARIANT
        tried = any(row.verdict is not Verdict.SKIPPED for row in rows[1:])
        base.reason = ("no variant was faster and accurate" if tried else
                       "fp32 only" if options.mode == "none" else "no other variant applies")
    else:
        base.verdict, base.code, base.reason = Verdict.DROPPED, Reason.BASELINE, f"baseline; {chosen.name} is chosen"
    return chosen


def _pinned(rows: list[VariantRow], name: str) -> VariantRow:
    row = next((r for r in rows if r.name == name or name in r.aliases), None)
    if row is None or row.variant.path is None:
        skipped = next(r for r in rows if r.name == name)
        raise InputError(f"--variant {name}: {skipped.reason}", "pin another variant, or drop --variant")
    if row.gate is not None and not row.gate.passed:
        raise ParityError(f"--variant {name} fails the accuracy gate: " + "; ".join(row.gate.failures()),
                          "pin another variant, or loosen the gate (--max-channel-error, --min-agreement, "
                          "--max-accuracy-drop)")
    for other in rows:
        if other is not row and other.verdict is not Verdict.SKIPPED:
            other.verdict = Verdict.DROPPED
            other.code, other.reason = (Reason.BASELINE, "baseline") if other.name == "fp32" else (other.code, other.reason)
    row.verdict, row.code, row.reason = Verdict.CHOSEN, Reason.PINNED, "pinned with --variant"
    return row


def _check_locked(rows: list[VariantRow], locked: Locked) -> VariantRow:
    row = next((r for r in rows if r.name == locked.variant), None)
    if row is None or row.variant.path is None:
        reason = row.reason if row is not None else "not made"
        raise InputError(f"--locked: the locked variant {locked.variant} could not be made again ({reason})",
                         "build without --locked to decide again")
    if row.sha256 != locked.sha256:
        raise InputError(f"--locked: {locked.variant} came out with other bytes than when it was locked "
                         f"(sha256 {row.sha256[:12]}…, locked {locked.sha256[:12]}…): the tools or the inputs differ",
                         "build without --locked to decide again")
    if row.gate is not None and not row.gate.passed:
        raise ParityError(f"--locked: {locked.variant} now fails the accuracy gate: " + "; ".join(row.gate.failures()),
                          "build without --locked to decide again")
    row.verdict, row.code = Verdict.CHOSEN, Reason.LOCKED
    return row


def _basis(evaluation: Evaluation, names: Sequence[str], kinds: Sequence[OutputKind]) -> str:
    """What the gate judged, in words, for the table's title and the manifest."""
    rules = {"label": "labels", "probabilities": "argmax", "logits": "argmax", "sequence": "argmax per position",
             "mask": "per pixel", "embedding": "cosine"}
    judged_by_metric = evaluation.metric.reads if evaluation.metric else frozenset()
    parts = [f"{name} ({kind}: {rules.get(kind, 'per-channel error')})" for name, kind in zip(names, kinds)
             if name not in judged_by_metric]
    text = ""
    if evaluation.metric is not None:
        text = f"{evaluation.metric.name} on {_metric_basis(evaluation)}"
        if parts:
            text += "; "
    if parts:
        text += f"vs fp32 on {evaluation.origin}: " + ", ".join(parts)
    return text
