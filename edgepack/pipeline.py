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
from edgepack.budgets import check_bench, check_size
from edgepack.convert.base import LoadOptions, SourceModel, recorded_converter
from edgepack.convert.opsets import clamp_ir_version, support_for
from edgepack.convert.registry import converter_for
from edgepack.errors import ConversionError, InputError, ParityError
from edgepack.manifest import Manifest, Source, Target, TensorSpec, VariantRecord, WheelsRecord
from edgepack.package.bundle import assemble, file_entries, payload_with_runtime
from edgepack.package.image import ImageBuild, ImageResult, bundle_files
from edgepack.package.npz import npz_bytes
from edgepack.package.wheels import WheelSet, fetch_wheels, request_for
from edgepack.quantize import (CALIBRATION_ROWS, QuantizeConfig, Variant, canonicalize, needs_reduce_range,
                               optimize_fp32)
from edgepack.runtime.bench import cpu_info
from edgepack.runtime.bundle import verify_archive
from edgepack.runtime.files import write_atomic
from edgepack.runtime.session import create_session, numpy_dtype
from edgepack.sample_data import SampleData, ValidationData, check_rows, random_sample, read_sample, read_validation
from edgepack.select import EvalData, Selection, SelectOptions, VariantRow, choose_variant, run_model
from edgepack.spec import BuildSpec
from edgepack.validate import PARITY, ParityReport, compare

BENCH_ROWS = 16  # sample rows shipped in the bundle for the on-device benchmark
# Tree ensembles in ONNX compare float32 thresholds; this share of samples may flip a split.
TREE_FLIP_RATE = 0.01

class Reporter(Protocol):
    def start(self, stage: str, text: str) -> None: ...

    def finish(self, stage: str, text: str) -> None: ...


class SilentReporter:
    def start(self, stage: str, text: str) -> None:
        pass

    def finish(self, stage: str, text: str) -> None:
        pass


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
    metric_basis: str = ""
    not_measured: dict[str, str] = field(default_factory=dict)  # profile -> why
    next_steps: list[str] = field(default_factory=list)
    image: ImageResult | None = None  # cloud profiles: the container image made from the bundle

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
            "metric_basis": self.metric_basis,
            "bench": {self.profile.name: self.bench} if self.bench else {},
            "not_measured": self.not_measured,
            "next_steps": self.next_steps,
            **({"image": self.image.to_json()} if self.image else {}),
        }


def build(spec: BuildSpec, reporter: Reporter | None = None, debug: bool = False) -> BuildResult:
    """``debug`` shows the output of the tools run underneath (pip) on stderr."""
    reporter = reporter or SilentReporter()
    profile, sample, validation = _read_inputs(spec)
    wheels = _platform_wheels(spec, profile, reporter, debug)  # first: a fetch failure should not wait for the rest
    image = _prepare_image(spec, profile, reporter, debug)  # likewise a missing base, platform or Python

    reporter.start("load", f"Loading {spec.model.name}")
    converter = converter_for(spec.model)
    if spec.weights is not None and converter.name != "pytorch":
        raise InputError(f"--weights applies to PyTorch models given as module.py:factory, not to {converter.name}",
                         "drop --weights")
    source = converter.load(spec.model, LoadOptions(spec.allow_pickle, spec.trust, spec.weights))
    _check_inputs(source, sample, validation)
    config = quantize_config(spec, profile, sample)
    reporter.finish("load", f"{source.estimator} ({source.file_format}, {_dims(sample.feature_shape)})")

    opset, ml_opset, ir_version = support_for(profile.onnxruntime.version)
    opset = min(opset, onnx.defs.onnx_opset_version())
    reporter.start("convert", f"Converting to ONNX (opset {opset})")
    model = converter.convert(source, sample, {"": opset, "ai.onnx.ml": ml_opset})
    source = replace(source, converter=recorded_converter(model) or source.converter)
    clamp_ir_version(model, ir_version)
    canonicalize(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ConversionError(f"the converted model is not valid ONNX: {str(err).splitlines()[0]}",
                              "report this with the model type; run with --debug") from None

    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        workdir = Path(tmp)
        converted = workdir / "model.converted.onnx"
        converted.write_bytes(model.SerializeToString())
        fp32 = optimize_fp32(converted, workdir / "model.fp32.onnx")
        reporter.finish("convert", f"{source.converter or converter.name} → ONNX opset {opset}, IR {model.ir_version}"
                        + (", graph-optimized" if fp32.path != converted else ""))

        reporter.start("parity", f"Checking parity on {len(sample.rows)} {sample.origin} rows")
        assert fp32.path is not None
        names, fp32_outputs = run_model(fp32.path, sample.rows)
        tolerance = replace(PARITY, atol=spec.atol, rtol=spec.rtol,
                            max_flip_rate=TREE_FLIP_RATE if source.float32_thresholds else 0.0)
        parity = compare(source.predict(sample.rows), fp32_outputs, names, source.output_kinds, tolerance)
        if not parity.passed:
            raise ParityError(
                f"the ONNX model differs from the original over {parity.samples} rows "
                f"(atol {spec.atol:g}, rtol {spec.rtol:g}): " + "; ".join(parity.failures()),
                "if these differences are acceptable, loosen --atol/--rtol; otherwise report the model type",
            )
        reporter.finish("parity", "; ".join(d.describe() for d in parity.outputs))

        selection, bench_sample = _choose(spec, fp32, source, profile, sample, validation, config, workdir, reporter)
        not_measured = {p.name: f"{p.arch} profile: benchmark it on the device"
                        for p in all_profiles() if p.kind == profile.kind and not p.runnable_here()}
        budgets = spec.budgets.merged_with(profile)
        check_bench(selection.chosen_bench, budgets, profile)

        reporter.start("package", f"Packaging {selection.chosen.name} for {profile.name}")
        model_bytes = selection.chosen_path.read_bytes()
        files = payload_with_runtime({"model.onnx": model_bytes, "bench_input.npz": npz_bytes(bench_sample),
                                      **(wheels.files() if wheels else {})})
        manifest = _manifest(spec, profile, source, sample, selection, model_bytes, opset, ir_version, parity,
                             config, files, wheels)
        root, archive = assemble(files, manifest)
        check_size(len(archive), budgets)
        if image is not None:  # staged, and its size budget checked, before the bundle is written
            reporter.start("image", f"Writing the image of {root}")
            image.assemble(bundle_files(archive), manifest.name, manifest.version,
                           f"edgepack model server: {manifest.name} ({manifest.variant}) for {profile.name}")
        try:
            bundle = write_atomic(spec.out / f"{root}.tar.gz", archive)
            report_path = write_atomic(spec.out / f"{root}.bench.json",
                                       _bench_report(manifest, profile, selection, not_measured))
            image_result = image.publish() if image is not None else None
        finally:
            if image is not None:
                image.discard()
        if image_result is not None:
            reporter.finish("image", f"{image_result.layout.name} ({image_result.digest[:19]}…), "
                                     f"{image_result.archive.name}")
        reporter.finish("package", f"{bundle} ({len(archive) / 1024:.0f} KiB)")

    reporter.start("verify", "Verifying the bundle")
    verified = verify_archive(bundle)
    reporter.finish("verify", f"{len(verified.sums)} files, every checksum matches")
    return BuildResult(
        bundle=bundle, bundle_sha256=hashlib.sha256(archive).hexdigest(), bundle_bytes=len(archive),
        report=report_path, manifest=manifest, profile=profile, parity=parity, variants=selection.rows,
        bench=selection.chosen_bench, metric_basis=selection.metric_basis, not_measured=not_measured,
        next_steps=[
            f"edgepack verify {bundle}",
            f"edgepack bench {bundle} --profile {profile.name}",
            *(image_result.next_steps if image_result else
              [f"tar xzf {bundle} && cd {root} && python -m runtime.bench   # on the device"]),
        ],
        image=image_result,
    )


@dataclass
class QuantizeResult:
    model: Path
    report: Path
    profile: Profile
    selection: Selection

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.model), "report": str(self.report), "profile": self.profile.name,
                "variant": self.selection.chosen.name, "metric_basis": self.selection.metric_basis,
                "variants": [row.to_json() for row in self.selection.rows],
                "bench": {self.profile.name: self.selection.chosen_bench} if self.selection.chosen_bench else {}}


def quantize_only(spec: BuildSpec, reporter: Reporter | None = None) -> QuantizeResult:
    """The quantize stage alone, for an ONNX file: variants, gate, timing, the chosen model written out."""
    from edgepack.convert.onnx_file import OnnxConverter

    reporter = reporter or SilentReporter()
    if spec.model.suffix.lower() != ".onnx":
        raise InputError(f"{spec.model.name}: `edgepack quantize` takes an ONNX file",
                         "convert other models with `edgepack build`")
    converter_for(spec.model)  # the same existence checks as build
    profile, sample, validation = _read_inputs(spec)
    source = OnnxConverter().load(spec.model, LoadOptions())
    _check_inputs(source, sample, validation)
    config = quantize_config(spec, profile, sample)
    with tempfile.TemporaryDirectory(prefix="edgepack-quantize-") as tmp:
        workdir = Path(tmp)
        fp32 = optimize_fp32(spec.model, workdir / "model.fp32.onnx")
        selection, _ = _choose(spec, fp32, source, profile, sample, validation, config, workdir, reporter)
        stem = spec.bundle_name
        model = write_atomic(spec.out / f"{stem}.{selection.chosen.name}.onnx", selection.chosen_path.read_bytes())
        table = {"model": str(model), "source": spec.model.name, "profile": profile.name,
                 "variant": selection.chosen.name, "metric_basis": selection.metric_basis,
                 "reduce_range": config.reduce_range, "calibration": config.calibration_origin,
                 "variants": [{**row.to_json(), "bench": row.bench} for row in selection.rows]}
        report = write_atomic(spec.out / f"{stem}.quantize.json",
                              (json.dumps(table, indent=2, sort_keys=True) + "\n").encode())
    return QuantizeResult(model, report, profile, selection)


def quantize_config(spec: BuildSpec, profile: Profile, sample: SampleData) -> QuantizeConfig:
    """Calibration rows (the --calibration file, else the sample) and the CPU-dependent choices."""
    calibration = read_sample(spec.calibration) if spec.calibration is not None else sample
    origin = calibration.origin if spec.calibration is not None else f"{sample.origin} (the sample)"
    rows = check_rows(calibration.rows, sample.feature_shape, f"calibration data {origin}")[:CALIBRATION_ROWS]
    _, flags = cpu_info()
    return QuantizeConfig(calibration=rows, calibration_origin=origin, method=spec.calibration_method,
                          reduce_range=needs_reduce_range(profile.arch, flags))


def select_options(spec: BuildSpec) -> SelectOptions:
    return SelectOptions(mode=spec.quantize, min_agreement=spec.min_agreement,
                         max_accuracy_drop=spec.max_accuracy_drop, batch=spec.batch, bench_time_s=spec.bench_time_s)


def _read_inputs(spec: BuildSpec) -> tuple[Profile, SampleData, ValidationData | None]:
    """The target profile, the sample (or random rows of --input-shape) and labelled validation rows."""
    profile = resolve_profile(spec.target)
    sample = read_sample(spec.sample) if spec.sample else random_sample(spec.input_shape or "", spec.input_dtype)
    validation = read_validation(spec.validation, spec.label_column) if spec.validation else None
    return profile, sample, validation


def _platform_wheels(spec: BuildSpec, profile: Profile, reporter: Reporter, debug: bool) -> WheelSet | None:
    if spec.arch is None:
        return None
    return fetch_wheels(request_for(profile, spec.arch, spec.python_version), reporter, show_pip=debug)


def _prepare_image(spec: BuildSpec, profile: Profile, reporter: Reporter, debug: bool) -> ImageBuild | None:
    """The image stage's first half for cloud builds: bases read, Python checked, dependency layers made."""
    if not spec.builds_image():
        if spec.base_image or spec.platform or spec.max_image_mb or spec.builder != "native":
            raise InputError("--base-image, --platform, --max-image-mb and --builder describe a container image, "
                             f"and this build writes none (target {profile.name}, kind {profile.kind})",
                             "build for a cloud profile (--target cloud), or add --image")
        return None
    from edgepack.package.base_image import parse_platforms
    from edgepack.package.image import ImageRequest

    settings = profile.image
    where = str(profile.source) if profile.source else f"profile {profile.name}"
    bases = spec.base_image or ((settings.base,) if settings and settings.base else ())
    if not bases:
        raise InputError(f"{where} names no base image ([image] base) and --base-image is not given",
                         "pass --base-image oci:PATH[:TAG], docker-archive:PATH or REGISTRY/REPO:TAG")
    platforms = parse_platforms(spec.platform or ",".join(settings.platforms if settings else ("linux/amd64",)))
    request = ImageRequest(bases=bases, platforms=platforms, onnxruntime=profile.onnxruntime.version,
                           python=spec.python_version, default_python=settings.python if settings else None,
                           builder=spec.builder, max_image_mb=spec.max_image_mb, where=where)
    image = ImageBuild(request, spec.out, reporter, debug)
    image.prepare()
    return image


def _check_inputs(source: SourceModel, sample: SampleData, validation: ValidationData | None) -> None:
    if source.input_shape is not None and source.input_shape != sample.feature_shape:
        raise InputError(
            f"the sample's rows have {_dims(sample.feature_shape)} but {source.estimator} expects "
            f"{_dims(source.input_shape)}",
            "pass sample rows shaped like the data the model was trained on",
        )
    if validation is not None:
        check_rows(validation.rows, sample.feature_shape, f"validation data {validation.origin}")


def _choose(spec: BuildSpec, fp32: Variant, source: SourceModel, profile: Profile, sample: SampleData,
            validation: ValidationData | None, config: QuantizeConfig, workdir: Path,
            reporter: Reporter) -> tuple[Selection, dict[str, np.ndarray]]:
    """The variant stage: evaluated on the validation rows (else the sample), timed on sample rows."""
    assert fp32.path is not None
    evaluation = (EvalData(validation.rows, validation.labels, validation.origin) if validation
                  else EvalData(sample.rows, None, sample.origin))
    bench_sample = {name: sample.rows[:BENCH_ROWS] for name in _input_names(fp32.path)}
    selection = choose_variant(fp32, source.output_kinds, evaluation, bench_sample, profile,
                               select_options(spec), config, workdir, reporter)
    return selection, bench_sample


def _dims(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} features" if len(shape) == 1 else "shape " + "x".join(map(str, shape))


def _input_names(model: Path) -> list[str]:
    return [i.name for i in onnx.load(model, load_external_data=False).graph.input]


def _manifest(spec: BuildSpec, profile: Profile, source: SourceModel, sample: SampleData, selection: Selection,
              model_bytes: bytes, opset: int, ir_version: int, parity: ParityReport, config: QuantizeConfig,
              files: dict[str, bytes], wheels: WheelSet | None) -> Manifest:
    session, _ = create_session(selection.chosen_path, threads=1)
    digests = {v.name: hashlib.sha256(v.path.read_bytes()).hexdigest() for v in selection.variants if v.path}
    cpu_model, cpu_flags = cpu_info()
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
        variant=selection.chosen.name,
        # Speed figures vary run to run; the manifest keeps verdicts, the bench report keeps timings.
        variants=[VariantRecord(name=r.name, verdict=r.verdict, reason=r.reason, sha256=digests.get(r.name),
                                size_bytes=r.size_bytes, metric=r.metric.__dict__ if r.metric else None,
                                excluded_nodes=list(r.excluded_nodes),
                                accuracy=r.agreement.to_dict() if r.agreement else None)
                  for r in selection.rows],
        quantization={
            "mode": spec.quantize, "metric_basis": selection.metric_basis,
            "reduce_range": config.reduce_range, "cpu_model": cpu_model, "cpu_flags": cpu_flags,
            "calibration": {"data": config.calibration_origin, "method": config.method,
                            "rows": 0 if config.calibration is None else len(config.calibration)},
        },
        parity={**parity.to_dict(), "reference": source.framework, "data": sample.origin},
        files=file_entries(files),
        wheels=None if wheels is None else WheelsRecord(
            arch=wheels.request.arch, python=wheels.request.python, platforms=list(wheels.request.platforms),
            versions=wheels.versions(), files=sorted(wheels.files())),
    )


def _dtype(onnx_type: str) -> str:
    dtype = numpy_dtype(onnx_type)
    return "string" if dtype is np.str_ else np.dtype(dtype).name


def _shape(dims: list[Any]) -> list[int | str]:
    return [d if isinstance(d, int) else "batch" if i == 0 else str(d) for i, d in enumerate(dims)]


def _bench_report(manifest: Manifest, profile: Profile, selection: Selection, not_measured: dict[str, str]) -> bytes:
    report = {
        "model": manifest.name, "version": manifest.version, "profile": profile.name,
        "variant": manifest.variant, "chosen_bench": selection.chosen_bench,
        "variants": [{**row.to_json(), "bench": row.bench} for row in selection.rows],
        "not_measured": not_measured,
    }
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
