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
from typing import Any

import numpy as np
import onnx

from edgepack.bench.profiles import Profile, all_profiles, resolve_profile
from edgepack.budgets import check_bench, check_size
from edgepack.build_inputs import (PARITY_CHUNK, Inputs, calibration_for, conformed, describe_inputs, evaluation_for,
                                   fingerprint, output_kinds, read_inputs, select_options)
from edgepack.build_manifest import BuildFacts, bench_report, build_manifest, quantization_block
from edgepack.convert.base import LoadOptions, SourceModel, recorded_converter
from edgepack.convert.opsets import clamp_ir_version, support_for
from edgepack.convert.registry import converter_for
from edgepack.errors import ConversionError, EdgepackError, InputError, ParityError
from edgepack.gates import join_runs
from edgepack.lockfile import LockEntry, locked_entry, matching_entry, record
from edgepack.manifest import Manifest
from edgepack.output_kinds import ResolvedKind
from edgepack.package.bundle import assemble, payload_with_runtime
from edgepack.package.image import ImageBuild, ImageResult, bundle_files
from edgepack.package.npz import npz_bytes
from edgepack.package.wheels import WheelSet, fetch_wheels, request_for
from edgepack.parity import PARITY, ParityReport, compare
from edgepack.quantize import Variant, canonicalize, optimize_fp32
from edgepack.reporting import Reporter, SilentReporter
from edgepack.runtime.bundle import verify_archive
from edgepack.runtime.files import write_atomic
from edgepack.runtime.session import create_session, quiet_run
from edgepack.samples import Examples
from edgepack.select import Locked, Selection, VariantRow, choose_variant
from edgepack.signature import Signature, from_onnx
from edgepack.spec import BuildSpec

BENCH_ROWS = 16  # sample rows shipped in the bundle for the on-device benchmark...
BENCH_BYTES = 1 << 20  # ...fewer where 16 would be larger than this
# Tree ensembles in ONNX compare float32 thresholds; this share of samples may flip a split.
TREE_FLIP_RATE = 0.01


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
    lock: Path | None = None  # where the decision was recorded
    locked: bool = False  # the decision came from the lock file

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
            "outputs": [{"name": o.name, "kind": o.kind, "kind_from": o.kind_from} for o in self.manifest.outputs],
            "variants": [row.to_json() for row in self.variants],
            "metric_basis": self.metric_basis,
            "bench": {self.profile.name: self.bench} if self.bench else {},
            "not_measured": self.not_measured,
            "lock": None if self.lock is None else str(self.lock),
            "locked": self.locked,
            "next_steps": self.next_steps,
            **({"image": self.image.to_json()} if self.image else {}),
        }


@dataclass(frozen=True)
class _Converted:
    source: SourceModel
    signature: Signature
    inputs: Inputs
    kinds: tuple[ResolvedKind, ...]
    parity: ParityReport
    fp32: Variant
    opset: int  # fp32's, as converted


def build(spec: BuildSpec, reporter: Reporter | None = None, debug: bool = False) -> BuildResult:
    """``debug`` shows the output of the tools run underneath (pip) on stderr."""
    reporter = reporter or SilentReporter()
    profile = resolve_profile(spec.target)
    _check_out(spec.out)
    wheels = _platform_wheels(spec, profile, reporter, debug)  # first: a fetch failure should not wait for the rest
    image = _prepare_image(spec, profile, reporter, debug)  # likewise a missing base, platform or Python

    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        workdir = Path(tmp)
        converted = _convert(spec, profile, workdir, reporter)
        selection, facts, entry, reused = _select(spec, profile, converted, workdir, reporter)
        not_measured = {p.name: f"{p.arch} profile: benchmark it on the device"
                        for p in all_profiles() if p.kind == profile.kind and not p.runnable_here()}
        budgets = spec.budgets.merged_with(profile)
        check_bench(selection.chosen_bench, budgets, profile)

        reporter.start("package", f"Packaging {selection.chosen.name} for {profile.name}")
        model_bytes = selection.chosen_path.read_bytes()
        bench_feed = _bench_feed(converted.inputs.sample)
        files = payload_with_runtime({"model.onnx": model_bytes, "bench_input.npz": npz_bytes(bench_feed),
                                      **(wheels.files() if wheels else {})})
        quantization = entry.quantization if reused and entry else quantization_block(facts)
        manifest = build_manifest(facts, model_bytes, files, wheels, quantization)
        root, archive = assemble(files, manifest)
        check_size(len(archive), budgets)
        if image is not None:  # staged, and its size budget checked, before the bundle is written
            reporter.start("image", f"Writing the image of {root}")
            image.assemble(bundle_files(archive), manifest.name, manifest.version,
                           f"edgepack model server: {manifest.name} ({manifest.variant}) for {profile.name}")
        try:
            bundle = _write(spec.out / f"{root}.tar.gz", archive)
            report_path = _write(spec.out / f"{root}.bench.json",
                                 bench_report(manifest, profile, selection, not_measured))
            image_result = image.publish() if image is not None else None
        finally:
            if image is not None:
                image.discard()
        if image_result is not None:
            reporter.finish("image", f"{image_result.layout.name} ({image_result.digest[:19]}…), "
                                     f"{image_result.archive.name}")
        reporter.finish("package", f"{bundle} ({len(archive) / 1024:.0f} KiB)")
    lock = None
    if spec.lock is not None and not reused and entry is not None:
        lock = record(spec.lock, entry.model_copy(update={"quantization": manifest.quantization}))
    reporter.start("verify", "Verifying the bundle")
    verified = verify_archive(bundle)
    reporter.finish("verify", f"{len(verified.sums)} files, every checksum matches")
    return BuildResult(
        bundle=bundle, bundle_sha256=hashlib.sha256(archive).hexdigest(), bundle_bytes=len(archive),
        report=report_path, manifest=manifest, profile=profile, parity=converted.parity, variants=selection.rows,
        bench=selection.chosen_bench, metric_basis=selection.metric_basis, not_measured=not_measured,
        next_steps=[
            f"edgepack verify {bundle}",
            f"edgepack bench {bundle} --profile {profile.name}",
            *(image_result.next_steps if image_result else
              [f"tar xzf {bundle} && cd {root} && python -m runtime.bench   # on the device"]),
        ],
        image=image_result, lock=lock or (spec.lock if reused else None), locked=reused,
    )


def _convert(spec: BuildSpec, profile: Profile, workdir: Path, reporter: Reporter) -> _Converted:
    """Load, convert and prove parity: the fp32 model, its signature, kinds and conformed inputs."""
    reporter.start("load", f"Loading {spec.model.name}")
    converter = converter_for(spec.model)
    if spec.weights is not None and converter.name != "pytorch":
        raise InputError(f"--weights applies to PyTorch models given as module.py:factory, not to {converter.name}",
                         "drop --weights")
    source = converter.load(spec.model, LoadOptions(spec.allow_pickle, spec.trust, spec.weights))
    inputs = read_inputs(spec, source)
    reporter.finish("load", f"{source.estimator} ({source.file_format}); {describe_inputs(inputs.sample)}")

    opset, ml_opset, ir_version = support_for(profile.onnxruntime.version)
    opset = min(opset, onnx.defs.onnx_opset_version())
    reporter.start("convert", f"Converting to ONNX (opset {opset} at most)")
    model = converter.convert(source, inputs.sample, {"": opset, "ai.onnx.ml": ml_opset})
    source = replace(source, converter=recorded_converter(model) or source.converter)
    clamp_ir_version(model, ir_version)
    canonicalize(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ConversionError(f"the converted model is not valid ONNX: {str(err).splitlines()[0]}",
                              "report this with the model type; run with --debug") from None
    converted_path = workdir / "model.converted.onnx"
    converted_path.write_bytes(model.SerializeToString())
    fp32 = optimize_fp32(converted_path, workdir / "model.fp32.onnx")
    assert fp32.path is not None
    shipped = onnx.load(fp32.path, load_external_data=False)
    signature = from_onnx(_with_shapes(shipped))
    shipped_opset = next((o.version for o in shipped.opset_import if o.domain in ("", "ai.onnx")), opset)
    reporter.finish("convert", f"{source.converter or converter.name} → ONNX opset {shipped_opset}, IR "
                               f"{shipped.ir_version}" + (", graph-optimized" if fp32.path != converted_path else ""))
    inputs = conformed(inputs, signature)

    sample = inputs.sample
    reporter.start("parity", f"Checking parity on {sample.describe()}")
    original, onnx_runs = _parity_runs(source, fp32.path, sample)
    kinds = output_kinds(spec, signature, source, onnx_runs)
    tolerance = replace(PARITY, atol=spec.atol, rtol=spec.rtol,
                        max_flip_rate=TREE_FLIP_RATE if source.float32_thresholds else 0.0)
    names = signature.output_names
    parity = compare([join_runs([run[i] for run in original], sample.stacked) for i in range(len(names))],
                     [join_runs([run[i] for run in onnx_runs], sample.stacked) for i in range(len(names))],
                     names, [k.kind for k in kinds], tolerance, samples=sample.count)
    if not parity.passed:
        raise ParityError(
            f"the ONNX model differs from the original over {parity.samples} {sample.unit}s "
            f"(atol {spec.atol:g}, rtol {spec.rtol:g}): " + "; ".join(parity.failures()),
            "if these differences are acceptable, loosen --atol/--rtol; otherwise report the model type",
        )
    reporter.finish("parity", "; ".join(d.describe() for d in parity.outputs))
    return _Converted(source, signature, inputs, kinds, parity, fp32, shipped_opset)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred output shapes where the exporter left them out."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a nicety here: the declared shapes stand
        return model


def _parity_runs(source: SourceModel, fp32: Path, sample: Examples) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    session, _ = create_session(fp32, threads=1)
    original, converted = [], []
    for feed in sample.chunks(PARITY_CHUNK):
        try:
            expected = [np.asarray(value) for value in source.predict(feed)]
        except Exception as err:  # the original can refuse generated or odd inputs in any way
            raise InputError(f"the original {source.estimator} cannot run on {sample.describe()}: "
                             f"{type(err).__name__}: {' '.join(str(err).split())[:500]}",
                             "give a sample it takes (--sample), or ranges for generated inputs "
                             "(--input-range NAME=LOW:HIGH)") from err
        converted.append(session.run(None, feed, quiet_run()))
        original.append(expected)
    if original and len(original[0]) != len(converted[0]):
        raise ConversionError(f"the original gives {len(original[0])} outputs and the ONNX model "
                              f"{len(converted[0])}", "report this with the model type")
    return original, converted


def _select(spec: BuildSpec, profile: Profile, converted: _Converted, workdir: Path,
            reporter: Reporter) -> tuple[Selection, BuildFacts, LockEntry | None, bool]:
    """The variant stage: gated on the validation data (else the sample), timed on sample rows.

    The decision comes from the lock file with ``--locked`` (which must hold one for these inputs),
    and also by default when it holds one for these very inputs (``--retime`` measures again):
    a rebuild then repeats the recorded decision instead of letting timing noise make a new one.
    Returns the selection, the facts, the lock entry to record (or reused) and whether it was reused.
    """
    signature, inputs = converted.signature, converted.inputs
    config = calibration_for(spec, signature, inputs.sample, profile)
    kinds = tuple(k.kind for k in converted.kinds)
    names = signature.output_names
    evaluation = evaluation_for(spec, inputs, names, kinds, _first_outputs(converted.fp32.path, inputs))  # type: ignore[arg-type]
    decided_on = fingerprint(spec, converted.source, profile, config, evaluation, converted.kinds, converted.opset)
    entry: LockEntry | None = None
    if spec.locked:
        assert spec.lock is not None
        entry = locked_entry(spec.lock, spec.bundle_name, profile.name, decided_on)
    elif spec.lock is not None and spec.variant is None and not spec.retime:
        entry = matching_entry(spec.lock, spec.bundle_name, profile.name, decided_on)
    if entry is not None:
        reporter.start("lock", f"Reading the decision in {spec.lock}")
        reporter.finish("lock", f"{entry.variant}, recorded for these inputs: made and gated again, not timed"
                                + ("" if spec.locked else " (--retime decides again)"))
    budgets = spec.budgets.merged_with(profile)

    def select(entry: LockEntry | None) -> Selection:
        locked, chosen_config = None, config
        if entry is not None:
            locked = Locked(entry.variant, entry.sha256, tuple(entry.excluded_nodes), entry.variants)
            chosen_config = replace(config, reduce_range=bool(entry.quantization.get("reduce_range", config.reduce_range)))
        time_chosen = entry is None or bool(budgets.max_p99_ms or budgets.max_memory_mb)
        return choose_variant(converted.fp32, names, kinds, [o.dims for o in signature.outputs], evaluation,
                              _bench_feed(inputs.sample), profile,
                              select_options(spec, time_chosen), chosen_config, workdir, reporter, locked)

    try:
        selection = select(entry)
    except EdgepackError as err:
        if spec.locked or entry is None:
            raise
        # A recorded decision that no longer holds (other bytes from a changed tool): decide again.
        reporter.start("lock", f"The decision in {spec.lock} no longer holds ({err.message})")
        reporter.finish("lock", "deciding again")
        entry = None
        selection = select(None)
    reused = entry is not None
    facts = BuildFacts(spec, profile, converted.source, signature, converted.kinds, inputs.sample, converted.parity,
                       selection, config)
    if entry is None:
        entry = LockEntry(name=spec.bundle_name, profile=profile.name, fingerprint=decided_on,
                          variant=selection.chosen.name, sha256=selection.chosen.sha256 or "",
                          excluded_nodes=list(selection.chosen.excluded_nodes), variants=selection.records,
                          quantization={}, evidence={row.name: row.speed_text for row in selection.rows
                                                     if row.speed_text})
    return selection, facts, entry, reused


def _bench_feed(sample: Examples) -> dict[str, np.ndarray]:
    """What the variants are timed on, and what the bundle ships for its benchmark and warm-up."""
    return sample.bench_feed(BENCH_ROWS, BENCH_BYTES)


def _first_outputs(model: Path, inputs: Inputs) -> list[np.ndarray]:
    """fp32's outputs on the first run of the evaluation data: what a task metric can read."""
    examples = inputs.validation.examples if inputs.validation is not None else inputs.sample
    session, _ = create_session(model, threads=1)
    return session.run(None, next(examples.chunks(PARITY_CHUNK)), quiet_run())


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
    reporter = reporter or SilentReporter()
    if spec.model.suffix.lower() != ".onnx":
        raise InputError(f"{spec.model.name}: `edgepack quantize` takes an ONNX file",
                         "convert other models with `edgepack build`")
    profile = resolve_profile(spec.target)
    _check_out(spec.out)
    with tempfile.TemporaryDirectory(prefix="edgepack-quantize-") as tmp:
        workdir = Path(tmp)
        converted = _convert(spec, profile, workdir, reporter)
        selection, facts, _, _ = _select(spec, profile, converted, workdir, reporter)
        stem = spec.bundle_name
        model = _write(spec.out / f"{stem}.{selection.chosen.name}.onnx", selection.chosen_path.read_bytes())
        table = {"model": str(model), "source": spec.model.name, "profile": profile.name,
                 "variant": selection.chosen.name, "metric_basis": selection.metric_basis,
                 "reduce_range": facts.config.reduce_range, "calibration": facts.config.calibration_origin,
                 "variants": [{**row.to_json(), "bench": row.bench} for row in selection.rows]}
        report = _write(spec.out / f"{stem}.quantize.json", (json.dumps(table, indent=2, sort_keys=True) + "\n").encode())
    return QuantizeResult(model, report, profile, selection)


def _check_out(out: Path) -> None:
    """A bad --out is said before any work, not after the whole pipeline has run."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"--out {out}: {probe} is a file, not a folder", "choose a folder for --out")
    import os

    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {probe} is not writable", "choose a writable folder for --out")


def _write(path: Path, data: bytes) -> Path:
    try:
        return write_atomic(path, data)
    except OSError as err:
        raise InputError(f"cannot write {path} ({err.strerror})", "check --out: free space and permissions") from None


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

