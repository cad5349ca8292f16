"""What the server answers when a run fails, and how large a body it takes, for real: graphs made
here, packaged as bundles, real servers on 127.0.0.1.

A model runs its bundle's sample at warm-up, so onnxruntime refusing a request's input later (here
a U-Net-like graph whose height and width must be even) is the input's fault: a 400 with
onnxruntime's reason, alone in its batch, not charged to a phased candidate that the primary
agrees with. A run out of memory is a 503; what is the server's own fault stays a 500.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.runtime.bundle import extract_archive, verify_dir
from edgepack.runtime.errors import InferenceFailed
from edgepack.runtime.models import InputRejected, ModelSpec, ServedModel
from onnx_bundles import package
from test_batching import _gather_model, _together
from test_serve import Served, get, post, request
from test_shadow import _candidate, _lines

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]


def _unet(levels: int = 1, seed: int = 0) -> onnx.ModelProto:
    """[N, 3, H, W] -> [N, 4, H, W]: ``levels`` stride-2 convolutions, upsampled back by 2**levels
    and added to a 1x1 convolution of the input. Only H and W that 2**levels divides come back
    to their size; onnxruntime refuses the Add for others (H = 5: 6 against 5)."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "down0"),
               numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "skip_w"),
               numpy_helper.from_array(np.array([1, 1, 2**levels, 2**levels], dtype=np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["X", "down0"], ["level0"], strides=[2, 2], pads=[1, 1, 1, 1], name="down0")]
    for level in range(1, levels):
        weights.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"down{level}"))
        nodes.append(helper.make_node("Conv", [f"level{level - 1}", f"down{level}"], [f"level{level}"],
                                      strides=[2, 2], pads=[1, 1, 1, 1], name=f"down{level}"))
    nodes += [helper.make_node("Resize", [f"level{levels - 1}", "", "scales"], ["up"], mode="nearest", name="up"),
              helper.make_node("Conv", ["X", "skip_w"], ["skip"], name="skip"),
              helper.make_node("Add", ["up", "skip"], ["Y"], name="merge")]
    graph = helper.make_graph(nodes, f"unet{levels}",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, "H", "W"])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _image(h: int, w: int, seed: int = 0, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


def _infer_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """An unpacked bundle of the one-level U-Net (H and W must be even), warmed up on an 8x8 image."""
    folder = tmp_path_factory.mktemp("unet")
    return extract_archive(package(_unet(), "unet", {"X": _image(8, 8)}, folder / "dist"), folder / "bundle")


def _direct(root, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def test_an_input_onnxruntime_refuses_is_a_400_with_its_reason(unet, tmp_path):
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--log-dir", str(log_dir), "--log-sample-rate", "0"], unet)
    try:
        good = _image(6, 8)
        status, answer = post(served.url + "/v2/models/unet/infer", {"id": "even", **_infer_body(good)})
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(1, 4, 6, 8),
                                   _direct(unet, good), rtol=1e-5, atol=1e-5)
        status, answer = post(served.url + "/v2/models/unet/infer", {"id": "odd", **_infer_body(_image(5, 8))})
        assert status == 400, answer
        error = answer["error"]
        assert error.startswith("model unet: onnxruntime failed on this input: Add node 'merge': "
                                "Attempting to broadcast an axis by a dimension other than 1. 5 by 6"), error
        assert "onnxruntime refused this input" in error and "not in its signature" in error
        assert "/onnxruntime_src/" not in error and "[ONNXRuntimeError]" not in error and "::" not in error
        status, answer = post(served.url + "/predict", {"rows": _image(6, 7)[0:1].tolist()})
        assert status == 400 and "5 by 6" not in answer["error"] and "7 by 8" in answer["error"]
        assert post(served.url + "/v2/models/unet/infer", _infer_body(good))[0] == 200  # and it goes on
        metrics = get(served.url + "/metrics")[1]
        assert 'edgepack_requests_total{model="unet",endpoint="infer",code="400"} 1' in metrics
    finally:
        assert served.stop() == 0
    # The client's input, not the server's failure: nothing on stderr, from the server or onnxruntime.
    assert not any("onnxruntime" in line for line in served.log), "".join(served.log)
    by_id = {line["id"]: line for line in _lines(log_dir)}
    assert by_id["odd"]["status"] == 400 and "5 by 6" in by_id["odd"]["error"]
    assert np.asarray(by_id["odd"]["inputs"]["X"]).shape == (1, 3, 5, 8)  # kept to replay, though sampling is off
    assert by_id["even"]["status"] == 200 and "inputs" not in by_id["even"]


def test_one_refused_request_in_a_batch_fails_alone(bundle_dir, tmp_path):
    """A batch holding an index onnxruntime refuses is run again request by request: that one is a
    400 (InputRejected, still an InferenceFailed to what catches failed runs), the others answer."""
    root = _candidate(bundle_dir, tmp_path / "gather", "gather", _gather_model)
    model = ServedModel(ModelSpec.from_bundle(root, verify_dir(root).manifest, 1), "loop", 32)
    good = np.zeros((1, 6), dtype=np.float32)
    poison = np.full((1, 6), 7, dtype=np.float32)  # index 7 of a table of 3
    answers = asyncio.run(_together(model, [(None, {"X": good + i % 3}) for i in range(3)] + [(None, {"X": poison})]))
    refused = answers[3]
    assert isinstance(refused, InputRejected) and isinstance(refused, InferenceFailed) and refused.status == 400
    assert "Gather node" in refused.message and "out of" in refused.message and "/onnxruntime_src/" not in refused.message
    assert [list(a[0]["label"]) for a in answers[:3]] == [[0], [1], [2]] and all(a[2] == 1 for a in answers[:3])
    model.close()

    # Through a server: a burst of 8 at once, one of them poisoned.
    served = Served(SERVE, root)
    try:
        connections = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=30) for _ in range(8)]
        for i, connection in enumerate(connections):
            rows = poison if i == 5 else good + i % 3
            connection.request("POST", "/predict", body=json.dumps({"rows": rows.tolist()}),
                               headers={"Content-Type": "application/json"})
        statuses = []
        for connection in connections:
            response = connection.getresponse()
            statuses.append((response.status, json.loads(response.read())))
            connection.close()
        assert [s for s, _ in statuses] == [200] * 5 + [400] + [200] * 2, statuses
        assert "Gather node" in statuses[5][1]["error"]
        assert [answer["outputs"]["label"] for s, answer in statuses if s == 200] == [[0], [1], [2], [0], [1], [0], [1]]
    finally:
        assert served.stop() == 0


def test_a_phased_candidate_is_charged_only_with_what_the_primary_answers(unet, tmp_path):
    """Primary: H, W even. Candidate: H, W multiples of 4. At H = 6 the candidate fails and the
    primary answers (a candidate failure); at H = 5 both refuse it (the input's fault: a 400, no
    failure counted); at H = 8 the candidate answers."""
    folder = tmp_path / "candidate"
    candidate = extract_archive(package(_unet(levels=2, seed=1), "unet", {"X": _image(8, 8)}, folder / "dist"),
                                folder / "bundle")
    primary_version = json.loads((unet / "manifest.json").read_text())["version"]
    candidate_version = json.loads((candidate / "manifest.json").read_text())["version"]
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--phased", str(candidate), "--state-dir", str(tmp_path / "state"), "--steps", "100",
                     "--min-samples", "1000", "--log-dir", str(log_dir), "--log-sample-rate", "0"], unet)
    try:
        url = served.url + "/v2/models/unet/infer"
        for i in range(2):
            status, answer = post(url, {"id": f"six-{i}", **_infer_body(_image(6, 6, seed=i))})
            assert status == 200 and answer["model_version"] == primary_version, answer
        for i in range(3):
            status, answer = post(url, {"id": f"five-{i}", **_infer_body(_image(5, 6, seed=i))})
            assert status == 400 and "onnxruntime failed on this input: Add node 'merge'" in answer["error"], answer
        status, answer = post(url, {"id": "eight", **_infer_body(_image(8, 8))})
        assert status == 200 and answer["model_version"] == candidate_version
        rollout = get(served.url + "/admin/rollout")[1]
        assert rollout["figures"]["candidate_requests"] == 3 and rollout["figures"]["errors"] == 2, rollout["figures"]
        metrics = get(served.url + "/metrics")[1]
        assert 'edgepack_rollout_requests_total{model="unet",variant="candidate",outcome="error"} 2' in metrics
        assert 'edgepack_requests_total{model="unet",endpoint="infer",code="400"} 3' in metrics
    finally:
        assert served.stop() == 0
    by_id = {line["id"]: line for line in _lines(log_dir) if line["role"] == "primary"}
    assert all("fallback" in by_id[f"six-{i}"] and "Add node 'merge'" in by_id[f"six-{i}"]["fallback"] for i in range(2))
    assert all(by_id[f"five-{i}"]["status"] == 400 and "5 by 6" in by_id[f"five-{i}"]["error"] for i in range(3))


def _square_of_zeros() -> onnx.ModelProto:
    """size [s] -> zeros [s, s]: memory on demand."""
    graph = helper.make_graph([helper.make_node("Concat", ["size", "size"], ["shape"], axis=0),
                               helper.make_node("ConstantOfShape", ["shape"], ["zeros"])], "zeros",
                              [helper.make_tensor_value_info("size", TensorProto.INT64, ["batch"])],
                              [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, ["rows", "cols"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_run_out_of_memory_is_a_503_and_a_server_fault_stays_a_500(tmp_path):
    archive = package(_square_of_zeros(), "zeros", {"size": np.array([3], dtype=np.int64)}, tmp_path / "dist")
    root = extract_archive(archive, tmp_path / "bundle")
    served = Served(SERVE, root)
    try:
        body = {"inputs": [{"name": "size", "shape": [1], "datatype": "INT64", "data": [1 << 30]}]}
        status, answer = post(served.url + "/v2/models/zeros/infer", body)  # 4 EiB of float32
        assert status == 503, answer
        assert "model zeros: out of memory for this run: ConstantOfShape node: Failed to allocate memory" in answer["error"]
        assert "retry later" in answer["error"]
        body["inputs"][0]["data"] = [2]
        status, answer = post(served.url + "/v2/models/zeros/infer", body)
        assert status == 200 and answer["outputs"][0]["data"] == [0.0] * 4
    finally:
        assert served.stop() == 0
    assert any("out of memory for this run" in line for line in served.log)  # the server's trouble: said on stderr

    # A failure that is not onnxruntime's refusal of an input (here the binding's, for a feed the
    # server's checks would never let through) is the server's: InferenceFailed, a 500.
    model = ServedModel(ModelSpec.from_bundle(root, verify_dir(root).manifest, 1), "loop")
    with pytest.raises(InferenceFailed, match="onnxruntime failed: ") as caught:
        model.run(None, {})
    assert not isinstance(caught.value, InputRejected) and "report this" in caught.value.hint
    model.close()


def test_a_sample_the_model_refuses_stops_the_server_at_warm_up(tmp_path):
    archive = package(_unet(), "unet", {"X": _image(5, 8)}, tmp_path / "dist")
    root = extract_archive(archive, tmp_path / "bundle")
    done = subprocess.run(SERVE, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "at warm-up, on the bundle's sample" in done.stderr and "5 by 6" in done.stderr


# -- the body limit ------------------------------------------------------------------------------

def _mean_model() -> onnx.ModelProto:
    """An image's mean per channel: [N, 3, H, W] -> [N, 3]."""
    graph = helper.make_graph([helper.make_node("ReduceMean", ["X"], ["mean"], axes=[2, 3], keepdims=0)], "mean",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def mean_archive(tmp_path_factory):
    return package(_mean_model(), "mean", {"X": _image(8, 8)}, tmp_path_factory.mktemp("mean"))


def test_the_default_limit_takes_a_640x640_image_as_json(mean_archive, tmp_path):
    """One 640x640x3 float32 image as v2 JSON (json.dumps of tolist, as a script sends it; tritonclient
    with binary_data=False) is ~24 MiB: both servers, started with their defaults, take it."""
    http_client = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
    image = _image(640, 640)
    body = json.dumps(_infer_body(image)).encode()
    assert 20 << 20 < len(body) < 32 << 20  # 24,906,010 bytes with this seed
    expected = image.mean(axis=(2, 3))
    root = extract_archive(mean_archive, tmp_path / "bundle")
    for command, cwd in ((SERVE, root), ([sys.executable, "-m", "edgepack", "serve", str(mean_archive), "--port", "0"],
                                         tmp_path)):
        served = Served(command, cwd)
        try:
            status, _, answer = request("POST", served.url + "/v2/models/mean/infer", body,
                                        {"Content-Type": "application/json"})
            assert status == 200, answer[:300]
            np.testing.assert_allclose(json.loads(answer)["outputs"][0]["data"], expected.reshape(-1), rtol=1e-4)
            client = http_client.InferenceServerClient(url=f"127.0.0.1:{served.port}", connection_timeout=120,
                                                       network_timeout=120)
            tensor = http_client.InferInput("X", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image, binary_data=False)
            result = client.infer("mean", [tensor], outputs=[http_client.InferRequestedOutput("mean", binary_data=False)])
            np.testing.assert_allclose(result.as_numpy("mean"), expected, rtol=1e-4)
            client.close()
        finally:
            assert served.stop() == 0


def test_past_the_limit_a_413_names_the_binary_extension(mean_archive, tmp_path):
    http_client = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
    images = _image(640, 640, n=2)  # ~48 MiB as JSON, 9.4 MiB as binary data
    root = extract_archive(mean_archive, tmp_path / "bundle")
    served = Served(SERVE, root)
    try:
        status, answer = post(served.url + "/v2/models/mean/infer", _infer_body(images))
        assert status == 413, answer
        error = answer["error"]
        assert error.startswith("the body is larger than the server's limit of 32 MiB"), error
        assert "send tensors as binary data" in error and "Inference-Header-Content-Length" in error
        assert "binary_data=True" in error and "--max-body-mb" in error
        client = http_client.InferenceServerClient(url=f"127.0.0.1:{served.port}")
        tensor = http_client.InferInput("X", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=True)  # what the hint says: the same images fit
        result = client.infer("mean", [tensor])
        np.testing.assert_allclose(result.as_numpy("mean"), images.mean(axis=(2, 3)), rtol=1e-4)
        client.close()
    finally:
        assert served.stop() == 0
