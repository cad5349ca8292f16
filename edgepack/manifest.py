"""The bundle manifest (contract): what the model is, where it came from, how it was checked.

Only deterministic facts go here, so that the same inputs give a byte-identical bundle; timings
live in the benchmark report written beside the bundle.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.errors import IntegrityError
from edgepack.runtime.bundle import SCHEMA_VERSION


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]  # open dimensions by name ("batch" for the rows axis)
    features: list[str] | None = None
    kind: str | None = None  # outputs: label, probabilities, boxes... (edgepack.output_kinds); schema 2
    kind_from: Literal["converter", "user", "rule"] | None = None  # who said so


class Source(_Strict):
    framework: str
    format: str
    file: str
    sha256: str
    estimator: str
    converter: str
    versions: dict[str, str]
    provenance: dict[str, str] = {}  # e.g. an MLflow model's run_id and model_uuid; schema 2


class Target(_Strict):
    profile: str
    kind: Literal["cloud", "edge"]
    arch: Literal["x86_64", "aarch64"]
    cpus: int
    memory_mb: int | None
    threads: int
    providers: list[str]
    onnxruntime: str  # oldest onnxruntime the bundle is made for
    opset: int
    ir_version: int


class VariantRecord(_Strict):
    name: str
    verdict: Literal["chosen", "dropped", "skipped"]
    reason: str
    code: str | None = None  # the reason as a code (edgepack.select.Reason); schema 2
    sha256: str | None = None
    size_bytes: int | None = None
    metric: dict[str, Any] | None = None  # task metric on labelled validation data, next to fp32's
    excluded_nodes: list[str] = []  # nodes kept in float after the accuracy gate named them
    accuracy: dict[str, Any] | None = None  # the gate: each output's check against fp32
    aliases: list[str] = []  # variants that came out byte-identical to this one; schema 2
    note: str = ""  # what making it took (an opset upgrade); schema 2


class FileEntry(_Strict):
    path: str
    sha256: str
    size: int


class WheelsRecord(_Strict):
    """The platform wheels an ``--arch`` bundle carries for devices without numpy and onnxruntime."""

    arch: Literal["x86_64", "aarch64"]
    python: str  # MAJOR.MINOR of the CPython the wheels are for
    platforms: list[str]  # the platform tags the wheels were chosen by
    versions: dict[str, str]  # package -> version
    files: list[str]  # bundle paths, wheels/<name>.whl


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str  # content hash of the model file
    model: str = "model.onnx"
    bench_input: str | None = "bench_input.npz"
    created_by: dict[str, str]
    target: Target
    source: Source
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variant: str
    variants: list[VariantRecord]
    quantization: dict[str, Any]
    parity: dict[str, Any]
    files: list[FileEntry]
    wheels: WheelsRecord | None = None  # optional in schema 1: absent from bundles without --arch

    def to_json(self) -> bytes:
        body = self.model_dump(mode="json")
        if body["wheels"] is None:
            del body["wheels"]  # bundles without wheels keep the bytes they had before the field existed
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(data: dict[str, Any], where: str) -> Manifest:
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise IntegrityError(f"{where}: manifest field {field}: {first['msg']}",
                             "rebuild the bundle with this edgepack version") from None
