"""The check every image test makes: the served model answers a KServe v2 infer like onnxruntime here."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgepack.runtime.bundle import extract_archive

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


def post_json(url: str, body: dict, timeout_s: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a POST, an error status included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=timeout_s) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def assert_infer_like_onnxruntime(url: str, name: str, bundle: Path, rows: np.ndarray, folder: Path,
                                  rtol: float = 1e-5, atol: float = 1e-6, timeout_s: float = 30) -> None:
    """POST ``rows`` to ``/v2/models/NAME/infer``; every output equals the bundle's model run in this process."""
    model = extract_archive(bundle, folder) / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {input_name: rows})))
    status, answer = post_json(url + f"/v2/models/{name}/infer", {"inputs": [
        {"name": input_name, "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]},
        timeout_s=timeout_s)
    assert status == 200, answer
    got = {output["name"]: np.asarray(output["data"]).reshape(output["shape"]) for output in answer["outputs"]}
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=atol, err_msg=key)
