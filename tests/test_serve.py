"""The HTTP server, for real: ``python -m runtime serve`` from an unpacked bundle in a subprocess,
spoken to over sockets with the standard library and with Triton's own client."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app as cli_app

READY_TIMEOUT_S = 90  # a loaded 2-core host can take a while to import onnxruntime


class Served:
    """A server subprocess: its port from the log line, its stderr collected as it comes."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.process = subprocess.Popen(command, cwd=cwd, env=env or _bundle_env(), stderr=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, text=True, preexec_fn=preexec_fn)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._port()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while get(self.url + "/v2/health/ready")[0] != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.02)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)

    def _port(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, f"the server exited: {''.join(self.log)}"
                continue
            if match := re.search(r"^serving \S+ \S+ on http://127\.0\.0\.1:(\d+) ", line):
                return int(match.group(1))
        raise AssertionError(f"no 'serving' line: {''.join(self.log)}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _bundle_env() -> dict[str, str]:
    """What a device or image has: no PYTHONPATH pointing at edgepack."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def request(method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get(url: str) -> tuple[int, object]:
    try:
        status, _, body = request("GET", url)
    except OSError:
        return 0, None
    return status, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()


def post(url: str, payload: object, **headers: str) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, answer = request("POST", url, body, {"Content-Type": "application/json", **headers})
    return status, json.loads(answer)


@pytest.fixture(scope="module")
def server(bundle_dir):
    """The bundle's own runtime, as the cloud image runs it: ``python -m runtime serve`` in the bundle folder."""
    served = Served([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"], bundle_dir)
    yield served
    assert served.stop() == 0, "".join(served.log)
    assert "stopped serving classifier" in served.log[-1]


@pytest.fixture(scope="module")
def manifest(bundle_dir) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def rows(data_dir) -> np.ndarray:
    return np.load(data_dir / "sample.npy")[:7]


@pytest.fixture(scope="module")
def expected(bundle_dir, rows) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(session.get_outputs(), session.run(None, {"X": rows}))}


def v2_input(rows: np.ndarray, **overrides) -> dict:
    return {"name": "X", "shape": list(rows.shape), "datatype": "FP32", "data": rows.reshape(-1).tolist(), **overrides}


def test_health_and_metadata(server, manifest):
    assert get(server.url + "/v2/health/live") == (200, {"live": True})
    assert get(server.url + "/v2/health/ready") == (200, {"ready": True})
    assert get(server.url + "/v2") == (200, {"name": "edgepack", "version": manifest["created_by"]["edgepack"],
                                             "extensions": ["binary_tensor_data"]})
    assert get(server.url + "/v2/models") == (200, {"models": [{"name": "classifier", "versions": [manifest["version"]],
                                                                "platform": "onnxruntime_onnx", "ready": True}]})
    metadata = {"name": "classifier", "versions": [manifest["version"]], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 6]}],
                "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]}
    assert get(server.url + "/v2/models/classifier") == (200, metadata)
    assert get(server.url + f"/v2/models/classifier/versions/{manifest['version']}") == (200, metadata)
    assert get(server.url + "/v2/models/classifier/ready") == (200, {"name": "classifier", "ready": True})
    assert get(server.url + f"/v2/models/classifier/versions/{manifest['version']}/ready")[0] == 200
    status, answer = get(server.url + "/v2/models/other")
    assert status == 404 and "no model named 'other'" in answer["error"] and "classifier" in answer["error"]
    status, answer = get(server.url + "/v2/models/classifier/versions/0000/ready")
    assert status == 404 and "no version '0000'" in answer["error"]
    status, answer = get(server.url + "/v1/models/classifier:predict")
    assert status == 404 and "no such endpoint" in answer["error"]
    status, headers, body = request("GET", server.url + "/v2/models/classifier/infer")
    assert status == 405 and headers["allow"] == "POST" and "takes POST" in json.loads(body)["error"]


def test_infer_answers_as_onnxruntime_does(server, manifest, rows, expected):
    status, answer = post(server.url + "/v2/models/classifier/infer", {"id": "req-1", "inputs": [v2_input(rows)]})
    assert status == 200, answer
    assert answer["model_name"] == "classifier" and answer["model_version"] == manifest["version"]
    assert answer["id"] == "req-1"
    by_name = {output["name"]: output for output in answer["outputs"]}
    assert list(by_name) == ["label", "probabilities"]
    assert by_name["label"]["datatype"] == "INT64" and by_name["label"]["shape"] == [7]
    assert by_name["probabilities"]["datatype"] == "FP32" and by_name["probabilities"]["shape"] == [7, 3]
    for name, output in by_name.items():
        got = np.asarray(output["data"], dtype=expected[name].dtype).reshape(output["shape"])
        np.testing.assert_array_equal(got, expected[name])

    # Nested data, one output asked for, a version in the path; no id given, none echoed.
    nested = v2_input(rows, data=rows.tolist())
    status, answer = post(server.url + f"/v2/models/classifier/versions/{manifest['version']}/infer",
                          {"inputs": [nested], "outputs": [{"name": "probabilities"}]})
    assert status == 200 and "id" not in answer and [o["name"] for o in answer["outputs"]] == ["probabilities"]
    np.testing.assert_array_equal(np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(7, 3),
                                  expected["probabilities"])


def test_infer_with_binary_tensors(server, rows, expected):
    """The binary tensor data extension, built by hand: JSON header, then raw little-endian floats."""
    header = json.dumps({"inputs": [{"name": "X", "shape": [7, 6], "datatype": "FP32",
                                     "parameters": {"binary_data_size": rows.nbytes}}],
                         "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                     {"name": "probabilities"}]}).encode()
    status, headers, body = request("POST", server.url + "/v2/models/classifier/infer",
                                    header + rows.astype("<f4").tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    length = int(headers["inference-header-content-length"])
    answer = json.loads(body[:length])
    label, probabilities = answer["outputs"]
    assert label["parameters"] == {"binary_data_size": 7 * 8} and "data" not in label
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype="<i8"), expected["label"])
    np.testing.assert_array_equal(np.asarray(probabilities["data"], dtype=np.float32).reshape(7, 3),
                                  expected["probabilities"])


def test_predict_answers_as_onnxruntime_does(server, rows, expected):
    for payload in ({"rows": rows.tolist()}, rows.tolist(), {"inputs": {"X": rows.tolist()}}):
        status, answer = post(server.url + "/predict", payload)
        assert status == 200, answer
        assert answer["outputs"]["label"] == expected["label"].tolist()
        np.testing.assert_array_equal(np.asarray(answer["outputs"]["probabilities"], dtype=np.float32),
                                      expected["probabilities"])


ROW = [0.5, -1.0, 0.25, 2.0, 0.0, 1.5]
INFER_REFUSALS = [
    # (payload, status, texts the error must hold)
    (b"{not json", 400, ["not valid JSON"]),
    ({"inputs": []}, 400, ["missing input 'X'"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": ROW},
                 {"name": "Z", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, ["unknown input 'Z'", "X (FP32 [-1, 6])"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP64", "data": ROW}]}, 400,
     ["input 'X'", "datatype 'FP64'", "takes FP32"]),
    ({"inputs": [{"name": "X", "shape": [2, 6], "datatype": "FP32", "data": ROW}]}, 400,
     ["input 'X'", "6 values", "shape [2, 6] needs 12"]),
    ({"inputs": [{"name": "X", "shape": [1, 5], "datatype": "FP32", "data": ROW[:5]}]}, 400,
     ["input 'X'", "5 at dimension 1", "takes 6"]),
    ({"inputs": [{"name": "X", "shape": [6], "datatype": "FP32", "data": ROW}]}, 400, ["input 'X'", "1 dimensions"]),
    ({"inputs": [{"name": "X", "shape": [-1, 6], "datatype": "FP32", "data": ROW}]}, 400,
     ["input 'X'", "whole numbers"]),
    ({"inputs": [{"name": "X", "shape": [0, 6], "datatype": "FP32", "data": []}]}, 400, ["input 'X' is empty"]),
    (b'{"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, NaN, 4, 5, 6]}]}', 400,
     ["input 'X'", "NaN at [0, 2]", "--allow-nonfinite"]),
    (b'{"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, -Infinity, 5, 6]}]}', 400,
     ["input 'X'", "infinity at [0, 3]"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 1e39]}]}, 400,
     ["input 'X'", "out of FP32 range"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": ["1", 2, 3, 4, 5, 6]}]}, 400,
     ["input 'X'", "holds strings"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [None, 2, 3, 4, 5, 6]}]}, 400,
     ["input 'X'", "nulls"]),
    ({"inputs": [{"name": "X", "shape": [2, 6], "datatype": "FP32", "data": [ROW, ROW[:5]]}]}, 400,
     ["input 'X'", "ragged"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [ROW[:3], ROW[3:]]}]}, 400,
     ["input 'X'", "nested as [2, 3]"]),
    ({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": ROW}], "outputs": [{"name": "logits"}]},
     400, ["unknown output 'logits'", "label", "probabilities"]),
    # A lone surrogate: the standard library reads it, orjson could not write it back (the id is echoed): was a 500.
    (b'{"id": "a\\udc00", "inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}',
     400, ["\\udc00", "surrogate"]),
]


@pytest.mark.parametrize("payload,status,texts", INFER_REFUSALS, ids=[t[0] for *_, t in INFER_REFUSALS])
def test_bad_infer_requests_are_refused_by_name(server, payload, status, texts):
    got, answer = post(server.url + "/v2/models/classifier/infer", payload)
    assert got == status, answer
    assert list(answer) == ["error"] and all(text in answer["error"] for text in texts), answer


def test_other_refusals(server, manifest):
    url = server.url
    status, answer = post(url + "/v2/models/other/infer", {"inputs": [v2_input(np.zeros((1, 6)))]})
    assert status == 404 and "no model named 'other'" in answer["error"]
    status, answer = post(url + "/v2/models/classifier/versions/abc/infer", {"inputs": [v2_input(np.zeros((1, 6)))]})
    assert status == 404 and "no version 'abc'" in answer["error"] and manifest["version"] in answer["error"]
    status, answer = post(url + "/predict", ROW)
    assert status == 400 and "input 'X'" in answer["error"] and "wrap a single row" in answer["error"]
    status, answer = post(url + "/predict", {"rows": [ROW[:5]]})
    assert status == 400 and "input 'X'" in answer["error"] and "5 at dimension 1" in answer["error"]
    status, answer = post(url + "/predict", {"rowz": [ROW]})
    assert status == 400 and '"rows"' in answer["error"]
    status, answer = post(url + "/predict", b'[[1, 2, 3, 4, 5, NaN]]')
    assert status == 400 and "input 'X': NaN at [0, 5]" in answer["error"]
    header = json.dumps({"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 20}}]}).encode()
    status, answer = post(url + "/v2/models/classifier/infer", header + bytes(20),
                          **{"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "input 'X'" in answer["error"] and "needs 24" in answer["error"]
    status, answer = post(url + "/v2/models/classifier/infer", b"\x1f\x8b", **{"Content-Encoding": "gzip"})
    assert status == 415 and "gzip" in answer["error"]


def test_large_bodies_get_413_and_the_server_goes_on(server):
    body = b'{"inputs": [' + b" " * (33 << 20) + b"]}"
    status, answer = post(server.url + "/v2/models/classifier/infer", body)
    assert status == 413 and "32 MiB" in answer["error"] and "--max-body-mb" in answer["error"]
    assert "binary data" in answer["error"] and "Inference-Header-Content-Length" in answer["error"]
    # Chunked, with no Content-Length to refuse it early: refused once 32 MiB have been read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/predict", body=iter([b" " * (1 << 20)] * 33), encode_chunked=True,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and "32 MiB" in json.loads(response.read())["error"]
    connection.close()
    assert post(server.url + "/predict", {"rows": [ROW]})[0] == 200
    assert get(server.url + "/v2/health/ready")[0] == 200


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_requests_by_status(server):
    before = _samples(get(server.url + "/metrics")[1])
    infer_url = server.url + "/v2/models/classifier/infer"
    for _ in range(3):
        assert post(infer_url, {"inputs": [v2_input(np.zeros((2, 6), dtype=np.float32))]})[0] == 200
    assert post(infer_url, {"inputs": []})[0] == 400
    assert post(infer_url, b"nope")[0] == 400
    assert post(server.url + "/predict", {"rows": [ROW]})[0] == 200
    assert get(server.url + "/v2/models/nope")[0] == 404
    status, headers, body = request("GET", server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    after = _samples(text)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('edgepack_requests_total{model="classifier",endpoint="infer",code="200"}') == 3
    assert delta('edgepack_requests_total{model="classifier",endpoint="infer",code="400"}') == 2
    assert delta('edgepack_requests_total{model="classifier",endpoint="predict",code="200"}') == 1
    assert delta('edgepack_requests_total{model="",endpoint="model_metadata",code="404"}') == 1
    assert delta('edgepack_request_duration_seconds_count{model="classifier",endpoint="infer"}') == 3
    assert delta('edgepack_model_run_duration_seconds_count{model="classifier",version="' +
                 re.search(r'version="(\w+)"', text).group(1) + '"}') == 4
    assert after["edgepack_requests_in_flight"] == 1  # this scrape itself
    assert "# TYPE edgepack_request_duration_seconds histogram" in text
    buckets = [(line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('edgepack_request_duration_seconds_bucket{model="classifier",endpoint="infer"')]
    assert buckets[0][0] == "5e-05" and buckets[-2][0] == "5.0" and buckets[-1][0] == "+Inf"
    counts = [count for _, count in buckets]
    assert counts == sorted(counts) and counts[-1] == after['edgepack_request_duration_seconds_count{model="classifier",endpoint="infer"}']


def test_triton_client_infers(server, rows, expected):
    http_client = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
    client = http_client.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("classifier")
    assert client.get_model_metadata("classifier")["platform"] == "onnxruntime_onnx"
    for binary in (True, False):  # binary tensors (the client's default) and plain JSON
        tensor = http_client.InferInput("X", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows, binary_data=binary)
        outputs = [http_client.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
        result = client.infer("classifier", [tensor], outputs=outputs, request_id="t-1")
        assert result.get_response()["id"] == "t-1"
        for name, value in expected.items():
            np.testing.assert_array_equal(result.as_numpy(name), value)
    result = client.infer("classifier", [tensor])  # no outputs named: every output, binary
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])
    wrong = http_client.InferInput("X", [1, 6], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 6)))
    with pytest.raises(http_client.InferenceServerException, match="input 'X' has datatype 'FP64'"):
        client.infer("classifier", [wrong])
    client.close()


def test_tampered_bundle_refuses_to_start(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    done = subprocess.run([sys.executable, "-m", "runtime", "serve", "--port", "0"], cwd=copy, capture_output=True,
                          text=True, env=_bundle_env(), timeout=120)
    assert done.returncode == 7
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "checksum mismatch for model.onnx" in done.stderr


def _failing_model(path: Path) -> None:
    """A model with the bundle's signature that onnxruntime runs for one row and fails on more."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Reshape", ["X", "one_row"], ["flat"]),
             helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["probabilities"]),
             helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    constants = [helper.make_tensor("one_row", TensorProto.INT64, [2], [1, 6]),
                 helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("ends", TensorProto.INT64, [1], [3]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "fails-past-one-row",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


def _reseal(root: Path) -> None:
    """Rewrite SHA256SUMS and the manifest's file list after changing a file: a consistent bundle."""
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (root / entry["path"]).read_bytes()
        entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    sums = {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file() and path.name != "SHA256SUMS" and "__pycache__" not in path.parts}
    (root / "SHA256SUMS").write_text("".join(f"{sums[p]}  {p}\n" for p in sorted(sums)))


def test_an_input_onnxruntime_refuses_is_a_400_and_the_server_goes_on(bundle_dir, tmp_path):
    """The model ran its sample at warm-up, so what onnxruntime refuses later is the input's fault."""
    root = shutil.copytree(bundle_dir, tmp_path / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
    _failing_model(root / "model.onnx")
    _reseal(root)
    served = Served([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"], root)
    try:
        assert post(served.url + "/predict", {"rows": [ROW]}) == (
            200, {"model_name": "classifier", "model_version": json.loads((root / "manifest.json").read_text())["version"],
                  "outputs": {"label": [0], "probabilities": [ROW[:3]]}})
        status, answer = post(served.url + "/predict", {"rows": [ROW, ROW]})
        assert status == 400 and "onnxruntime failed on this input: Reshape node" in answer["error"], answer
        assert "cannot be reshaped" in answer["error"] and "/onnxruntime_src/" not in answer["error"]
        assert post(served.url + "/predict", {"rows": [ROW]})[0] == 200
    finally:
        assert served.stop() == 0
    # The client's mistake is answered, not logged as the server's (nor by onnxruntime itself).
    assert not any("onnxruntime failed" in line or "[E:onnxruntime" in line for line in served.log)


def test_edgepack_serve_unpacks_serves_and_stops_cleanly_on_sigterm(built_bundle, tmp_path, rows, expected):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    served = Served([sys.executable, "-m", "edgepack", "serve", str(built_bundle), "--port", "0"], tmp_path, env)
    try:
        assert any(p.name.startswith("edgepack-serve-") for p in tmp_path.iterdir())
        status, answer = post(served.url + "/predict", rows.tolist())
        assert status == 200 and answer["outputs"]["label"] == expected["label"].tolist()
    finally:
        code = served.stop()
    assert code == 0, "".join(served.log)
    assert served.log[0].startswith("serving classifier ") and served.log[-1].startswith("stopped serving classifier")
    assert not any(p.name.startswith("edgepack-serve-") for p in tmp_path.iterdir())  # the unpacked copy is gone


def test_edgepack_serve_errors_are_one_line(built_bundle, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["serve", str(tmp_path / "none.tar.gz")])
    assert_one_line_error(missing, 3, "no such bundle")
    tampered = tmp_path / "tampered.tar.gz"
    data = bytearray(built_bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert_one_line_error(runner.invoke(cli_app, ["serve", str(tampered)]), 7, str(tampered))
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = runner.invoke(cli_app, ["serve", str(built_bundle), "--port", str(busy.getsockname()[1])])
    assert_one_line_error(taken, 3, "cannot listen on 127.0.0.1")
    bad = runner.invoke(cli_app, ["serve", str(built_bundle), "--inference", "gpu"])
    assert bad.exit_code == 2 and "--inference 'gpu'" in bad.stderr
