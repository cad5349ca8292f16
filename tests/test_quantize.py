"""Variant makers on real converted models."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgepack.convert.base import LoadOptions
from edgepack.convert.sklearn import SklearnConverter
from edgepack.quantize import make_variants
from edgepack.sample_data import read_sample


def _fp32(data_dir: Path, model: str, tmp_path: Path, reverse_imports: bool = False) -> Path:
    converter = SklearnConverter()
    proto = converter.convert(converter.load(data_dir / model, LoadOptions()), read_sample(data_dir / "sample.npy"),
                              {"": 17, "ai.onnx.ml": 3})
    if reverse_imports:
        imports = list(proto.opset_import)[::-1]
        del proto.opset_import[:]
        proto.opset_import.extend(imports)
    path = tmp_path / "model.fp32.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_int8_dynamic_quantizes_matmuls(data_dir, tmp_path):
    variants = make_variants(_fp32(data_dir, "classifier.skops", tmp_path), "int8-dynamic", tmp_path)
    assert [v.name for v in variants] == ["fp32", "int8-dynamic"]
    ops = {node.op_type for node in onnx.load(variants[1].path).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert variants[1].size_bytes < variants[0].size_bytes / 2


def test_variant_bytes_do_not_depend_on_import_order(data_dir, tmp_path):
    # onnxruntime's quantizer keeps (and sometimes reorders) opset_import; bundles must not care.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = make_variants(_fp32(data_dir, "classifier.skops", tmp_path / "a"), "int8-dynamic", tmp_path / "a")[1]
    flipped = make_variants(_fp32(data_dir, "classifier.skops", tmp_path / "b", reverse_imports=True),
                            "int8-dynamic", tmp_path / "b")[1]
    assert [o.domain for o in onnx.load(flipped.path).opset_import] == sorted(
        o.domain for o in onnx.load(flipped.path).opset_import)
    assert plain.path.read_bytes() == flipped.path.read_bytes()


def test_ml_only_graph_is_skipped_with_reason(data_dir, tmp_path):
    variants = make_variants(_fp32(data_dir, "regressor.skops", tmp_path), "auto", tmp_path)
    assert variants[1].path is None and "no quantizable operators" in variants[1].skipped
