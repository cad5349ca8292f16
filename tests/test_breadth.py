"""scikit-learn breadth and ONNX files as input: each through a real build with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import skops.io as sio

from edgepack.errors import InputError, UnsupportedHere
from edgepack.pipeline import build

TREE_TYPES = ("sklearn.tree._tree.Tree",)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import Lasso, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from sklearn.svm import SVR, LinearSVC

    root = tmp_path_factory.mktemp("breadth")
    rng = np.random.default_rng(0)
    numeric, categories = rng.normal(size=(300, 4)), rng.integers(0, 3, size=(300, 2)).astype(float)
    rows = np.hstack([numeric, categories]).astype(np.float32)
    classes = ((numeric[:, 0] + categories[:, 0]) > 1).astype(int)
    target = numeric @ [1.0, 2.0, 3.0, 4.0] + categories[:, 1]
    np.save(root / "rows.npy", rows)
    models = {
        "column_transformer": (make_pipeline(ColumnTransformer([
            ("numeric", StandardScaler(), [0, 1, 2, 3]),
            ("categorical", OneHotEncoder(handle_unknown="ignore"), [4, 5])]),
            LogisticRegression(max_iter=500)), classes),
        "gradient_boosting": (GradientBoostingClassifier(n_estimators=30, random_state=0), classes),
        "random_forest": (RandomForestRegressor(n_estimators=10, random_state=0), target),
        "linear_svc": (LinearSVC(), classes),
        "svr": (SVR(), target),
        "lasso": (Lasso(alpha=0.01), target),
    }
    for name, (model, labels) in models.items():
        sio.dump(model.fit(rows, labels), root / f"{name}.skops")
    return root


@pytest.mark.parametrize("name, trees", [
    ("column_transformer", False), ("gradient_boosting", True), ("random_forest", True),
    ("linear_svc", False), ("svr", False), ("lasso", False),
])
def test_sklearn_breadth_parity(tabular, tmp_path, name, trees):
    result = build_spec(tabular / f"{name}.skops", tabular / "rows.npy", tmp_path, trust=TREE_TYPES if trees else ())
    assert result.parity.passed
    assert all(diff.flipped_samples <= 3 for diff in result.parity.outputs)  # at most 1% of 300
    assert result.manifest.source.estimator.split("(")[0] in {
        "Pipeline", "GradientBoostingClassifier", "RandomForestRegressor", "LinearSVC", "SVR", "Lasso"}


def build_spec(model: Path, sample: Path, out: Path, **extra):
    from edgepack.spec import BuildSpec

    return build(BuildSpec(model=model, sample=sample, out=out, quantize="none", bench_time_s=0.1, **extra))


def test_tree_models_build_without_trust(tabular, tmp_path):
    """skops alone refuses sklearn.tree._tree.Tree; edgepack's allowlist admits it after checking each
    tree (edgepack/convert/skops_trust.py), so a forest builds with no --trust."""
    result = build_spec(tabular / "random_forest.skops", tabular / "rows.npy", tmp_path)
    assert result.parity.passed and result.manifest.source.estimator == "RandomForestRegressor"


@pytest.fixture(scope="module")
def onnx_model(data_dir, tmp_path_factory):
    """The classifier's ONNX form, as another tool would hand it over."""
    from edgepack.convert.base import LoadOptions
    from edgepack.convert.sklearn import SklearnConverter
    from edgepack.samples import read_sample

    converter = SklearnConverter()
    source = converter.load(data_dir / "classifier.skops", LoadOptions())
    proto = converter.convert(source, read_sample(data_dir / "sample.npy", source.inputs), {"": 17, "ai.onnx.ml": 3})
    path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_onnx_input_builds_with_parity_against_the_file(onnx_model, data_dir, tmp_path):
    result = build_spec(onnx_model, data_dir / "sample.npy", tmp_path)
    assert result.manifest.source.framework == "onnx"
    assert "opset 17" in result.manifest.source.estimator
    assert result.parity.passed and result.parity.outputs[1].max_abs < 1e-5
    assert result.manifest.target.opset == 17  # what the shipped model declares: an ONNX file keeps its opset


def test_onnx_newer_than_target_is_refused(onnx_model, data_dir, tmp_path):
    model = onnx.load(onnx_model)
    next(o for o in model.opset_import if o.domain == "").version = 21
    newer = tmp_path / "newer.onnx"
    newer.write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedHere, match="uses opset 21; the target's onnxruntime runs up to opset 20"):
        build_spec(newer, data_dir / "sample.npy", tmp_path, target="edge-1core")


def test_old_onnx_opset_is_upgraded(data_dir, tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["hidden"]), helper.make_node("Neg", ["hidden"], ["output"])], "old",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6])])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3), path)
    result = build_spec(path, data_dir / "sample.npy", tmp_path)
    assert result.manifest.source.converter == "onnx (upgraded from opset 6 to 20)"
    assert result.parity.passed


@pytest.mark.parametrize("content, message", [
    (b"not a protobuf at all", "not a readable ONNX file"),
])
def test_bad_onnx_files(tmp_path, data_dir, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        build_spec(path, data_dir / "sample.npy", tmp_path)


def test_quantize_command_writes_model_and_table(onnx_model, data_dir, tmp_path):
    from typer.testing import CliRunner

    from edgepack.cli import app

    labels = sio.load(data_dir / "classifier.skops").predict(np.load(data_dir / "sample.npy"))
    np.savez(tmp_path / "validation.npz", X=np.load(data_dir / "sample.npy"), y=labels)
    result = CliRunner().invoke(app, ["quantize", str(onnx_model), "--sample", str(data_dir / "sample.npy"),
                                      "--validation", str(tmp_path / "validation.npz"), "--out", str(tmp_path / "q"),
                                      "--bench-time", "0.1", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    chosen = Path(summary["model"])
    assert chosen.is_file() and chosen.name == f"classifier.{summary['variant']}.onnx"
    names = [row["name"] for row in summary["variants"]]
    assert names == ["fp32", "int8-dynamic", "int8-dynamic-per-channel", "int8-static", "int8-static-per-channel",
                     "fp16"]
    assert summary["metric_basis"] == "accuracy on labels in validation.npz"
    fp32 = summary["variants"][0]
    assert fp32["metric"]["name"] == "accuracy" and fp32["metric"]["value"] == 1.0
    for row in summary["variants"]:
        assert row["verdict"] in ("chosen", "dropped", "skipped") and row["reason"]
        if row["verdict"] != "skipped":
            assert row["p50_ms"] > 0
    table = json.loads(Path(summary["report"]).read_text())
    assert table["variant"] == summary["variant"]
    refused = CliRunner().invoke(app, ["quantize", str(data_dir / "classifier.skops"), "--sample",
                                       str(data_dir / "sample.npy")])
    assert refused.exit_code == 3 and "takes an ONNX file" in refused.stderr
