"""Variant makers on real converted models."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgepack.convert.base import LoadOptions
from edgepack.convert.sklearn import SklearnConverter
from edgepack.quantize import VARIANTS_FOR_MODE, Variant, make_variants
from edgepack.samples import read_sample


def _fp32(data_dir: Path, model: str, tmp_path: Path, reverse_imports: bool = False) -> Path:
    converter = SklearnConverter()
    source = converter.load(data_dir / model, LoadOptions())
    proto = converter.convert(source, read_sample(data_dir / "sample.npy", source.inputs), {"": 17, "ai.onnx.ml": 3})
    if reverse_imports:
        imports = list(proto.opset_import)[::-1]
        del proto.opset_import[:]
        proto.opset_import.extend(imports)
    path = tmp_path / "model.fp32.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def _variants(fp32: Path, mode: str, workdir: Path) -> list[Variant]:
    return make_variants(Variant("fp32", fp32), list(VARIANTS_FOR_MODE[mode]), workdir)


def test_int8_dynamic_quantizes_matmuls(data_dir, tmp_path):
    variants = _variants(_fp32(data_dir, "classifier.skops", tmp_path), "int8-dynamic", tmp_path)
    assert [v.name for v in variants] == ["fp32", "int8-dynamic"]
    ops = {node.op_type for node in onnx.load(variants[1].path).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert variants[1].size_bytes < variants[0].size_bytes / 2


def test_variant_bytes_do_not_depend_on_import_order(data_dir, tmp_path):
    # onnxruntime's quantizer keeps (and sometimes reorders) opset_import; bundles must not care.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = _variants(_fp32(data_dir, "classifier.skops", tmp_path / "a"), "int8-dynamic", tmp_path / "a")[1]
    flipped = _variants(_fp32(data_dir, "classifier.skops", tmp_path / "b", reverse_imports=True),
                        "int8-dynamic", tmp_path / "b")[1]
    assert [o.domain for o in onnx.load(flipped.path).opset_import] == sorted(
        o.domain for o in onnx.load(flipped.path).opset_import)
    assert plain.path.read_bytes() == flipped.path.read_bytes()


def test_ml_only_graph_is_not_applicable(data_dir, tmp_path):
    variants = {v.name: v for v in _variants(_fp32(data_dir, "regressor.skops", tmp_path), "auto", tmp_path)}
    int8 = variants["int8-dynamic"]
    assert int8.path is None and int8.not_applicable
    assert int8.skipped.startswith("not applicable: no quantizable operators")
