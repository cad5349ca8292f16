"""Every datatype a manifest can carry, through a real server: one graph made here with an input of
each (a scalar and a symbolic width among them), packaged as a bundle and served; its answers to
v2 JSON, v2 binary and /predict requests equal onnxruntime's on the same inputs, and what does not
fit an input is refused with a 400 that names it."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgepack.runtime.bundle import extract_archive
from onnx_bundles import package
from test_serve import Served, post, request

ROWS, WIDTH = 3, 4
# name: (onnx type, v2 datatype, shape), in the graph's order.
INPUTS = {
    "f32": (TensorProto.FLOAT, "FP32", ["batch", 3]),
    "f16": (TensorProto.FLOAT16, "FP16", ["batch", 3]),
    "f64": (TensorProto.DOUBLE, "FP64", ["batch", "width"]),
    "i8": (TensorProto.INT8, "INT8", ["batch", 2]),
    "i16": (TensorProto.INT16, "INT16", ["batch", 2]),
    "i32": (TensorProto.INT32, "INT32", ["batch", 2]),
    "i64": (TensorProto.INT64, "INT64", ["batch", 2]),
    "u8": (TensorProto.UINT8, "UINT8", ["batch", 2]),
    "u16": (TensorProto.UINT16, "UINT16", ["batch", 2]),
    "u32": (TensorProto.UINT32, "UINT32", ["batch", 2]),
    "u64": (TensorProto.UINT64, "UINT64", ["batch", 2]),
    "flag": (TensorProto.BOOL, "BOOL", ["batch", 2]),
    "text": (TensorProto.STRING, "BYTES", ["batch"]),
    "scale": (TensorProto.INT64, "INT64", []),
}
OUTPUTS = {
    "total": (TensorProto.FLOAT, "FP32", ["batch"]),  # every input, as floats, summed per row, times scale
    "shifted": (TensorProto.INT64, "INT64", ["batch", 2]),  # i64 + scale
    "negated": (TensorProto.BOOL, "BOOL", ["batch", 2]),  # not flag
    "doubled": (TensorProto.FLOAT16, "FP16", ["batch", 3]),  # f16 + f16
    "bytes": (TensorProto.UINT8, "UINT8", ["batch", 2]),  # u8 as it came
    "echo": (TensorProto.STRING, "BYTES", ["batch"]),  # text as it came
    "count": (TensorProto.INT64, "INT64", []),  # the sum of i64: a scalar
}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
         "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
         "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}


def _model() -> onnx.ModelProto:
    nodes, sums = [], []
    for name, (_, datatype, shape) in INPUTS.items():
        if name == "scale":
            continue
        nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))  # strings parse
        if len(shape) == 2:
            nodes.append(helper.make_node("ReduceSum", [f"{name}_f", "axis1"], [f"{name}_s"], keepdims=0))
            sums.append(f"{name}_s")
        else:
            sums.append(f"{name}_f")
    nodes.append(helper.make_node("Sum", sums, ["rows"]))
    nodes += [helper.make_node("Cast", ["scale"], ["scale_f"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["rows", "scale_f"], ["total"]),
              helper.make_node("Add", ["i64", "scale"], ["shifted"]),
              helper.make_node("Not", ["flag"], ["negated"]),
              helper.make_node("Add", ["f16", "f16"], ["doubled"]),
              helper.make_node("Identity", ["u8"], ["bytes"]),
              helper.make_node("Identity", ["text"], ["echo"]),
              helper.make_node("ReduceSum", ["i64"], ["count"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "every-dtype",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, _, shape) in INPUTS.items()],
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, _, shape) in OUTPUTS.items()],
        [helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Values across each datatype's range, its extremes included."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for name, (_, datatype, shape) in INPUTS.items():
        dims = [rows if d == "batch" else WIDTH if d == "width" else d for d in shape]
        dtype = NUMPY[datatype]
        if datatype == "BYTES":
            feed[name] = np.array([f"{v:.3f}" for v in rng.uniform(-10, 10, dims)], dtype=object)
        elif datatype == "BOOL":
            feed[name] = rng.integers(0, 2, dims).astype(bool)
        elif datatype.startswith("FP"):
            feed[name] = rng.uniform(-100, 100, dims).astype(dtype)
        elif name == "scale":
            feed[name] = np.array(3, dtype=np.int64)
        else:
            info = np.iinfo(dtype)
            low, high = (info.min, info.max) if name != "i64" else (-(2**62), 2**62)  # i64 + scale stays in range
            values = rng.integers(low, high, dims, dtype=dtype, endpoint=True)
            values.reshape(-1)[:2] = [low, high]
            feed[name] = values
    return feed


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The graph packaged as a bundle .tar.gz, then verified and unpacked as a server gets it."""
    folder = tmp_path_factory.mktemp("dtypes")
    sample = {name: (array.astype(str) if array.dtype == object else array) for name, array in _inputs(1, 0).items()}
    archive = package(_model(), "every-dtype", sample, folder / "dist")
    return extract_archive(archive, folder / "bundle")


@pytest.fixture(scope="module")
def server(bundle):
    served = Served([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"], bundle)
    yield served
    assert served.stop() == 0, "".join(served.log)


@pytest.fixture(scope="module")
def direct(bundle):
    """The bundle's model in this process: what every answer is compared with."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, session.run(None, feed)))

    return run


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        answer = got[name]
        assert answer.shape == value.shape, name
        if value.dtype == object:
            assert [str(v, "utf-8") if isinstance(v, bytes) else v for v in answer.reshape(-1)] == list(value.reshape(-1))
        elif value.dtype.kind == "f":
            np.testing.assert_allclose(answer.astype(value.dtype), value, rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(answer.astype(value.dtype), value, err_msg=name)


def test_metadata_names_every_datatype(server):
    status, _, body = request("GET", server.url + "/v2/models/every-dtype")
    metadata = json.loads(body)
    assert status == 200
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        (name, datatype, [-1 if isinstance(d, str) else d for d in shape]) for name, (_, datatype, shape) in INPUTS.items()]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [(n, d) for n, (_, d, _) in OUTPUTS.items()]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_client_sends_every_datatype(server, direct, binary):
    http_client = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
    client = http_client.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        for seed, rows in ((1, ROWS), (2, 1)):
            feed = _inputs(rows, seed)
            tensors = []
            for name, (_, datatype, _) in INPUTS.items():
                tensor = http_client.InferInput(name, list(feed[name].shape), datatype)
                tensor.set_data_from_numpy(feed[name], binary_data=binary)
                tensors.append(tensor)
            outputs = [http_client.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
            result = client.infer("every-dtype", tensors, outputs=outputs)
            by_name = {o["name"]: o for o in result.get_response()["outputs"]}
            assert {n: o["datatype"] for n, o in by_name.items()} == {n: d for n, (_, d, _) in OUTPUTS.items()}
            assert by_name["count"]["shape"] == [] and by_name["total"]["shape"] == [rows]
            _assert_same({name: result.as_numpy(name) for name in OUTPUTS}, direct(feed))
    finally:
        client.close()


def _v2_json(feed: dict[str, np.ndarray], nested: bool = False) -> dict:
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": INPUTS[name][1],
                        "data": array.tolist() if nested and array.ndim else array.reshape(-1).tolist()}
                       for name, array in feed.items()]}


def _from_json(output: dict) -> np.ndarray:
    data = output["data"]
    dtype = object if output["datatype"] == "BYTES" else NUMPY[output["datatype"]]
    return np.array(data, dtype=dtype).reshape(output["shape"])


def test_plain_json_flat_and_nested_and_a_bare_scalar(server, direct):
    feed = _inputs(ROWS, 3)
    expected = direct(feed)
    for nested in (False, True):
        status, answer = post(server.url + "/v2/models/every-dtype/infer", _v2_json(feed, nested))
        assert status == 200, answer
        _assert_same({o["name"]: _from_json(o) for o in answer["outputs"]}, expected)
    body = _v2_json(feed)
    body["inputs"][-1]["data"] = 3  # a scalar input's value alone
    status, answer = post(server.url + "/v2/models/every-dtype/infer", body)
    assert status == 200, answer
    _assert_same({o["name"]: _from_json(o) for o in answer["outputs"]}, expected)


def test_hand_made_binary_body_with_binary_outputs(server, direct):
    """The binary extension byte by byte: FP16 as 2 bytes, BOOL as 1, BYTES length-prefixed, a scalar as 8."""
    feed = _inputs(2, 4)
    entries, blobs = [], []
    for name, array in feed.items():
        if array.dtype == object:
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in array.reshape(-1))
        else:
            blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
        entries.append({"name": name, "shape": list(array.shape), "datatype": INPUTS[name][1],
                        "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = json.dumps({"inputs": entries, "parameters": {"binary_data_output": True}}).encode()
    status, headers, body = request("POST", server.url + "/v2/models/every-dtype/infer", header + b"".join(blobs),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    length = int(headers["inference-header-content-length"])
    got, offset = {}, length
    for output in json.loads(body[:length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        chunk, offset = body[offset:offset + size], offset + size
        if output["datatype"] == "BYTES":
            values, at = [], 0
            while at < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, at)
                values.append(chunk[at + 4:at + 4 + n].decode())
                at += 4 + n
            got[output["name"]] = np.array(values, dtype=object).reshape(output["shape"])
        else:
            got[output["name"]] = np.frombuffer(chunk, dtype=np.dtype(NUMPY[output["datatype"]]).newbyteorder("<")
                                                ).reshape(output["shape"])
    assert offset == len(body)
    _assert_same(got, direct(feed))


def test_predict_takes_named_inputs(server, direct):
    feed = _inputs(ROWS, 5)
    named = {name: (array.tolist() if array.ndim else array.item()) for name, array in feed.items()}
    status, answer = post(server.url + "/predict", {"inputs": named})
    assert status == 200, answer
    got = {name: np.array(value, dtype=object if name == "echo" else None) for name, value in answer["outputs"].items()}
    _assert_same(got, direct(feed))
    status, answer = post(server.url + "/predict", {"rows": feed["f32"].tolist()})
    assert status == 400 and "takes 14 inputs, so rows alone are ambiguous" in answer["error"]
    del named["u16"]
    status, answer = post(server.url + "/predict", {"inputs": named})
    assert status == 400 and "missing input 'u16'" in answer["error"]


def _changed(name: str, **fields) -> dict:
    body = _v2_json(_inputs(2, 6))
    if fields.pop("drop", False):
        body["inputs"] = [item for item in body["inputs"] if item["name"] != name]
    for item in body["inputs"]:
        if item["name"] == name:
            item.update(fields)
    return body


REFUSALS = [
    # (what, body, texts the error must hold)
    ("wrong datatype", _changed("f16", datatype="FP32"), ["input 'f16' has datatype 'FP32', the model takes FP16"]),
    ("a fraction for INT32", _changed("i32", data=[1, 2.5, 3, 4]),
     ["input 'i32': value 2.5 at [1] is not a whole number"]),
    ("a decimal for INT16", _changed("i16", data=[1.0, 2.0, 3.0, 4.0]),
     ["input 'i16': value 1.0 at [0] is a whole number written as a decimal", "send 1, not 1.0"]),
    ("300 for UINT8", _changed("u8", data=[0, 300, 1, 2]), ["input 'u8': value 300 is out of UINT8 range (0..255)"]),
    ("-1 for UINT8", _changed("u8", data=[0, -1, 1, 2]), ["input 'u8': value -1 is out of UINT8 range (0..255)"]),
    ("128 for INT8", _changed("i8", data=[128, 0, 1, 2]), ["input 'i8': value 128 is out of INT8 range (-128..127)"]),
    ("2**64 for UINT64", _changed("u64", data=[0, 2**64, 1, 2]), ["input 'u64': value 18446744073709551616 at [1]",
                                                                   "out of UINT64 range"]),
    ("-1 for UINT64", _changed("u64", data=[-1, 0, 1, 2]), ["input 'u64': value -1 is out of UINT64 range"]),
    ("70000 for FP16", _changed("f16", data=[70000, 0, 0, 0, 0, 0]), ["input 'f16'", "70000", "out of FP16 range"]),
    ("numbers for BOOL", _changed("flag", data=[1, 0, 0, 1]), ["input 'flag'", "BOOL takes true/false"]),
    ("numbers for BYTES", _changed("text", data=[1, 2]), ["input 'text'", "BYTES takes strings"]),
    ("a list for the scalar", _changed("scale", shape=[1], data=[3]), ["input 'scale'", "takes 0"]),
    ("a missing input", _changed("scale", drop=True), ["missing input 'scale'"]),
]


@pytest.mark.parametrize("body,texts", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_does_not_fit_an_input_is_refused_by_name(server, body, texts):
    status, answer = post(server.url + "/v2/models/every-dtype/infer", body)
    assert status == 400 and list(answer) == ["error"], answer
    assert all(text in answer["error"] for text in texts), answer


def test_binary_bool_bytes_other_than_0_and_1_are_refused(server):
    feed = _inputs(1, 7)
    entries, blobs = [], []
    for name, array in feed.items():
        if name == "flag":
            blob = bytes([1, 2])
        elif array.dtype == object:
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in array)
        else:
            blob = array.tobytes()
        entries.append({"name": name, "shape": list(array.shape), "datatype": INPUTS[name][1],
                        "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = json.dumps({"inputs": entries}).encode()
    status, _, body = request("POST", server.url + "/v2/models/every-dtype/infer", header + b"".join(blobs),
                              {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "input 'flag': BOOL binary data holds byte 2 at [0, 1]" in json.loads(body)["error"]


def test_inputs_that_disagree_on_a_symbolic_dimension_get_onnxruntimes_reason(server):
    """Each input fits its own signature, but "batch" is 2 in one and 3 in the others: the server's
    checks cannot see it, onnxruntime refuses it, and the client gets a 400 saying why."""
    body = _changed("f32", shape=[3, 3], data=list(range(9)))
    status, answer = post(server.url + "/v2/models/every-dtype/infer", body)
    assert status == 400, answer
    assert "onnxruntime failed on this input" in answer["error"] and "broadcast" in answer["error"], answer
