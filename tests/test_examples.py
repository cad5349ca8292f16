"""The real architectures among the examples build as the README says: a detector head of boxes and
scores judged by its own recall metric, a recommender with float and int64 inputs and two outputs,
and MobileNetV3-Small with dynamic dims."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from edgepack.cli import app

pytest.importorskip("torch", reason="the torch extra is not installed: pip install -e '.[torch]'")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def _bundle_file(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as archive:
        return archive.extractfile(next(m for m in archive.getmembers() if m.name.endswith(f"/{name}"))).read()


def _build(*arguments: str) -> dict:
    result = runner.invoke(app, ["build", *arguments, "--bench-time", "0.2", "--no-lock", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_recommender_takes_float_features_and_int64_ids(tmp_path):
    summary = _build(f"{EXAMPLES / 'recommender.py'}:make_model", "--weights", str(EXAMPLES / "recommender.pt"),
                     "--sample", str(EXAMPLES / "recommender_sample.npz"), "--output-kind", "profile=embedding",
                     "--variant", "int8-dynamic", "--out", str(tmp_path / "dist"))
    assert [(o["name"], o["kind"], o["kind_from"]) for o in summary["outputs"]] == [
        ("click", "unknown", "rule"), ("profile", "embedding", "user")]
    manifest = json.loads(_bundle_file(Path(summary["bundle"]), "manifest.json"))
    assert [(t["name"], t["dtype"]) for t in manifest["inputs"]] == [("dense", "float32"), ("items", "int64")]
    model = onnx.load_from_string(_bundle_file(Path(summary["bundle"]), "model.onnx"))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    row = next(v for v in summary["variants"] if v["name"] == "int8-dynamic")
    assert [(o["output"], o["rule"]) for o in row["gate"]["outputs"]] == [("click", "channel-error"),
                                                                          ("profile", "cosine")]


@pytest.fixture(scope="module")
def detector_data(tmp_path_factory) -> tuple[Path, Path]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import shapes
    finally:
        sys.path.remove(str(EXAMPLES))
    return shapes.write_data(tmp_path_factory.mktemp("detector"))


def test_the_tiny_detector_is_judged_by_its_recall(detector_data, tmp_path):
    sample, validation = detector_data
    summary = _build(f"{EXAMPLES / 'tiny_detector.py'}:make_model", "--weights", str(EXAMPLES / "tiny_detector.pt"),
                     "--sample", str(sample), "--validation", str(validation),
                     "--metric", f"{EXAMPLES / 'detector_metric.py'}:recall_at_iou", "--quantize", "int8-static",
                     "--out", str(tmp_path / "dist"))
    assert "recall_at_iou" in summary["metric_basis"]
    rows = {v["name"]: v for v in summary["variants"]}
    assert rows["fp32"]["metric"]["value"] > 0.7  # the trained weights find most shapes
    static = rows["int8-static"]
    # Its channel errors stay small, yet the recall drops: the task metric is what judges it.
    assert static["code"] == "inaccurate" and static["metric"]["value"] < rows["fp32"]["metric"]["value"]
    assert "recall_at_iou" in static["reason"]
    assert summary["variant"] == "fp32"


def test_mobilenet_v3_small_converts_with_dynamic_dims(tmp_path):
    weights = tmp_path / "mobilenet.pt"
    subprocess.run([sys.executable, str(EXAMPLES / "mobilenet_v3_small.py"), str(weights)], check=True)
    summary = _build(f"{EXAMPLES / 'mobilenet_v3_small.py'}:make_model", "--weights", str(weights),
                     "--input-shape", "input=2x3x224x224", "--quantize", "none", "--out", str(tmp_path / "dist"))
    assert summary["parity"]["passed"]
    model = onnx.load_from_string(_bundle_file(Path(summary["bundle"]), "model.onnx"))
    assert {node.op_type for node in model.graph.node} >= {"Conv", "HardSwish", "GlobalAveragePool"} or \
        {node.op_type for node in model.graph.node} >= {"Conv", "HardSigmoid"}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # rows stay open
    assert model.ByteSize() > 9_000_000  # the full network, ~2.5 M parameters
    assert np.prod([d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]]) == 1000
