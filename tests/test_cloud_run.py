"""The cloud image, end to end: built by edgepack on a real Python base, run by podman, asked over HTTP.

The base is Debian bookworm's python3 made with debootstrap (tests/containers.py); the image is loaded
from its docker-archive, runs as user 65532 on port 8080, and must answer KServe v2 infer requests with
what onnxruntime gives in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from containers import http_get, podman_run_detached
from v2_checks import assert_infer_like_onnxruntime, post_json
from edgepack.cli import app

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


def test_the_image_runs_under_podman_and_answers_like_onnxruntime(cloud_build, podman_env, tmp_path):
    image = cloud_build["image"]
    rows = np.load(EXAMPLES / "digits_sample.npy")[:5].astype(np.float32)
    name = cloud_build["name"]

    # /v2/health/ready says 503 until the model is loaded, which takes longer on a busy machine.
    with podman_run_detached(image["archive"], ready_path="/v2/health/ready", ready_status=200) as url:
        status, listed = http_get(url + "/v2/models")
        assert status == 200 and [m["name"] for m in json.loads(listed)["models"]] == [name]
        status, body = http_get(url + f"/v2/models/{name}")
        assert status == 200 and json.loads(body)["name"] == name
        assert_infer_like_onnxruntime(url, name, Path(cloud_build["bundle"]), rows, tmp_path)
        status, bad = post_json(url + f"/v2/models/{name}/infer", {"inputs": [
            {"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
        assert 400 <= status < 500 and "error" in bad


def test_port_env_moves_the_server(cloud_build, podman_env):
    with podman_run_detached(cloud_build["image"]["archive"], port=9090, env={"PORT": "9090"},
                             ready_path="/v2/health/ready") as url:
        assert http_get(url + "/v2/health/live")[0] == 200
