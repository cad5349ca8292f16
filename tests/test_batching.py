"""Requests ready together share one session.run: real models, a real event loop, a real server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app as cli_app
from edgepack.runtime.batching import BACKLOG
from edgepack.runtime.bundle import verify_dir
from edgepack.runtime.errors import InferenceFailed
from edgepack.runtime.models import ModelSpec, ServedModel
from test_serve import Served, _failing_model
from test_shadow import _candidate, _lines

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]


def _model(root: Path, max_batch: int) -> ServedModel:
    return ServedModel(ModelSpec.from_bundle(root, verify_dir(root).manifest, 1), "loop", max_batch)


def _gather_model(path: Path) -> None:
    """The bundle's signature; each row's feature 0, as an integer, indexes a table of 3 classes: a row
    whose feature 0 is outside [0, 3) makes onnxruntime fail, and so would any batch holding it."""
    table = np.eye(3, dtype=np.float32)
    nodes = [helper.make_node("Slice", ["X", "start", "end", "axis"], ["first"]),
             helper.make_node("Reshape", ["first", "flat"], ["column"]),
             helper.make_node("Cast", ["column"], ["index"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "index"], ["probabilities"], axis=0),
             helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    constants = [numpy_helper.from_array(table, "table"),
                 numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
                 numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
                 numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
                 numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
                              constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


async def _together(model: ServedModel, requests: list[tuple[list[str] | None, dict]], arrived: bool = True) -> list:
    """The requests as an HTTP server hands them over when they come in one loop iteration: each
    counted as arrived, then each task saying it started (what http_protocol and the app do)."""

    async def one(names, feed):
        BACKLOG.started()
        return await model.infer(names, feed)

    if arrived:
        for _ in requests:
            BACKLOG.arrived()
    return await asyncio.gather(*(one(names, feed) for names, feed in requests), return_exceptions=True)


def test_requests_ready_together_run_once_and_each_gets_its_own_rows(bundle_dir, rows):
    model = _model(bundle_dir, max_batch=5)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    sizes = [1, 3, 2, 1, 1, 4, 2, 1, 1, 1, 3, 1]
    starts = np.cumsum([0, *sizes[:-1]])
    requests = [(None, {"X": rows[s:s + n]}) for s, n in zip(starts, sizes)]
    answers = asyncio.run(_together(model, requests))
    batches = [batch for _, _, batch in answers]
    assert max(batches) == 5 and batches == [5] * 5 + [5] * 5 + [2] * 2  # 12 requests: 5 + 5 + 2
    for (outputs, run_s, _), (_, feed) in zip(answers, requests):
        alone = dict(zip(["label", "probabilities"], session.run(None, feed)))
        assert np.array_equal(outputs["label"], alone["label"])
        assert np.allclose(outputs["probabilities"], alone["probabilities"], rtol=1e-5, atol=1e-6)
        assert outputs["label"].shape == (feed["X"].shape[0],) and run_s > 0


def test_only_requests_asking_the_same_thing_share_a_run(bundle_dir, rows):
    model = _model(bundle_dir, max_batch=32)
    requests = [(["label"], {"X": rows[0:1]}), (None, {"X": rows[1:2]}), (["label"], {"X": rows[2:4]}),
                (["probabilities"], {"X": rows[4:5]})]
    answers = asyncio.run(_together(model, requests))
    assert [batch for _, _, batch in answers] == [2, 1, 2, 1]
    assert [sorted(outputs) for outputs, _, _ in answers] == [["label"], ["label", "probabilities"], ["label"],
                                                              ["probabilities"]]
    assert answers[2][0]["label"].shape == (2,)


def test_a_lone_request_and_max_batch_1_run_alone(bundle_dir, rows):
    model = _model(bundle_dir, max_batch=32)
    one = asyncio.run(_together(model, [(None, {"X": rows[:2]})]))
    assert one[0][2] == 1 and BACKLOG.waiting == 0
    # Requests the server did not see arrive together (one connection, one after the other) run at once.
    apart = asyncio.run(_together(model, [(None, {"X": rows[i:i + 1]}) for i in range(4)], arrived=False))
    assert [batch for _, _, batch in apart] == [1] * 4
    off = _model(bundle_dir, max_batch=1)
    assert "requests ready together" not in off.where()
    assert [batch for _, _, batch in asyncio.run(_together(off, [(None, {"X": rows[i:i + 1]}) for i in range(4)]))] == [1] * 4


def test_a_request_that_fails_the_batch_fails_alone(bundle_dir, tmp_path, rows):
    root = _candidate(bundle_dir, tmp_path / "gather", "gather", _gather_model)
    model = _model(root, max_batch=32)
    good = np.zeros((1, 6), dtype=np.float32)
    poison = np.full((1, 6), 7, dtype=np.float32)  # index 7 of a table of 3
    answers = asyncio.run(_together(model, [(None, {"X": good + i % 3}) for i in range(3)] + [(None, {"X": poison})]
                                    + [(None, {"X": good + 2})]))
    assert isinstance(answers[3], InferenceFailed)
    assert [list(a[0]["label"]) for i, a in enumerate(answers) if i != 3] == [[0], [1], [2], [2]]
    assert all(a[2] == 1 for i, a in enumerate(answers) if i != 3)  # run again one by one


def test_a_model_whose_rows_are_not_independent_is_not_batched(bundle_dir, tmp_path, rows):
    root = _candidate(bundle_dir, tmp_path / "one-row", "one-row", _failing_model)  # runs one row, fails on two
    model = _model(root, max_batch=32)
    assert "requests ready together" not in model.where()
    answers = asyncio.run(_together(model, [(None, {"X": rows[i:i + 1]}) for i in range(4)]))
    assert [a[2] for a in answers] == [1] * 4


def test_a_request_of_many_rows_runs_in_parts_with_the_same_answer(bundle_dir, rows, monkeypatch):
    """Large requests run in parts of EDGEPACK_MAX_ROWS_PER_RUN rows (onnxruntime's activations grow
    with a run's rows); the joined answer is the one run's, row for row."""
    many = np.concatenate([rows] * 20)[:205]
    whole = _model(bundle_dir, max_batch=1).session.run(None, {"X": many})
    monkeypatch.setenv("EDGEPACK_MAX_ROWS_PER_RUN", "16")
    model = _model(bundle_dir, max_batch=1)
    calls = []
    once = model._run_once
    model._run_once = lambda names, feed: calls.append(len(feed["X"])) or once(names, feed)
    answer = model.run(None, {"X": many})
    assert calls == [16] * 12 + [13]
    for name, expected in zip(answer, whole):
        np.testing.assert_allclose(answer[name], expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("EDGEPACK_MAX_ROWS_PER_RUN", "0")
    unlimited = _model(bundle_dir, max_batch=1)
    assert unlimited._chunk_rows is None


def test_a_model_whose_rows_are_not_independent_is_never_split(bundle_dir, tmp_path, rows, monkeypatch):
    monkeypatch.setenv("EDGEPACK_MAX_ROWS_PER_RUN", "1")
    root = _candidate(bundle_dir, tmp_path / "one-row", "one-row", _failing_model)
    assert _model(root, max_batch=1)._chunk_rows is None


def test_max_batch_below_1_is_a_one_line_error(bundle_dir):
    done = CliRunner().invoke(cli_app, ["serve", str(bundle_dir), "--port", "0", "--max-batch", "0"])
    assert_one_line_error(done, 3, "--max-batch 0: expected at least 1")


def test_a_server_batches_a_burst_and_answers_each_client_its_own_rows(bundle_dir, tmp_path, rows):
    """16 connections, each sending one request at the same moment: the answers are each request's
    own, as in-process onnxruntime gives them, and the log shows runs shared by several requests."""
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--log-dir", str(log_dir)], bundle_dir)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    try:
        assert "requests ready together in one run" in "".join(served.log)
        sockets = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(16)]
        shared = 0
        for burst in range(30):
            requests = []
            for i, sock in enumerate(sockets):
                row = rows[(burst * 16 + i) % len(rows)][None]
                body = json.dumps({"id": f"b{burst}-{i}", "inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32",
                                                                      "data": row.reshape(-1).tolist()}]}).encode()
                requests.append((row, b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
            for sock, (_, request) in zip(sockets, requests):
                sock.sendall(request)
            for sock, (row, _) in zip(sockets, requests):
                answer = _read_response(sock)
                expected = session.run(None, {"X": row})
                outputs = {o["name"]: o["data"] for o in answer["outputs"]}
                assert outputs["label"] == expected[0].tolist()
                assert np.allclose(outputs["probabilities"], expected[1].reshape(-1), rtol=1e-5, atol=1e-6)
            shared = sum(1 for r in _lines(log_dir) if r.get("batch", 1) > 1)
            if shared:
                break
        assert shared, "no two requests of 30 bursts of 16 shared a run"
        for sock in sockets:
            sock.close()
    finally:
        served.process.terminate()
        served.process.wait(timeout=30)


def _read_response(sock: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return json.loads(body)
