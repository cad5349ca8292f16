"""Which ONNX opset and IR version an onnxruntime release can run."""

from __future__ import annotations

import onnx

from edgepack.errors import InputError

# onnxruntime release -> (ai.onnx opset, ai.onnx.ml opset, IR version), from onnxruntime's
# docs/Versioning.md. Releases newer than the last row run at least what it lists.
_ORT_SUPPORT: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, 14): (18, 3, 8),
    (1, 15): (19, 3, 9),
    (1, 16): (19, 3, 9),
    (1, 17): (20, 4, 9),
    (1, 18): (21, 4, 10),
    (1, 19): (21, 4, 10),
    (1, 20): (21, 4, 10),
    (1, 21): (22, 4, 10),
    (1, 22): (22, 5, 11),
}


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split(".")[:2])
    except ValueError:
        raise InputError(f"onnxruntime version {text!r} is not MAJOR.MINOR", "write e.g. \"1.17\"") from None
    return major, minor


def support_for(ort_version: str) -> tuple[int, int, int]:
    """(opset, ml opset, IR version) an onnxruntime release supports."""
    version = parse_version(ort_version)
    oldest = min(_ORT_SUPPORT)
    if version < oldest:
        raise InputError(
            f"onnxruntime {ort_version} is older than edgepack supports ({oldest[0]}.{oldest[1]})",
            "raise the profile's onnxruntime.version",
        )
    known = max(v for v in _ORT_SUPPORT if v <= version)
    return _ORT_SUPPORT[known]


def clamp_ir_version(model: onnx.ModelProto, max_ir: int) -> None:
    # Converters stamp the newest IR version the installed onnx knows; older runtimes refuse it
    # even when every operator is supported.
    model.ir_version = min(model.ir_version, max_ir)
