"""Runs a build: load, convert, parity, quantize, bench, select, package, verify.

Each stage is a function of the previous artifact; this module only sequences them and reports
progress through a ``Reporter``. It prints nothing.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

import edgepack
from edgepack.bench.profiles import Profile, all_profiles, resolve_profile
from edgepack.bench.runner import BenchSettings, bench_onnx, median_round, paired_ratio
from edgepack.convert.base import LoadOptions, SourceModel
from edgepack.convert.opsets import clamp_ir_version, support_for
from edgepack.convert.registry import converter_for
from edgepack.errors import BudgetExceeded, ConversionError, InputError, ParityError
from edgepack.manifest import Manifest, Source, Target, TensorSpec, VariantRecord
from edgepack.package.bundle import assemble, file_entries, payload_with_runtime, write_atomic
from edgepack.package.npz import npz_bytes
from edgepack.quantize import Variant, canonicalize, make_variants
from edgepack.runtime.bundle import verify_archive
from edgepack.runtime.session import create_session, numpy_dtype
from edgepack.sample_data import SampleData, random_sample, read_sample
from edgepack.spec import BuildSpec
from edgepack.validate import PARITY, VARIANT, ParityReport, compare

BENCH_ROWS = 16  # sample rows shipped in the bundle for the on-device benchmark
BENCH_ROUNDS = 5  # variants are timed in turn, this many times each
# A variant must beat fp32's median by this much to be chosen: smaller gains are within noise.
FASTER_MARGIN = 0.03


class Reporter(Protocol):
    def start(self, stage: str, text: str) -> None: ...

    def finish(self, stage: str, text: str) -> None: ...


class SilentReporter:
    def start(self, stage: str, text: str) -> None:
        pass

    def finish(self, stage: str, text: str) -> None:
        pass


@dataclass
class VariantRow:
    name: str
    size_bytes: int | None
    accuracy: str
    verdict: str  # candidate, then chosen | dropped | skipped
    reason: str  # stable across runs: it goes into the manifest
    bench: dict[str, Any] | None = None
    speed: str = ""  # the measured figure behind the verdict, for the summary and report
    accuracy_report: ParityReport | None = None

    def to_json(self) -> dict[str, Any]:
        bench = self.bench or {}
        return {"name": self.name, "size_bytes": self.size_bytes, "accuracy": self.accuracy,
                "verdict": self.verdict, "reason": self.reason, "speed": self.speed,
                "p50_ms": bench.get("p50_ms"), "p99_ms": bench.get("p99_ms")}


@dataclass
class BuildResult:
    bundle: Path
    bundle_sha256: str
    bundle_bytes: int
    report: Path
    manifest: Manifest
    profile: Profile
    parity: ParityReport
    variants: list[VariantRow]
    bench: dict[str, Any] | None  # the chosen variant on the target profile
    not_measured: dict[str, str] = field(default_factory=dict)  # profile -> why
    next_steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "bundle_sha256": self.bundle_sha256,
            "bundle_bytes": self.bundle_bytes,
            "report": str(self.report),
            "name": self.manifest.name,
            "version": self.manifest.version,
            "profile": self.profile.name,
            "variant": self.manifest.variant,
            "parity": self.parity.to_dict(),
            "variants": [row.to_json() for row in self.variants],
            "bench": {self.profile.name: self.bench} if self.bench else {},
            "not_measured": self.not_measured,
            "next_steps": self.next_steps,
        }


def build(spec: BuildSpec, reporter: Reporter | None = None) -> BuildResult:
    reporter = reporter or SilentReporter()
    profile = resolve_profile(spec.target)
    sample = read_sample(spec.sample) if spec.sample else random_sample(spec.input_shape or "", spec.input_dtype)

    reporter.start("load", f"Loading {spec.model.name}")
    converter = converter_for(spec.model)
    source = converter.load(spec.model, LoadOptions(spec.allow_pickle, spec.trust, spec.weights))
    _check_features(source, sample)
    reporter.finish("load", f"{source.estimator} ({source.file_format}, input {_dims(sample.feature_shape)})")

    opset, ml_opset, ir_version = support_for(profile.onnxruntime.version)
    opset = min(opset, onnx.defs.onnx_opset_version())
    reporter.start("convert", f"Converting to ONNX (opset {opset})")
    model = converter.convert(source, sample, {"": opset, "ai.onnx.ml": ml_opset})
    clamp_ir_version(model, ir_version)
    canonicalize(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ConversionError(f"the converted model is not valid ONNX: {str(err).splitlines()[0]}",
                              "report this with the model type; run with --debug") from None
    reporter.finish("convert", f"{converter.name} → ONNX opset {opset}, IR {model.ir_version}")

    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        workdir = Path(tmp)
        fp32_path = workdir / "model.fp32.onnx"
        fp32_path.write_bytes(model.SerializeToString())

        reporter.start("parity", f"Checking parity on {len(sample.rows)} {sample.origin} rows")
        names, fp32_outputs = _run(fp32_path, sample.rows)
        tolerance = replace(PARITY, atol=spec.atol, rtol=spec.rtol)
        parity = compare(source.predict(sample.rows), fp32_outputs, names,
                         source.output_kinds, tolerance)
        if not parity.passed:
            raise ParityError(
                f"the ONNX model differs from the original over {parity.samples} rows "
                f"(atol {spec.atol:g}, rtol {spec.rtol:g}): " + "; ".join(parity.failures()),
                "if these differences are acceptable, loosen --atol/--rtol; otherwise report the estimator",
            )
        reporter.finish("parity", "; ".join(d.describe() for d in parity.outputs))

        reporter.start("quantize", f"Making variants ({spec.quantize})")
        variants = make_variants(fp32_path, spec.quantize, workdir)
        rows = _check_variants(variants, names, fp32_outputs, source, sample, spec)
        reporter.finish("quantize", ", ".join(f"{r.name}: {r.accuracy}" for r in rows))

        bench_sample = {names_in: sample.rows[:BENCH_ROWS] for names_in in _input_names(fp32_path)}
        not_measured = {p.name: f"{p.arch} profile: benchmark it on the device"
                        for p in all_profiles() if p.kind == profile.kind and not p.runnable_here()}
        if profile.runnable_here():
            _bench_alternating(rows, variants, bench_sample, profile, spec, reporter)
        chosen = _select(rows, profile, spec)
        chosen_bench = chosen.bench
        _check_latency_budget(chosen, profile, spec)

        reporter.start("package", f"Packaging {chosen.name} for {profile.name}")
        chosen_path = next(v.path for v in variants if v.name == chosen.name)
        assert chosen_path is not None  # only made variants can be chosen
        model_bytes = chosen_path.read_bytes()
        files = payload_with_runtime({"model.onnx": model_bytes, "bench_input.npz": npz_bytes(bench_sample)})
        manifest = _manifest(spec, profile, source, sample, chosen_path, model_bytes, opset, ir_version,
                             parity, rows, variants, files)
        root, archive = assemble(files, manifest)
        _check_size_budget(len(archive), profile, spec)
        bundle = write_atomic(spec.out / f"{root}.tar.gz", archive)
        report_path = write_atomic(spec.out / f"{root}.bench.json",
                                   _bench_report(manifest, profile, rows, not_measured))
        reporter.finish("package", f"{bundle} ({len(archive) / 1024:.0f} KiB)")

    reporter.start("verify", "Verifying the bundle")
    verified = verify_archive(bundle)
    reporter.finish("verify", f"{len(verified.sums)} files, every checksum matches")
    return BuildResult(
        bundle=bundle, bundle_sha256=hashlib.sha256(archive).hexdigest(), bundle_bytes=len(archive),
        report=report_path, manifest=manifest, profile=profile, parity=parity, variants=rows,
        bench=chosen_bench, not_measured=not_measured,
        next_steps=[
            f"edgepack verify {bundle}",
            f"edgepack bench {bundle} --profile {profile.name}",
            f"tar xzf {bundle} && cd {root} && python -m runtime.bench   # on the device",
        ],
    )


def _bench_alternating(rows: list[VariantRow], variants: list[Variant], bench_sample: dict[str, np.ndarray],
                       profile: Profile, spec: BuildSpec, reporter: Reporter) -> None:
    """Time the candidates in alternating rounds, so a burst of load on the host hits them all."""
    candidates = [(row, variant.path) for row, variant in zip(rows, variants) if row.verdict == "candidate"]
    settings = BenchSettings.timed(spec.bench_time_s / BENCH_ROUNDS, batch=spec.batch)
    rounds: dict[str, list[dict[str, Any]]] = {row.name: [] for row, _ in candidates}
    for number in range(1, BENCH_ROUNDS + 1):
        for row, path in candidates:
            assert path is not None  # candidates are made variants
            reporter.start("bench", f"Benchmarking {row.name} on {profile.name}, round {number}/{BENCH_ROUNDS}")
            rounds[row.name].append(bench_onnx(path, bench_sample, profile, settings))
    for row, _ in candidates:
        row.bench = median_round(rounds[row.name])
        reporter.finish("bench", f"{row.name} on {profile.name}: p50 {row.bench['p50_ms']:.4f} ms, "
                                 f"p99 {row.bench['p99_ms']:.4f} ms (median of {BENCH_ROUNDS} rounds)")


def _check_features(source: SourceModel, sample: SampleData) -> None:
    if source.input_shape is not None and source.input_shape != sample.feature_shape:
        raise InputError(
            f"the sample's rows have {_dims(sample.feature_shape)} but {source.estimator} expects "
            f"{_dims(source.input_shape)}",
            "pass sample rows shaped like the data the model was trained on",
        )


def _dims(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} features" if len(shape) == 1 else "shape " + "x".join(map(str, shape))


def _run(model: Path, rows: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    # One thread: parity figures must not depend on how the host splits reductions.
    session, _ = create_session(model, threads=1)
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {session.get_inputs()[0].name: rows})


def _input_names(model: Path) -> list[str]:
    return [i.name for i in onnx.load(model, load_external_data=False).graph.input]


def _check_variants(variants: list[Variant], names: list[str], fp32_outputs: list[np.ndarray],
                    source: SourceModel, sample: SampleData, spec: BuildSpec) -> list[VariantRow]:
    rows = [VariantRow("fp32", variants[0].size_bytes, "reference", "candidate", "baseline")]
    tolerance = replace(VARIANT, min_label_agreement=spec.min_agreement)
    for variant in variants[1:]:
        if variant.path is None:
            rows.append(VariantRow(variant.name, None, "-", "skipped", variant.skipped or "not made"))
            continue
        _, outputs = _run(variant.path, sample.rows)
        report = compare(fp32_outputs, outputs, names, source.output_kinds, tolerance)
        accuracy = "; ".join(_accuracy_text(d) for d in report.outputs if d.gated)
        row = VariantRow(variant.name, variant.size_bytes, accuracy, "candidate", "", accuracy_report=report)
        if not report.passed:
            row.verdict = "dropped"
            row.reason = "outside tolerance of fp32: " + "; ".join(report.failures())
        rows.append(row)
    return rows


def _accuracy_text(diff: Any) -> str:
    if diff.kind == "label":
        return f"{diff.agreement:.2%} agree"
    return f"rel. RMSE {diff.relative_rmse:.3f}"


def _select(rows: list[VariantRow], profile: Profile, spec: BuildSpec) -> VariantRow:
    baseline = rows[0]
    candidates = [r for r in rows[1:] if r.verdict == "candidate"]
    measured = profile.runnable_here()
    best = baseline
    for row in candidates:
        if not measured:
            if spec.quantize == "int8-dynamic":
                best, row.reason = row, f"requested; speed on {profile.name} not measured here"
            else:
                row.reason = f"speed on {profile.name} not measured here; auto keeps fp32 (force with --quantize {row.name})"
            continue
        assert row.bench is not None and baseline.bench is not None
        ratio = paired_ratio(row.bench, baseline.bench)
        row.speed = f"p50 {ratio:.2f}x of fp32"
        if ratio >= 1 - FASTER_MARGIN:
            row.reason = f"not faster than fp32 on {profile.name}"
        elif best is baseline or paired_ratio(row.bench, best.bench) < 1:  # type: ignore[arg-type]
            best = row
    for row in candidates:
        if row is best:
            continue
        if not row.reason:
            row.reason = f"accurate, but slower than {best.name}"
    best.verdict = "chosen"
    if best is baseline:
        tried = any(r.verdict != "skipped" for r in rows[1:])
        baseline.reason = "no variant was faster and accurate enough" if tried else (
            "fp32 only" if spec.quantize == "none" else "no other variant applies")
    elif best.bench:
        best.reason = f"fastest accurate variant on {profile.name}"
        baseline.reason = f"baseline; {best.name} is faster"
    for row in rows:
        if row is not best and row.verdict != "skipped":
            row.verdict = "dropped"
    return best


def _check_latency_budget(chosen: VariantRow, profile: Profile, spec: BuildSpec) -> None:
    limit = spec.max_p99_ms or profile.budgets.max_p99_ms
    if limit and chosen.bench and chosen.bench["p99_ms"] > limit:
        raise BudgetExceeded(
            f"p99 latency {chosen.bench['p99_ms']:.3f} ms on {profile.name} exceeds the budget of {limit:g} ms",
            "use a faster variant (--quantize auto), a smaller model, or raise --max-p99-ms",
        )


def _check_size_budget(size: int, profile: Profile, spec: BuildSpec) -> None:
    limit = spec.max_size_mb or profile.budgets.max_size_mb
    if limit and size > limit * 2**20:
        raise BudgetExceeded(f"bundle size {size / 2**20:.2f} MB exceeds the budget of {limit:g} MB",
                             "try --quantize int8-dynamic or raise --max-size-mb")


def _manifest(spec: BuildSpec, profile: Profile, source: SourceModel, sample: SampleData, chosen_path: Path,
              model_bytes: bytes, opset: int, ir_version: int, parity: ParityReport, rows: list[VariantRow],
              variants: list[Variant], files: dict[str, bytes]) -> Manifest:
    session, _ = create_session(chosen_path, threads=1)
    digests = {v.name: hashlib.sha256(v.path.read_bytes()).hexdigest() for v in variants if v.path}
    return Manifest(
        name=spec.bundle_name,
        version=hashlib.sha256(model_bytes).hexdigest()[:12],
        created_by={"edgepack": edgepack.__version__},
        target=Target(
            profile=profile.name, kind=profile.kind, arch=profile.arch, cpus=profile.cpus,
            memory_mb=profile.memory_mb, threads=profile.onnxruntime.threads,
            providers=list(profile.onnxruntime.providers), onnxruntime=profile.onnxruntime.version,
            opset=opset, ir_version=ir_version,
        ),
        source=Source(framework=source.framework, format=source.file_format, file=source.path.name,
                      sha256=source.sha256, estimator=source.estimator, converter=source.converter,
                      versions={**source.versions, "onnx": onnx.__version__}),
        inputs=[TensorSpec(name=i.name, dtype=_dtype(i.type), shape=_shape(i.shape),
                           features=list(sample.feature_names) or None) for i in session.get_inputs()],
        outputs=[TensorSpec(name=o.name, dtype=_dtype(o.type), shape=_shape(o.shape))
                 for o in session.get_outputs()],
        variant=next(r.name for r in rows if r.verdict == "chosen"),
        # Speed figures vary run to run; the manifest keeps verdicts, the bench report keeps timings.
        variants=[VariantRecord(name=r.name, verdict=r.verdict, reason=r.reason, sha256=digests.get(r.name),
                                size_bytes=r.size_bytes,
                                accuracy=r.accuracy_report.to_dict() if r.accuracy_report else None)
                  for r in rows],
        parity={**parity.to_dict(), "reference": source.framework, "data": sample.origin},
        files=file_entries(files),
    )


def _dtype(onnx_type: str) -> str:
    dtype = numpy_dtype(onnx_type)
    return "string" if dtype is np.str_ else np.dtype(dtype).name


def _shape(dims: list[Any]) -> list[int | str]:
    return [d if isinstance(d, int) else "batch" if i == 0 else str(d) for i, d in enumerate(dims)]


def _bench_report(manifest: Manifest, profile: Profile, rows: list[VariantRow],
                  not_measured: dict[str, str]) -> bytes:
    report = {
        "model": manifest.name, "version": manifest.version, "profile": profile.name,
        "variant": manifest.variant,
        "variants": [{**row.to_json(), "bench": row.bench} for row in rows],
        "not_measured": not_measured,
    }
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
