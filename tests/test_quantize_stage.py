"""The quantize stage inside builds: accuracy gate, calibration data, and the example models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import InputError
from edgepack.pipeline import build

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_validation_labels_gate_every_variant(spec_for, data_dir, tmp_path):
    import skops.io as sio

    rows = np.load(data_dir / "sample.npy")
    np.savez(tmp_path / "val.npz", X=rows, y=sio.load(data_dir / "classifier.skops").predict(rows))
    result = build(spec_for("classifier.skops", validation=tmp_path / "val.npz"))
    assert result.metric_basis == "accuracy on labels in val.npz"
    for row in result.variants:
        if row.verdict != "skipped":
            assert row.metric is not None and row.metric.name == "accuracy"
    manifest_rows = {v.name: v for v in result.manifest.variants}
    assert manifest_rows["fp32"].metric["value"] == 1.0
    assert result.manifest.quantization["calibration"]["data"] == "sample.npy (the sample)"
    assert isinstance(result.manifest.quantization["reduce_range"], bool)
    assert result.manifest.quantization["cpu_flags"]


def test_regressor_metric_is_rmse(spec_for, data_dir, tmp_path):
    import skops.io as sio

    rows = np.load(data_dir / "sample.npy")
    targets = sio.load(data_dir / "regressor.skops").predict(rows) + 0.1
    np.savez(tmp_path / "val.npz", X=rows, y=targets)
    result = build(spec_for("regressor.skops", validation=tmp_path / "val.npz", quantize="none"))
    assert result.variants[0].metric.name == "rmse"
    assert result.variants[0].metric.value == pytest.approx(0.1, abs=1e-3)


def test_csv_validation_with_label_column(spec_for, data_dir, tmp_path):
    rows = np.load(data_dir / "sample.npy")[:50]
    lines = ["a,b,c,d,e,f,label"] + [",".join(map(str, [*row, 1])) for row in rows]
    (tmp_path / "val.csv").write_text("\n".join(lines))
    result = build(spec_for("classifier.skops", validation=tmp_path / "val.csv", quantize="none"))
    assert result.variants[0].metric.name == "accuracy"
    with pytest.raises(InputError, match="no column named 'target'"):
        build(spec_for("classifier.skops", validation=tmp_path / "val.csv", label_column="target"))


@pytest.mark.parametrize("make, message", [
    (lambda rows: rows[:, :3], r"calibration data cal.npy: input 'X' takes \[\?, 6\], given \[300, 3\]"),
    (lambda rows: np.where(np.arange(rows.size).reshape(rows.shape) == 7, np.nan, rows), "NaN or infinite"),
])
def test_bad_calibration_data(spec_for, data_dir, tmp_path, make, message):
    np.save(tmp_path / "cal.npy", make(np.load(data_dir / "sample.npy")))
    with pytest.raises(InputError, match=message):
        build(spec_for("classifier.skops", calibration=tmp_path / "cal.npy"))


def test_bad_calibration_via_cli_is_one_line(data_dir, tmp_path):
    rows = np.load(data_dir / "sample.npy")
    rows[3, 2] = np.nan
    np.save(tmp_path / "cal.npy", rows)
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "-s", str(data_dir / "sample.npy"),
                                 "--calibration", str(tmp_path / "cal.npy"), "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "NaN" in result.stderr


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(data_dir, tmp_path, method):
    # Through the CLI with --json: the calibrators' progress prints must not reach stdout.
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "-s", str(data_dir / "sample.npy"),
                                 "--quantize", "int8-static", "--calibration-method", method, "--bench-time", "0.1",
                                 "--out", str(tmp_path), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    static = next(r for r in summary["variants"] if r["name"] == "int8-static")
    assert static["verdict"] in ("chosen", "dropped") and static["size_bytes"]


def test_weights_only_for_torch(spec_for, data_dir):
    with pytest.raises(InputError, match="--weights applies to PyTorch"):
        build(spec_for("classifier.skops", weights=data_dir / "sample.npy"))


@pytest.mark.parametrize("model, sample, validation", [
    ("digits_mlp.skops", "digits_sample.npy", "digits_validation.npz"),
    ("digits_mlp3x1024.skops", "digits_sample.npy", "digits_validation.npz"),
])
def test_examples_build_with_auto(model, sample, validation, tmp_path):
    result = runner.invoke(app, ["build", str(EXAMPLES / model), "--sample", str(EXAMPLES / sample),
                                 "--validation", str(EXAMPLES / validation), "--quantize", "auto",
                                 "--out", str(tmp_path), "--bench-time", "0.2", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parity"]["passed"]
    rows = {row["name"]: row for row in summary["variants"]}
    chosen = rows[summary["variant"]]
    # Only a variant faster with confidence and within the accuracy gate replaces fp32.
    if summary["variant"] != "fp32":
        assert chosen["speed"] == "faster" and chosen["ratio"]["high"] < 0.97
        assert chosen["metric"]["passed"] and chosen["gate"]["passed"]
    else:
        assert all(row["speed"] != "faster" or not row["gate"]["passed"] for row in summary["variants"][1:]
                   if row["verdict"] != "skipped")
    assert rows["fp16"]["verdict"] in ("dropped", "skipped") and rows["fp16"]["reason"]


def test_task_metrics():
    from edgepack.gates import judge_metric, label_metric
    from edgepack.runtime.comparison import Cosine

    logits = np.array([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    accuracy = label_metric(["logits"], ["logits"], np.array([1, 0, 0]), [logits])
    assert accuracy.name == "accuracy" and accuracy.reads == {"logits"}
    assert accuracy.score({"logits": logits}) == pytest.approx(2 / 3)
    rmse = label_metric(["y"], ["regression"], np.array([1.0, 4.0]), [np.array([[1.0], [2.0]])])
    assert rmse.name == "rmse" and not rmse.higher_is_better
    assert rmse.score({"y": np.array([[1.0], [2.0]])}) == pytest.approx(2 ** 0.5)
    labels = label_metric(["label", "probabilities"], ["label", "probabilities"], np.array([1, 1]),
                          [np.array([1, 2]), np.zeros((2, 3))])
    assert labels.reads == {"label", "probabilities"}
    assert labels.score({"label": np.array([1, 2]), "probabilities": np.zeros((2, 3))}) == 0.5
    cosine = Cosine()
    cosine.add(logits, logits * 3)
    assert cosine.mean == pytest.approx(1.0)
    orthogonal = Cosine()
    orthogonal.add(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert orthogonal.mean == pytest.approx(0.0)
    assert judge_metric(accuracy, 0.985, 1.0, 1.0, "b").passed is False
    assert judge_metric(accuracy, 0.995, 1.0, 1.0, "b").passed
    assert judge_metric(rmse, 1.005, 1.0, 1.0, "b").passed and not judge_metric(rmse, 1.02, 1.0, 1.0, "b").passed


def test_embedding_variants_are_gated_by_cosine(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.spec import BuildSpec

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(32, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "weight"], ["embedding"])], "embedder",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 64])],
                              [numpy_helper.from_array(weight, "weight")])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              tmp_path / "embedder.onnx")
    np.save(tmp_path / "rows.npy", rng.normal(size=(64, 32)).astype(np.float32))
    result = build(BuildSpec(model=tmp_path / "embedder.onnx", sample=tmp_path / "rows.npy", out=tmp_path,
                             quantize="int8-dynamic", bench_time_s=0.1, output_kind=("embedding=embedding",)))
    assert result.metric_basis == "vs fp32 on rows.npy: embedding (embedding: cosine)"
    assert result.manifest.outputs[0].kind == "embedding" and result.manifest.outputs[0].kind_from == "user"
    int8 = next(r for r in result.variants if r.name == "int8-dynamic")
    check = int8.gate.checks[0]
    assert check.rule == "cosine" and 0.99 < check.value <= 1.0 and "mean cosine" in check.basis
    # Undeclared, the same output is judged channel by channel, by the documented rule.
    plain = build(BuildSpec(model=tmp_path / "embedder.onnx", sample=tmp_path / "rows.npy", out=tmp_path / "plain",
                            quantize="int8-dynamic", bench_time_s=0.1))
    assert plain.manifest.outputs[0].kind == "unknown" and plain.manifest.outputs[0].kind_from == "rule"
    assert next(r for r in plain.variants if r.name == "int8-dynamic").gate.checks[0].rule == "channel-error"


def test_failing_static_variant_is_retried_without_its_sensitive_nodes(tmp_path):
    # With no accuracy loss allowed, static int8 of the 3x1024 MLP fails the gate; edgepack names
    # the nodes that hurt most and retries once with them in float.
    result = runner.invoke(app, ["build", str(EXAMPLES / "digits_mlp3x1024.skops"),
                                 "--sample", str(EXAMPLES / "digits_sample.npy"),
                                 "--validation", str(EXAMPLES / "digits_validation.npz"),
                                 "--quantize", "int8-static", "--max-accuracy-drop", "0",
                                 "--out", str(tmp_path), "--bench-time", "0.1", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    static = next(r for r in json.loads(result.stdout)["variants"] if r["name"] == "int8-static")
    said = static["reason"] if static["code"] == "inaccurate" else static["note"]
    assert "sensitive nodes" in said and " dB)" in said, static
    if static["code"] != "inaccurate":
        assert static["excluded_nodes"] and all(node in said for node in static["excluded_nodes"])


def test_unsupported_operator_is_one_line(tmp_path, data_dir):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Frobnicate", ["input"], ["output"], domain="com.example")], "odd",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              ir_version=9)
    onnx.save(model, tmp_path / "odd.onnx")
    result = runner.invoke(app, ["build", str(tmp_path / "odd.onnx"), "-s", str(data_dir / "sample.npy"),
                                 "--quiet", "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert result.stderr.count("\n") == 1 and "onnxruntime cannot load it" in result.stderr
