"""The bundle's manifest and the benchmark report beside it, from what the build found."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import onnx

import edgepack
from edgepack.bench.profiles import Profile
from edgepack.convert.base import SourceModel
from edgepack.manifest import Manifest, Source, Target, TensorSpec, VariantRecord, WheelsRecord
from edgepack.output_kinds import ResolvedKind
from edgepack.package.bundle import file_entries
from edgepack.package.wheels import WheelSet
from edgepack.parity import ParityReport
from edgepack.quantize import QuantizeConfig
from edgepack.runtime.bench import cpu_info
from edgepack.samples import Examples
from edgepack.select import Selection
from edgepack.signature import Dim, Signature
from edgepack.spec import BuildSpec


@dataclass(frozen=True)
class BuildFacts:
    """What the manifest records of one build, gathered along the way."""

    spec: BuildSpec
    profile: Profile
    source: SourceModel
    signature: Signature
    kinds: tuple[ResolvedKind, ...]
    sample: Examples
    parity: ParityReport
    selection: Selection
    config: QuantizeConfig


def quantization_block(facts: BuildFacts) -> dict[str, Any]:
    config = facts.config
    cpu_model, cpu_flags = cpu_info()
    return {
        "mode": facts.spec.quantize, "metric_basis": facts.selection.metric_basis,
        "reduce_range": config.reduce_range, "cpu_model": cpu_model, "cpu_flags": cpu_flags,
        "calibration": {"data": config.calibration_origin, "method": config.method,
                        "rows": 0 if config.calibration is None else config.calibration.count},
    }


def build_manifest(facts: BuildFacts, model_bytes: bytes, files: dict[str, bytes], wheels: WheelSet | None,
                   quantization: dict[str, Any]) -> Manifest:
    spec, profile, source, selection = facts.spec, facts.profile, facts.source, facts.selection
    shipped = onnx.load_from_string(model_bytes)  # its opset can differ from fp32's (per-channel QDQ needs 13)
    features = list(facts.sample.feature_names) or None
    return Manifest(
        name=spec.bundle_name,
        version=hashlib.sha256(model_bytes).hexdigest()[:12],
        created_by={"edgepack": edgepack.__version__},
        target=Target(
            profile=profile.name, kind=profile.kind, arch=profile.arch, cpus=profile.cpus,
            memory_mb=profile.memory_mb, threads=profile.onnxruntime.threads,
            providers=list(profile.onnxruntime.providers), onnxruntime=profile.onnxruntime.version,
            opset=next((o.version for o in shipped.opset_import if o.domain in ("", "ai.onnx")), 0),
            ir_version=shipped.ir_version,
        ),
        source=Source(framework=source.framework, format=source.file_format, file=source.path.name,
                      sha256=source.sha256, estimator=source.estimator, converter=source.converter,
                      versions={**source.versions, "onnx": onnx.__version__}, provenance=source.provenance),
        inputs=[TensorSpec(name=t.name, dtype=t.dtype or "float32", shape=_shape(t.dims or ()),
                           features=features if len(facts.signature.inputs) == 1 else None)
                for t in facts.signature.inputs],
        outputs=[TensorSpec(name=t.name, dtype=t.dtype or "float32", shape=_shape(t.dims or ()),
                            kind=kind.kind, kind_from=kind.origin)
                 for t, kind in zip(facts.signature.outputs, facts.kinds)],
        variant=selection.chosen.name,
        # Speed figures vary run to run; the manifest keeps verdicts, the bench report keeps timings.
        variants=[VariantRecord(**record) for record in selection.records],
        quantization=quantization,
        parity={**facts.parity.to_dict(), "reference": source.framework, "data": facts.sample.origin},
        files=file_entries(files),
        wheels=None if wheels is None else WheelsRecord(
            arch=wheels.request.arch, python=wheels.request.python, platforms=list(wheels.request.platforms),
            versions=wheels.versions(), files=sorted(wheels.files())),
    )


def _shape(dims: tuple[Dim, ...]) -> list[int | str]:
    """Open dimensions by name, an open first one as "batch" (as manifests have always written it)."""
    return [d if isinstance(d, int) else "batch" if axis == 0 else str(d) for axis, d in enumerate(dims)]


def bench_report(manifest: Manifest, profile: Profile, selection: Selection, not_measured: dict[str, str]) -> bytes:
    report = {
        "model": manifest.name, "version": manifest.version, "profile": profile.name,
        "variant": manifest.variant, "chosen_bench": selection.chosen_bench,
        "variants": [{**row.to_json(), "bench": row.bench} for row in selection.rows],
        "not_measured": not_measured,
    }
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
