"""The cloud image, end to end: built by edgepack on a real Python base, run by podman, asked over HTTP.

The base is Debian bookworm's python3 made with debootstrap (tests/containers.py); the image is loaded
from its docker-archive, runs as user 65532 on port 8080, and must answer KServe v2 infer requests with
what onnxruntime gives in this process.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from containers import http_get, podman_run_detached
from edgepack.cli import app
from edgepack.runtime.bundle import extract_archive

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud_build(python_base_layout, tmp_path_factory):
    layout, tag = python_base_layout
    out = tmp_path_factory.mktemp("cloud")
    result = CliRunner().invoke(app, [
        "build", str(EXAMPLES / "digits_mlp.skops"), "--sample", str(EXAMPLES / "digits_sample.npy"),
        "--target", "cloud", "--base-image", f"oci:{layout}:{tag}", "--out", str(out), "--bench-time", "0.2",
        "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_image_runs_under_podman_and_answers_like_onnxruntime(cloud_build, podman_env, tmp_path):
    image = cloud_build["image"]
    rows = np.load(EXAMPLES / "digits_sample.npy")[:5].astype(np.float32)
    model = extract_archive(Path(cloud_build["bundle"]), tmp_path) / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {session.get_inputs()[0].name: rows})))
    name = cloud_build["name"]

    # /v2/health/ready says 503 until the model is loaded, which takes longer on a busy machine.
    with podman_run_detached(image["archive"], ready_path="/v2/health/ready", ready_status=200) as url:
        status, listed = http_get(url + "/v2/models")
        assert status == 200 and [m["name"] for m in json.loads(listed)["models"]] == [name]
        status, body = http_get(url + f"/v2/models/{name}")
        assert status == 200 and json.loads(body)["name"] == name
        status, answer = _post(url + f"/v2/models/{name}/infer", {"inputs": [
            {"name": session.get_inputs()[0].name, "shape": list(rows.shape), "datatype": "FP32",
             "data": rows.ravel().tolist()}]})
        assert status == 200, answer
        got = {output["name"]: np.asarray(output["data"]).reshape(output["shape"]) for output in answer["outputs"]}
        assert set(got) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
        status, bad = _post(url + f"/v2/models/{name}/infer", {"inputs": [
            {"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
        assert 400 <= status < 500 and "error" in bad


def test_port_env_moves_the_server(cloud_build, podman_env):
    with podman_run_detached(cloud_build["image"]["archive"], port=9090, env={"PORT": "9090"},
                             ready_path="/v2/health/ready") as url:
        assert http_get(url + "/v2/health/live")[0] == 200
