"""Variant makers: the fp32 model and its quantized forms, each written to a file for checking."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import onnx

QuantizeMode = Literal["none", "int8-dynamic", "auto"]
VARIANTS_FOR_MODE: dict[str, tuple[str, ...]] = {
    "none": ("fp32",),
    "int8-dynamic": ("fp32", "int8-dynamic"),
    "auto": ("fp32", "int8-dynamic"),
}
_QUANTIZABLE_OPS = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU"}
_QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
                  "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path | None  # None when the variant could not be made
    skipped: str | None = None  # why it was not made

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path else 0


def make_variants(fp32_path: Path, mode: QuantizeMode, workdir: Path) -> list[Variant]:
    variants = [Variant("fp32", fp32_path)]
    for name in VARIANTS_FOR_MODE[mode][1:]:
        variants.append(_MAKERS[name](fp32_path, workdir / f"model.{name}.onnx"))
    return variants


def _int8_dynamic(source: Path, target: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Tree and linear models become ai.onnx.ml operators, which int8 does not touch (and the
    # quantizer refuses a graph without the default domain): say so instead of failing.
    if not {node.op_type for node in onnx.load(source, load_external_data=False).graph.node} & _QUANTIZABLE_OPS:
        return Variant("int8-dynamic", None, "no quantizable operators (MatMul, Gemm, Conv) in the model")
    try:
        with _quiet_quantizer():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    except Exception as err:  # the quantizer fails in many ways on graphs it does not expect
        return Variant("int8-dynamic", None, f"onnxruntime's quantizer failed: {type(err).__name__}: {err}")
    model = onnx.load(target, load_external_data=False)
    if not {node.op_type for node in model.graph.node} & _QUANTIZED_OPS:
        target.unlink()
        return Variant("int8-dynamic", None, "no quantizable operators (MatMul, Gemm, Conv) in the model")
    canonicalize(model)
    target.write_bytes(model.SerializeToString())
    return Variant("int8-dynamic", target)


def canonicalize(model: onnx.ModelProto) -> None:
    """Order what tools write in set order, so the same inputs give the same bytes in any process.

    onnxruntime's quantizer rebuilds ``opset_import`` from a set, whose order follows the
    per-process string hash seed.
    """
    imports = sorted(model.opset_import, key=lambda entry: entry.domain)
    del model.opset_import[:]
    model.opset_import.extend(imports)


_MAKERS = {"int8-dynamic": _int8_dynamic}


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # onnxruntime.quantization logs advice ("consider pre-processing") on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
