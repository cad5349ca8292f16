"""Bundles of ONNX graphs made in a test, packaged by edgepack's own code (manifest, payload with the
runtime, deterministic archive), for serving tests whose model no converter makes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import edgepack
from edgepack.manifest import Manifest, Source, Target, TensorSpec, VariantRecord
from edgepack.package.bundle import assemble, file_entries, payload_with_runtime
from edgepack.package.npz import npz_bytes

# onnx element types as the manifest writes them (numpy names, and "string").
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
           "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
           "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "string"}


def _tensors(values) -> list[TensorSpec]:
    """The manifest's inputs or outputs as onnxruntime sees the graph: symbolic dimensions by name."""
    return [TensorSpec(name=v.name, dtype=_DTYPES[v.type],
                       shape=[d if isinstance(d, int) else str(d) for d in v.shape]) for v in values]


def package(model: onnx.ModelProto, name: str, sample: dict[str, np.ndarray], out: Path) -> Path:
    """``out/NAME-VERSION.tar.gz`` of ``model``, warmed up on ``sample`` (its bench input), as
    ``edgepack build`` lays a bundle out (pipeline.build: payload_with_runtime, manifest, assemble)."""
    model_bytes = model.SerializeToString()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    files = payload_with_runtime({"model.onnx": model_bytes, "bench_input.npz": npz_bytes(sample)})
    manifest = Manifest(
        name=name, version=hashlib.sha256(model_bytes).hexdigest()[:12],
        created_by={"edgepack": edgepack.__version__},
        target=Target(profile="cloud-x86", kind="cloud", arch="x86_64", cpus=1, memory_mb=None, threads=1,
                      providers=["CPUExecutionProvider"], onnxruntime=ort.__version__,
                      opset=model.opset_import[0].version, ir_version=model.ir_version),
        source=Source(framework="onnx", format="onnx", file=f"{name}.onnx",
                      sha256=hashlib.sha256(model_bytes).hexdigest(), estimator="graph made in a test",
                      converter="none", versions={"onnx": onnx.__version__}),
        inputs=_tensors(session.get_inputs()), outputs=_tensors(session.get_outputs()),
        variant="fp32", variants=[VariantRecord(name="fp32", verdict="chosen", reason="the only variant")],
        quantization={"mode": "off"}, parity={}, files=file_entries(files))
    root, archive = assemble(files, manifest)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{root}.tar.gz"
    path.write_bytes(archive)
    return path
