"""Shadow mode and the prediction log, for real: candidate bundles made here, real server subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app as cli_app
from edgepack.rollout import shadow_report, wilson_interval
from edgepack.runtime.bundle import extract_archive
from test_serve import ROW, Served, _failing_model, _reseal, _samples, get, post

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]


def _candidate(bundle_dir: Path, folder: Path, version: str, write_model) -> Path:
    """A copy of the primary bundle whose model.onnx ``write_model`` replaced, resealed under a new version."""
    root = shutil.copytree(bundle_dir, folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_model(root / "model.onnx")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = version
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _reseal(root)
    return root


def _disagreeing_model(original: Path, threshold: float):
    """The primary's graph, but its label moved to the next class for rows whose feature 4 is above
    ``threshold`` (so the share of disagreement is the share of such rows), and 0.01 added to class
    0's probability (a known float difference)."""

    def write(path: Path) -> None:
        model = onnx.load(original)
        graph = model.graph
        for output in graph.output:
            for node in graph.node:
                node.output[:] = [f"orig_{o}" if o == output.name else o for o in node.output]
                node.input[:] = [f"orig_{i}" if i == output.name else i for i in node.input]
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0.01, 0, 0], dtype=np.float32), "class_bias"),
            numpy_helper.from_array(np.array([4], dtype=np.int64), "col"),
            numpy_helper.from_array(np.array([5], dtype=np.int64), "col_end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
            numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
            numpy_helper.from_array(np.array(3, dtype=np.int64), "classes_count")])
        graph.node.extend([
            helper.make_node("Slice", ["X", "col", "col_end", "axis1"], ["feature"]),
            helper.make_node("Reshape", ["feature", "flat"], ["feature_flat"]),
            helper.make_node("Greater", ["feature_flat", "threshold"], ["flip"]),
            helper.make_node("Add", ["orig_label", "one"], ["next"]),
            helper.make_node("Mod", ["next", "classes_count"], ["next_class"]),
            helper.make_node("Where", ["flip", "next_class", "orig_label"], ["label"]),
            helper.make_node("Add", ["orig_probabilities", "class_bias"], ["probabilities"])])
        onnx.save(model, path)

    return write


def _slow_model(path: Path) -> None:
    """The same signature as the primary, and 40 MatMuls of 1024×1024 per row (one shared weight): 1.7-3 ms a row
    here, 30-60× the primary."""
    rng = np.random.default_rng(0)
    width, depth = 1024, 40
    constants = [numpy_helper.from_array(rng.normal(size=(6, width)).astype(np.float32), "w_in"),
                 numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.normal(size=(width, 3)).astype(np.float32), "w_out")]
    nodes, last = [helper.make_node("MatMul", ["X", "w_in"], ["h0"])], "h0"
    for layer in range(depth):
        nodes += [helper.make_node("MatMul", [last, "w"], [f"m{layer}"]),
                  helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"])]
        last = f"h{layer + 1}"
    nodes += [helper.make_node("MatMul", [last, "w_out"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
              helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
                              constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _lines(log_dir: Path) -> list[dict]:
    out = []
    for path in sorted(log_dir.iterdir()):
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path.name} ends inside a line"
        out += [json.loads(line) for line in data.splitlines()]
    return out


def _metric(url: str, key: str) -> float:
    return _samples(get(url + "/metrics")[1]).get(key, 0)


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running, not gone or a zombie waiting for a parent (an init that does not reap, in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _infer(url: str, batch: np.ndarray, request_id: str) -> tuple[int, dict]:
    return post(url + "/v2/models/classifier/infer",
                {"id": request_id, "inputs": [{"name": "X", "shape": list(batch.shape), "datatype": "FP32",
                                               "data": batch.reshape(-1).tolist()}]})


def test_same_model_agrees_fully_and_a_killed_server_keeps_every_acknowledged_line(built_bundle, tmp_path, rows):
    """edgepack serve ARCHIVE --shadow ARCHIVE; then kill -9: every answered request has its whole line."""
    log_dir = tmp_path / "log"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    served = Served([sys.executable, "-m", "edgepack", "serve", str(built_bundle), "--port", "0", "--shadow",
                     str(built_bundle), "--log-dir", str(log_dir), "--log-sample-rate", "1"], tmp_path, env)
    count = 40
    try:
        _wait_for(lambda: any(line.startswith("shadowing classifier with classifier") for line in served.log))
        models = get(served.url + "/v2/models")[1]["models"]
        assert [m["name"] for m in models] == ["classifier"]  # the candidate is not addressable
        for i in range(count):
            status, answer = _infer(served.url, rows[i:i + 3], f"same-{i}")
            assert status == 200 and answer["id"] == "same-{}".format(i)
        version = json.loads(extract_archive(built_bundle, tmp_path / "x").joinpath("manifest.json").read_text())["version"]
        key = f'edgepack_shadow_requests_total{{model="classifier",version="{version}"}}'
        _wait_for(lambda: _metric(served.url, key) == count)
        agree = _metric(served.url, f'edgepack_shadow_agreement_total{{model="classifier",version="{version}",result="agree"}}')
        assert agree == 3 * count
        workers = _children(served.process.pid)
        assert len(workers) == 1  # the candidate's own process
    finally:
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=30)
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 30)  # a killed server leaves no worker behind
    records = _lines(log_dir)
    primary = [r for r in records if r["role"] == "primary"]
    assert [r["id"] for r in primary] == [f"same-{i}" for i in range(count)]
    first = primary[0]
    assert first["status"] == 200 and first["model"] == "classifier" and first["version"] == version
    assert first["endpoint"] == "infer" and first["shadow"] == "queued" and first["latency_ms"] > 0
    assert len(first["inputs_sha256"]) == 64 and np.allclose(first["inputs"]["X"], rows[0:3])
    assert first["outputs"]["label"] == [int(v) for v in first["outputs"]["label"]]
    pairs = [r for r in records if r["role"] == "shadow"]
    assert len(pairs) == count and all(p["rows"] == p["agreed_rows"] == 3 and p["max_abs_diff"] == 0 for p in pairs)
    summary = shadow_report(log_dir)
    assert (summary.pairs, summary.rows, summary.agreement, summary.candidate_errors) == (count, 3 * count, 1.0, 0)
    done = CliRunner().invoke(cli_app, ["rollout", "report", "--log-dir", str(log_dir), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["agreement"] == 1.0


def test_a_failing_candidate_never_changes_the_primary_answer(bundle_dir, tmp_path, rows):
    candidate = _candidate(bundle_dir, tmp_path / "failing", "failing", _failing_model)  # fails past one row
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--shadow", str(candidate), "--log-dir", str(log_dir)], bundle_dir)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    try:
        for i in range(10):
            status, answer = _infer(served.url, rows[i:i + 2], f"fail-{i}")
            assert status == 200
            expected = session.run(["label"], {"X": rows[i:i + 2]})[0]
            assert answer["outputs"][0]["data"] == expected.tolist()
        _wait_for(lambda: _metric(served.url, 'edgepack_shadow_errors_total{model="classifier",version="failing"}') == 10)
    finally:
        assert served.stop() == 0
    summary = shadow_report(log_dir)
    assert summary.candidate_errors == 10 and summary.rows == 0 and summary.agreement is None
    errors = [r["candidate"]["error"] for r in _lines(log_dir) if r["role"] == "shadow"]
    assert len(errors) == 10 and all("onnxruntime failed" in e for e in errors)


def test_a_slow_candidate_is_dropped_when_flooded_and_the_primary_answers_all(bundle_dir, tmp_path, rows):
    candidate = _candidate(bundle_dir, tmp_path / "slow", "slow", _slow_model)
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--shadow", str(candidate), "--shadow-queue", "2", "--log-dir", str(log_dir)], bundle_dir)
    count = 200
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: _infer(served.url, rows[i % 300:i % 300 + 1], f"slow-{i}")[0],
                                     range(count)))
        assert statuses == [200] * count
        dropped = _metric(served.url, 'edgepack_shadow_dropped_total{model="classifier",version="slow"}')
        assert dropped > 0
        ran = 'edgepack_shadow_requests_total{model="classifier",version="slow"}'
        _wait_for(lambda: _metric(served.url, ran) == count - dropped)
    finally:
        assert served.stop() == 0
    summary = shadow_report(log_dir)
    assert summary.requests == count and summary.dropped == dropped and summary.pairs == count - dropped
    assert summary.p50_ratio is not None and summary.p50_ratio > 10  # it is the slow one, and measured as such


def test_requests_larger_than_the_pipe_reach_the_candidate_whole(bundle_dir, tmp_path):
    """A frame of 4,000 rows (~100 KB) does not fit the worker's pipe at once: the rest is written
    when the pipe drains, in order, and every pair compares all of its rows."""
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--shadow", str(bundle_dir), "--log-dir", str(log_dir)], bundle_dir)
    batch = np.random.default_rng(1).normal(size=(4000, 6)).astype(np.float32)
    try:
        for i in range(6):
            assert _infer(served.url, batch + i, f"big-{i}")[0] == 200
        version = json.loads((bundle_dir / "manifest.json").read_text())["version"]
        _wait_for(lambda: _metric(served.url, f'edgepack_shadow_requests_total{{model="classifier",version="{version}"}}')
                  == 6)
        agreed = _metric(served.url, f'edgepack_shadow_agreement_total{{model="classifier",version="{version}",result="agree"}}')
        assert agreed == 6 * 4000
    finally:
        assert served.stop() == 0
    pairs = [r for r in _lines(log_dir) if r["role"] == "shadow"]
    assert [p["id"] for p in pairs] == [f"big-{i}" for i in range(6)]
    assert all(p["rows"] == p["agreed_rows"] == 4000 and p["max_abs_diff"] == 0 for p in pairs)


def test_a_candidate_process_that_dies_stops_the_shadow_not_the_primary(bundle_dir, tmp_path, rows):
    served = Served([*SERVE, "--shadow", str(bundle_dir), "--shadow-queue", "4"], bundle_dir)
    version = json.loads((bundle_dir / "manifest.json").read_text())["version"]
    dropped = f'edgepack_shadow_dropped_total{{model="classifier",version="{version}"}}'
    try:
        assert _infer(served.url, rows[:2], "before")[0] == 200
        (worker,) = _children(served.process.pid)
        os.kill(worker, signal.SIGKILL)
        _wait_for(lambda: any("the candidate's process stopped" in line for line in served.log))
        for i in range(20):
            status, answer = _infer(served.url, rows[i:i + 1], f"after-{i}")
            assert status == 200 and answer["id"] == f"after-{i}"
        assert _metric(served.url, dropped) >= 20 - 4  # past the queue's 4, every pair is dropped
    finally:
        assert served.stop() == 0


def test_rollout_report_agreement_interval_holds_the_truth(bundle_dir, tmp_path, rows):
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"X": rows})[0]
    threshold = float(np.quantile(rows[:, 4], 0.7))  # about 30% of the rows disagree
    candidate = _candidate(bundle_dir, tmp_path / "biased", "biased",
                           _disagreeing_model(bundle_dir / "model.onnx", threshold))
    theirs = ort.InferenceSession(str(candidate / "model.onnx"), providers=["CPUExecutionProvider"])
    truth = float(np.mean(theirs.run(["label"], {"X": rows})[0] == labels))
    assert 0.6 < truth < 0.8
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--shadow", str(candidate), "--log-dir", str(log_dir)], bundle_dir)
    try:
        for start in range(0, len(rows), 5):
            assert _infer(served.url, rows[start:start + 5], f"bias-{start}")[0] == 200
        _wait_for(lambda: _metric(served.url, 'edgepack_shadow_requests_total{model="classifier",version="biased"}')
                  == len(rows) // 5)
    finally:
        assert served.stop() == 0
    summary = shadow_report(log_dir)
    low, high = summary.agreement_95
    assert summary.rows == len(rows) and low <= truth <= high and summary.agreement == pytest.approx(truth)
    assert summary.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    done = CliRunner().invoke(cli_app, ["rollout", "report", "--log-dir", str(log_dir)])
    assert done.exit_code == 0 and f"agreement: {truth:.1%} of {len(rows)} rows" in done.stdout, done.output


def test_the_log_rotates_within_its_bounds_and_every_line_parses(bundle_dir, tmp_path):
    log_dir = tmp_path / "log"
    served = Served([*SERVE, "--log-dir", str(log_dir), "--log-max-mb", "0.002", "--log-keep", "3"], bundle_dir)
    try:
        for i in range(60):
            assert post(served.url + "/predict", {"rows": [ROW]}, **{"X-Request-Id": f"rot-{i}"})[0] == 200
        assert post(served.url + "/predict", {"rows": [ROW[:5]]})[0] == 400  # refusals are logged too
    finally:
        assert served.stop() == 0
    files = sorted(p.name for p in log_dir.iterdir())
    assert files == ["predictions.jsonl", "predictions.jsonl.1", "predictions.jsonl.2"]
    assert all(p.stat().st_size <= 2048 for p in log_dir.iterdir())
    records = [json.loads(line) for name in ("predictions.jsonl.2", "predictions.jsonl.1", "predictions.jsonl")
               for line in (log_dir / name).read_bytes().splitlines()]
    ids = [r["id"] for r in records[:-1]]
    assert ids == [f"rot-{i}" for i in range(60 - len(ids), 60)]  # the newest lines, in order, none lost between parts
    assert records[-1]["status"] == 400 and "5 at dimension 1" in records[-1]["error"]


def test_wilson_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(70, 100)
    assert 0.60 < low < 0.61 and 0.78 < high < 0.79
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and 0.72 < wilson_interval(10, 10)[0] < 0.73


def test_shadow_and_report_errors_are_one_line(built_bundle, bundle_dir, tmp_path):
    runner = CliRunner()
    other = shutil.copytree(bundle_dir, tmp_path / "other", ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [manifest["inputs"][0]["shape"][0], 7]
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _reseal(other)
    log_dir = tmp_path / "log"
    mismatch = runner.invoke(cli_app, ["serve", str(built_bundle), "--port", "0", "--shadow", str(other),
                                       "--log-dir", str(log_dir)])
    assert_one_line_error(mismatch, 3, "takes X (FP32 [-1, 7]), the primary classifier takes X (FP32 [-1, 6])")
    assert not log_dir.exists()  # refused before anything was written
    broken = _candidate(bundle_dir, tmp_path / "broken", "broken", lambda path: path.write_bytes(b"not onnx"))
    unloadable = runner.invoke(cli_app, ["serve", str(built_bundle), "--port", "0", "--shadow", str(broken)])
    assert_one_line_error(unloadable, 8, "--shadow classifier broken: the candidate could not be loaded: onnxruntime")
    missing = runner.invoke(cli_app, ["serve", str(built_bundle), "--shadow", str(tmp_path / "none.tar.gz")])
    assert_one_line_error(missing, 3, "--shadow")
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "report", "--log-dir", str(tmp_path / "no")]), 3,
                          "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "report", "--log-dir", str(empty)]), 3,
                          "no predictions.jsonl")
    (empty / "predictions.jsonl").write_bytes(b"")
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "report", "--log-dir", str(empty)]), 3, "is empty")
    (empty / "predictions.jsonl").write_bytes(b'{"role": "primary"}\n{"role": "sha')
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "report", "--log-dir", str(empty)]), 3,
                          "predictions.jsonl:2: not a JSON line")
    (empty / "predictions.jsonl").write_bytes(b'{"role": "primary", "id": "a"}\n')
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "report", "--log-dir", str(empty)]), 3,
                          "no shadow pairs")


def test_a_log_that_cannot_be_written_drops_its_lines_and_the_answers_go_on(bundle_dir, tmp_path):
    """A full disk (/dev/full): every request is answered as ever; its line is dropped and counted,
    and stderr says so once, not once per request (README "Prediction log")."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "predictions.jsonl").symlink_to("/dev/full")
    served = Served([*SERVE, "--log-dir", str(log_dir)], bundle_dir)
    try:
        for _ in range(3):
            status, answer = post(served.url + "/predict", {"rows": [ROW]})
            assert status == 200 and answer["outputs"]["label"], answer
        samples = _samples(get(served.url + "/metrics")[1])
        assert samples['edgepack_prediction_log_healthy{log="predictions.jsonl"}'] == 0
        assert samples['edgepack_prediction_log_dropped_lines_total{log="predictions.jsonl"}'] == 3
        assert get(served.url + "/v2/health/ready")[0] == 200
    finally:
        assert served.stop() == 0
    assert sum("prediction log: cannot write" in line and "No space left on device" in line
               for line in served.log) == 1, served.log
