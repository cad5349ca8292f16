"""Any ONNX graph in: several inputs of several dtypes (a scalar among them), state in and out, and
outputs whose channels differ in scale, each gated on its own; samples that do not fit are refused
with the input's expected shape."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.pipeline import build
from edgepack.runtime.session import make_feed
from edgepack.spec import BuildSpec

runner = CliRunner()
FEATURES, TOKENS, VOCAB, STATE = 32, 4, 50, 8


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _streaming_model(path: Path) -> Path:
    """What a stateful audio or text model looks like from outside: float frames [N, 32], int32
    token ids [N, 4], a state [2, N, 8] in and out, and an int64 sample-rate scalar.

    ``score = sigmoid(audio @ W + mean(E[ids]) + sr / 16000)``, ``stateN = tanh(state * 0.5 + mean(audio))``.
    """
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(FEATURES, 16)).astype(np.float32) / 4, "W"),
               numpy_helper.from_array(rng.normal(size=(VOCAB, 16)).astype(np.float32), "E"),
               numpy_helper.from_array(np.array(16000.0, dtype=np.float32), "rate"),
               numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")]
    nodes = [
        helper.make_node("MatMul", ["audio", "W"], ["frame"]),
        helper.make_node("Gather", ["E", "ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded"], ["tokens"], axes=[1], keepdims=0),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "rate"], ["sr_scaled"]),
        helper.make_node("Add", ["frame", "tokens"], ["summed"]),
        helper.make_node("Add", ["summed", "sr_scaled"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
        helper.make_node("Mul", ["state", "half"], ["halved"]),
        helper.make_node("ReduceMean", ["audio"], ["level"], keepdims=0),
        helper.make_node("Add", ["halved", "level"], ["moved"]),
        helper.make_node("Tanh", ["moved"], ["stateN"]),
    ]
    graph = helper.make_graph(nodes, "streaming", [
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", FEATURES]),
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", TOKENS]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", STATE]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ], [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 16]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", STATE])], weights)
    return _save(graph, path)


def _streaming_feed(rows: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"audio": rng.normal(size=(rows, FEATURES)).astype(np.float32),
            "ids": rng.integers(0, VOCAB, size=(rows, TOKENS)).astype(np.int32),
            "state": rng.normal(size=(2, rows, STATE)).astype(np.float32),
            "sr": np.array(16000, dtype=np.int64)}


def _manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/manifest.json"))
        return json.loads(archive.extractfile(member).read())


def _bundle_model(bundle: Path) -> onnx.ModelProto:
    with tarfile.open(bundle) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/model.onnx"))
        return onnx.load_from_string(archive.extractfile(member).read())


@pytest.fixture(scope="module")
def streaming(tmp_path_factory) -> Path:
    return _streaming_model(tmp_path_factory.mktemp("graphs") / "streaming.onnx")


def test_many_inputs_of_many_dtypes_build_from_an_npz_keyed_by_name(streaming, tmp_path):
    np.savez(tmp_path / "sample.npz", **_streaming_feed(24))
    result = build(BuildSpec(model=streaming, sample=tmp_path / "sample.npz", out=tmp_path / "dist",
                             quantize="int8-dynamic", variant="int8-dynamic", bench_time_s=0.2))
    manifest = _manifest(result.bundle)
    assert manifest["variant"] == "int8-dynamic"
    assert [(t["name"], t["dtype"]) for t in manifest["inputs"]] == [
        ("audio", "float32"), ("ids", "int32"), ("state", "float32"), ("sr", "int64")]
    assert manifest["inputs"][3]["shape"] == []
    kinds = {o["name"]: (o["kind"], o["kind_from"]) for o in manifest["outputs"]}
    assert kinds == {"score": ("unknown", "rule"), "stateN": ("state", "rule")}
    # Parity ran per output; the int8 variant was gated on both.
    assert {o["name"] for o in result.parity.to_dict()["outputs"]} == {"score", "stateN"}
    int8 = next(row for row in result.variants if row.name == "int8-dynamic")
    assert [c.output for c in int8.gate.checks] == ["score", "stateN"]
    # Only float compute was quantized: the integer inputs pass through as they were.
    quantized = _bundle_model(result.bundle)
    assert [(i.name, i.type.tensor_type.elem_type) for i in quantized.graph.input] == [
        ("audio", TensorProto.FLOAT), ("ids", TensorProto.INT32), ("state", TensorProto.FLOAT), ("sr", TensorProto.INT64)]
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in quantized.graph.node)


def test_generated_inputs_take_a_shape_and_range_per_input(streaming, tmp_path):
    result = runner.invoke(app, ["build", str(streaming), "--out", str(tmp_path / "dist"), "--quantize", "none",
                                 "--input-shape", "audio=3x32", "--input-shape", "ids=3x4",
                                 "--input-shape", "state=2x3x8", "--input-range", f"ids=0:{VOCAB - 1}",
                                 "--input-range", "sr=16000:16000", "--bench-time", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    bundle = Path(json.loads(result.stdout)["bundle"])
    assert _manifest(bundle)["inputs"][1]["dtype"] == "int32"


def test_an_id_outside_its_range_is_caught_by_the_range(streaming, tmp_path):
    """Without a range, generated ids are 0/1 (safe for any table); a range beyond the table ends
    in onnxruntime's refusal, reported as a conversion problem of the sample, not a crash."""
    result = runner.invoke(app, ["build", str(streaming), "--out", str(tmp_path / "dist"), "--quantize", "none",
                                 "--input-shape", "audio=2x32", "--input-shape", "ids=2x4",
                                 "--input-shape", "state=2x2x8", "--input-range", "ids=1000:2000",
                                 "--bench-time", "0.2"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert "ids" in result.output or "indices" in result.output


@pytest.mark.parametrize("arrays, words", [
    ({"audio": np.zeros((4, 31), np.float32)}, ["audio", "[batch, 32]", "[4, 31]"]),
    ({"audio": np.zeros((4, 32, 1), np.float32)}, ["audio", "2 dimensions", "[4, 32, 1]"]),
    ({"ids": np.zeros((4, 4), np.float32) + 0.5}, ["ids", "int32"]),
    ({"nothere": np.zeros((4, 32), np.float32)}, ["nothere", "audio"]),
])
def test_a_sample_that_does_not_fit_is_exit_3_naming_the_input(streaming, tmp_path, arrays, words):
    feed = {**_streaming_feed(4), **arrays}
    if "nothere" in arrays:
        feed.pop("audio")
    np.savez(tmp_path / "sample.npz", **feed)
    result = runner.invoke(app, ["build", str(streaming), "--sample", str(tmp_path / "sample.npz"),
                                 "--out", str(tmp_path / "dist")])
    assert result.exit_code == 3, result.output
    assert len(result.output.strip().splitlines()) <= 2, result.output
    for word in words:
        assert word in result.output
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def _image_model(path: Path) -> Path:
    """A convolution over NCHW images [N, 3, 16, 16] → [N, 4]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph([
        helper.make_node("Conv", ["image", "K"], ["mapped"], kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["mapped"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ], "images", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "K")])
    return _save(graph, path)


def test_a_channels_last_sample_gets_the_hint(tmp_path):
    model = _image_model(tmp_path / "images.onnx")
    np.save(tmp_path / "nhwc.npy", np.zeros((2, 16, 16, 3), np.float32))
    result = runner.invoke(app, ["build", str(model), "--sample", str(tmp_path / "nhwc.npy"),
                                 "--out", str(tmp_path / "dist")])
    assert result.exit_code == 3, result.output
    assert "image" in result.output and "[N, 3, 16, 16]" in result.output and "[2, 16, 16, 3]" in result.output
    assert "channels-last" in result.output and "transpose" in result.output.lower()


def _boxes_and_scores_model(path: Path) -> Path:
    """A detector head's shape: [N, 6, anchors] = 4 box coordinates (pixels, spread ~100) and 2 class
    scores (spread ~0.01) from one MatMul. Per-tensor int8 weights take their scale from the box
    weights, so the score weights all round to zero; per-channel int8 keeps them."""
    rng = np.random.default_rng(0)
    weights = np.concatenate([rng.normal(scale=30.0, size=(16, 4)), rng.normal(scale=0.01, size=(16, 2))], axis=1)
    graph = helper.make_graph([
        helper.make_node("MatMul", ["features", "W"], ["per_anchor"]),
        helper.make_node("Transpose", ["per_anchor"], ["detections"], perm=[0, 2, 1]),
    ], "head", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "anchors", 16])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", 6, "anchors"])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")])
    return _save(graph, path)


def test_a_collapsed_small_channel_drops_the_variant_whatever_the_whole_tensor_says(tmp_path):
    model = _boxes_and_scores_model(tmp_path / "head.onnx")
    np.save(tmp_path / "features.npy", np.random.default_rng(2).normal(size=(8, 40, 16)).astype(np.float32))
    result = build(BuildSpec(model=model, sample=tmp_path / "features.npy", out=tmp_path / "dist",
                             quantize="int8-dynamic", bench_time_s=0.2))
    rows = {row.name: row for row in result.variants}
    per_tensor = rows["int8-dynamic"]
    assert per_tensor.code.value == "inaccurate"
    check = per_tensor.gate.checks[0]
    assert check.rule == "channel-error" and check.value > 0.5
    assert "channel 4" in check.basis or "channel 5" in check.basis, check.basis

    # One RMSE over the whole tensor, relative to its spread, would have passed the same quantization.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    feed = {"features": np.load(tmp_path / "features.npy")}
    reference = ort.InferenceSession(str(model)).run(None, feed)[0]
    candidate = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, feed)[0]
    assert np.ptp(candidate[:, 4:]) < np.ptp(reference[:, 4:]) / 10  # the scores collapsed
    whole = np.sqrt(np.mean((candidate - reference) ** 2)) / reference.std()
    assert whole < 0.05

    per_channel = rows.get("int8-dynamic-per-channel")
    if per_channel is not None:  # the per-channel twin keeps the scores
        assert per_channel.code.value != "inaccurate", per_channel.reason
    manifest = _manifest(result.bundle)
    record = next(v for v in manifest["variants"] if v["name"] == "int8-dynamic")
    assert record["code"] == "inaccurate" and "channel" in record["reason"]
    assert manifest["variant"] != "int8-dynamic"


def test_the_output_kind_flag_picks_the_gate(tmp_path):
    model = _boxes_and_scores_model(tmp_path / "head.onnx")
    np.save(tmp_path / "features.npy", np.random.default_rng(2).normal(size=(8, 40, 16)).astype(np.float32))
    result = build(BuildSpec(model=model, sample=tmp_path / "features.npy", out=tmp_path / "dist",
                             quantize="none", output_kind=("detections=boxes",), bench_time_s=0.2))
    output = _manifest(result.bundle)["outputs"][0]
    assert (output["kind"], output["kind_from"]) == ("boxes", "user")
    bad = runner.invoke(app, ["build", str(model), "--sample", str(tmp_path / "features.npy"),
                              "--out", str(tmp_path / "dist2"), "--output-kind", "detections=bananas"])
    assert bad.exit_code == 3 and "bananas" in bad.output
    unknown = runner.invoke(app, ["build", str(model), "--sample", str(tmp_path / "features.npy"),
                                  "--out", str(tmp_path / "dist2"), "--output-kind", "boxes=boxes"])
    assert unknown.exit_code == 3 and "detections" in unknown.output


def test_a_graph_without_any_batch_axis_builds(tmp_path):
    """A fixed-shape graph (int64 [2] in, no batch axis anywhere): one feed is one example."""
    graph = helper.make_graph([helper.make_node("Cast", ["pair"], ["as_float"], to=TensorProto.FLOAT),
                               helper.make_node("Mul", ["as_float", "scale"], ["scaled"])],
                              "fixed", [helper.make_tensor_value_info("pair", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "scale")])
    model = _save(graph, tmp_path / "fixed.onnx")
    session = ort.InferenceSession(str(model))
    feed, origin = make_feed(session, {"pair": np.array([3, 4], np.int64)}, batch=1)
    assert origin == "sample" and feed["pair"].tolist() == [3, 4]
    np.save(tmp_path / "pair.npy", np.array([3, 4], np.int64))
    result = runner.invoke(app, ["build", str(model), "--sample", str(tmp_path / "pair.npy"),
                                 "--out", str(tmp_path / "dist"), "--bench-time", "0.2"])
    assert result.exit_code == 0, result.output


def test_a_pinned_variant_that_fails_the_gate_is_exit_5(tmp_path):
    model = _boxes_and_scores_model(tmp_path / "head.onnx")
    np.save(tmp_path / "features.npy", np.random.default_rng(2).normal(size=(8, 40, 16)).astype(np.float32))
    result = runner.invoke(app, ["build", str(model), "--sample", str(tmp_path / "features.npy"),
                                 "--variant", "int8-dynamic", "--out", str(tmp_path / "dist")])
    assert result.exit_code == 5, result.output
    assert "--variant int8-dynamic fails the accuracy gate: detections" in result.output
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_quantizable_operators_only_inside_a_subgraph_are_not_applicable(tmp_path):
    """onnxruntime's quantizers leave an If's branches alone (a stateful model's Convs often sit
    there): the int8 variants would be fp32 again, and say so."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["batch", 4])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y_mul"]),
                               helper.make_node("Neg", ["y_mul"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["batch", 4])])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)],
                              "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weights])
    model = _save(graph, tmp_path / "branches.onnx")
    np.savez(tmp_path / "sample.npz", x=rng.normal(size=(16, 8)).astype(np.float32), flag=np.array(True))
    result = build(BuildSpec(model=model, sample=tmp_path / "sample.npz", out=tmp_path / "dist",
                             quantize="int8-dynamic", bench_time_s=0.2))
    row = next(row for row in result.variants if row.name == "int8-dynamic")
    assert row.code.value == "not-applicable" and "inside If/Loop subgraphs" in row.reason, row.reason
    assert result.manifest.variant == "fp32"
