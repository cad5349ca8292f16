"""Prediction-log faults under load, for real: a server subprocess, HTTP clients in threads, and the
log folder deleted from under it and turned read-only (a read-only bind mount: chmod does not stop
root), then restored. A log that cannot be written never reaches a client: every answer is a
well-formed HTTP response with its prediction, the fault is said once on stderr and on /metrics,
the log resumes, SIGTERM exits 0; and a phased rollout does not promote through the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgepack.runtime.metrics import ServerMetrics
from edgepack.runtime.models import ModelSpec
from edgepack.runtime.phased import PhasedRoute
from edgepack.runtime.prediction_log import PredictionLog
from edgepack.runtime.rollout_state import COMPLETE, RUNNING, Gates, Rollout, RolloutSpec
from test_serve import ROW, Served, _samples, get
from test_shadow import _candidate

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]
HEALTHY = 'edgepack_prediction_log_healthy{log="predictions.jsonl"}'
DROPPED = 'edgepack_prediction_log_dropped_lines_total{log="predictions.jsonl"}'
ERRORS = 'edgepack_prediction_log_errors_total{log="predictions.jsonl"}'


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def switchable_dir(tmp_path):
    """A folder the test can turn read-only and back: a read-only bind mount of it laid over it
    (files the server holds open stay writable below it, as on a remount; every open, create and
    rename at a path fails with EROFS), then unmounted."""
    folder = tmp_path / "logs"
    folder.mkdir()
    try:
        _read_only(folder, True)
        _read_only(folder, False)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot bind-mount a folder here (needs root or CAP_SYS_ADMIN): {getattr(err, 'stderr', err)}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _read_only(folder: Path, on: bool) -> None:
    if on:
        _mount("--bind", str(folder), str(folder))
        _mount("-o", "remount,ro,bind", str(folder))
    else:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True, text=True)


class Load:
    """Client threads posting /predict: keep-alive connections, renewed every 20 requests so that
    new sockets keep taking fresh descriptor numbers in the server. Every answer is kept."""

    def __init__(self, url: str, threads: int = 4, key_header: bool = False) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.stop = threading.Event()
        self.answers: list[tuple[int | None, bytes]] = []
        self.key_header = key_header
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, n: int) -> None:
        body = json.dumps({"rows": [ROW]}).encode()
        conn, sent = None, 0
        while not self.stop.is_set():
            if conn is None or sent % 20 == 0:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            headers = {"Content-Type": "application/json"}
            if self.key_header:
                headers["X-Rollout-Key"] = f"user-{n}-{sent}"
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                response = conn.getresponse()
                self.answers.append((response.status, response.read()))
            except (OSError, http.client.HTTPException) as err:  # an empty reply, a log line for a status line...
                self.answers.append((None, repr(err).encode()))
                conn.close()
                conn = None
            sent += 1
        if conn is not None:
            conn.close()

    def finish(self) -> list[tuple[int | None, bytes]]:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.answers


def _metrics(url: str) -> dict[str, float]:
    return _samples(get(url + "/metrics")[1])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assert_predictions(answers: list[tuple[int | None, bytes]]) -> None:
    """Each answer a whole HTTP response carrying a prediction: never an error, a log line or nothing."""
    bad = [(status, body[:200]) for status, body in answers if status != 200]
    assert not bad, f"{len(bad)} of {len(answers)} answers were not 200: {bad[:5]}"
    for _, body in answers:
        answer = json.loads(body)
        assert set(answer) == {"model_name", "model_version", "outputs"} and answer["outputs"]["label"], body[:200]


def _log_lines(folder: Path) -> list[dict]:
    lines = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends inside a line"
        assert b"HTTP/1.1" not in data, f"{path.name} holds an HTTP response"
        lines += [json.loads(line) for line in data.splitlines()]
    return lines


def test_a_deleted_then_read_only_log_folder_under_load_never_reaches_a_client(bundle_dir, switchable_dir):
    log_dir = switchable_dir
    served = Served([*SERVE, "--log-dir", str(log_dir), "--log-max-mb", "0.05", "--log-keep", "3",
                     "--log-sample-rate", "0"], bundle_dir)
    load = None
    try:
        load = Load(served.url)
        _wait_for(lambda: len(load.answers) > 300 and (log_dir / "predictions.jsonl.1").exists(), 60,
                  "a first rotation")
        # An operator deletes the log, and the folder turns read-only: the next reopen or rotation fails.
        (log_dir / "predictions.jsonl").unlink()
        _read_only(log_dir, True)
        outage_started = len(load.answers)
        _wait_for(lambda: _metrics(served.url).get(HEALTHY) == 0, 30, "the log to be reported failing")
        time.sleep(2)  # under load while it fails: retries back off, lines are dropped
        during = _metrics(served.url)
        assert during[HEALTHY] == 0 and during[DROPPED] > 0
        _read_only(log_dir, False)
        restored_at = time.time()
        _wait_for(lambda: _metrics(served.url).get(HEALTHY) == 1, 30, "the log to be written again")
        time.sleep(0.5)
        answers = load.finish()
        after = _metrics(served.url)
    finally:
        if load is not None:
            load.finish()
        code = served.stop()
    assert code == 0, "".join(served.log)
    assert "stopped serving classifier" in served.log[-1], served.log[-3:]
    _assert_predictions(answers)
    failing = [line for line in served.log if line.startswith("prediction log: cannot write")]
    recovered = [line for line in served.log if line.startswith("prediction log: writing")]
    assert len(failing) == 1 and len(recovered) == 1, served.log
    assert "Read-only file system" in failing[0] or "No such file" in failing[0], failing
    assert f"{int(after[DROPPED])} lines dropped" in recovered[0], (recovered, after[DROPPED])
    lines = _log_lines(log_dir)
    assert all(line["role"] == "primary" and line["status"] == 200 for line in lines)
    assert any(line["time"] > restored_at for line in lines), "the log did not resume"
    print(f"\nlog outage under load: {len(answers)} requests ({outage_started} before the outage), all 200; "
          f"{int(after[DROPPED])} log lines dropped, {int(after[ERRORS])} "
          f"failed attempts; stderr: {len(failing)} failing + {len(recovered)} recovered line(s) of {len(served.log)}")


def test_a_phased_rollout_holds_a_complete_step_while_its_log_cannot_be_written(bundle_dir, switchable_dir, tmp_path):
    same = _candidate(bundle_dir, tmp_path / "same", "same", lambda path: None)
    log_dir, state_dir = switchable_dir, tmp_path / "state"
    served = Served([*SERVE, "--phased", str(same), "--state-dir", str(state_dir), "--log-dir", str(log_dir),
                     "--log-sample-rate", "0", "--steps", "50,100", "--min-samples", "30", "--step-duration", "0"],
                    bundle_dir)
    load = None
    try:
        (log_dir / "predictions.jsonl").unlink()
        _read_only(log_dir, True)
        time.sleep(1.2)  # past the log's check of its file: the next write finds it gone
        load = Load(served.url, threads=2, key_header=True)
        _wait_for(lambda: _metrics(served.url).get(HEALTHY) == 0, 30, "the log to be reported failing")
        _wait_for(lambda: _status(served.url)["figures"]["candidate_requests"] >= 90, 60, "3x the step's samples")
        held = _status(served.url)
        assert (held["state"], held["step"], held["weight"]) == (RUNNING, 1, 50), held
        assert "cannot be written" in held["held"] and held["figures"]["errors"] == 0
        assert [e["event"] for e in held["history"]] == ["start"]
        _read_only(log_dir, False)
        restored_at = time.time()
        _wait_for(lambda: _status(served.url)["state"] == COMPLETE, 60, "the rollout to complete")
        answers = load.finish()
        final = _status(served.url)
    finally:
        if load is not None:
            load.finish()
        code = served.stop()
    assert code == 0, "".join(served.log)
    _assert_predictions(answers)
    promotions = [e for e in final["history"] if e["event"] == "promote"]
    assert len(promotions) == 2 and promotions[0]["time"] >= restored_at - 0.01, final["history"]
    assert final["held"] is None
    holds = [line for line in served.log if "held: the prediction log" in line]
    assert len(holds) == 1 and sum("no longer held" in line for line in served.log) == 1, served.log
    print(f"\nrollout through a log outage: {len(answers)} requests, all 200; held at step 1 with "
          f"{held['figures']['candidate_requests']} candidate requests (min 30), promoted after the restore")


def _status(url: str) -> dict:
    status, answer = get(url + "/admin/rollout")
    assert status == 200, answer
    return answer


def test_a_5xx_sent_for_a_candidate_answer_is_its_error_and_fails_the_step(bundle_dir, tmp_path):
    """In process, real sessions: the route is told the status each answer was sent with, and
    candidate answers that went out as 503 roll the rollout back instead of promoting it."""
    same = _candidate(bundle_dir, tmp_path / "same", "same", lambda path: None)
    spec = ModelSpec.from_bundle(bundle_dir, json.loads((bundle_dir / "manifest.json").read_text()), 1)
    candidate = ModelSpec.from_bundle(same, json.loads((same / "manifest.json").read_text()), 1)
    rollout_spec = RolloutSpec(steps=(100.0,), min_samples=20, step_duration_s=0, gates=Gates(max_error_rate=0.1)).check()
    rollout = Rollout.start(rollout_spec, spec.name, spec.version, candidate.version, time.time())
    route = PhasedRoute(spec, candidate, "loop", ServerMetrics(), None, rollout, tmp_path / "state")
    route.load()
    feed = {"X": np.asarray([ROW], dtype=np.float32)}

    async def requests(status: int, count: int) -> None:
        for _ in range(count):
            answer = await route.infer(None, feed, "r")
            assert answer.version == "same"
            answer.settle(status)

    try:
        asyncio.run(requests(503, 1))
        asyncio.run(requests(200, 5))
        assert (rollout.counts.candidate, rollout.counts.errors, rollout.state) == (6, 1, RUNNING)
        asyncio.run(requests(503, 2))  # 3 of a 20-request budget: past the 10% the error gate allows
        assert rollout.state == "rolled_back", rollout.history[-1]
        assert "gate failed: error rate: 3 of 8" in rollout.history[-1]["reason"]
    finally:
        route.close()


def test_a_complete_step_is_held_while_evidence_is_missing_and_still_rolled_back_on_a_failing_gate():
    rollout = Rollout.start(RolloutSpec(steps=(50.0, 100.0), min_samples=10, step_duration_s=0).check(),
                            "m", "1", "2", now=0)
    for _ in range(30):
        assert rollout.record_candidate(True, 1, now=1, hold="the prediction log cannot be written") is None
    assert (rollout.state, rollout.step) == (RUNNING, 0)
    assert rollout.evaluate(now=2)["event"] == "promote"  # the hold cleared: the complete step passes
    decision = rollout.record_candidate(False, 1, now=3, hold="the prediction log cannot be written")
    assert decision["event"] == "rollback"  # 1 of a 10-request budget is past 1%: a hold never stops a rollback


def test_the_log_survives_its_file_being_deleted_and_a_full_disk(tmp_path):
    """PredictionLog alone: a deleted file is replaced by a new one; a full tmpfs drops and counts
    lines without a torn one; a closed descriptor is never written to or closed again."""
    import edgepack.runtime.prediction_log as prediction_log

    folder = tmp_path / "small"
    folder.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder))
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {getattr(err, 'stderr', err)}")
    try:
        log = PredictionLog(folder, 0, max_mb=1)
        record = {"id": "x" * 200}
        assert log.write(record)
        (folder / "predictions.jsonl").unlink()
        with contextlib.suppress(AttributeError):
            log._checked_at -= prediction_log.CHECK_S  # as if a second had passed
        assert log.write(record) and (folder / "predictions.jsonl").stat().st_size > 0  # a new file
        results = [log.write({"id": str(n), "pad": "y" * 1000}) for n in range(200)]
        assert not all(results) and not log.healthy and log.dropped == results.count(False)
        data = (folder / "predictions.jsonl").read_bytes()
        assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())
        (folder / "predictions.jsonl").unlink()  # room again
        log._retry_at = 0
        assert log.write(record) and log.healthy
        log.close()
        log.close()  # twice: nothing to close the second time
        assert log._fd is None
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_failing_shadow_with_an_unwritable_log_says_each_fault_once_and_stops_cleanly(bundle_dir, switchable_dir,
                                                                                      tmp_path):
    """Shadow mode, a candidate failing on every request, both logs deleted and the folder
    read-only: every answer is the primary's; stderr holds one line per fault, not one per
    request; SIGTERM while the folder is still read-only exits 0."""
    from test_serve import _failing_model, post

    failing = _candidate(bundle_dir, tmp_path / "failing", "failing", _failing_model)  # fails past one row
    log_dir, count = switchable_dir, 300
    served = Served([*SERVE, "--shadow", str(failing), "--log-dir", str(log_dir), "--log-sample-rate", "0"],
                    bundle_dir)
    try:
        assert post(served.url + "/predict", {"rows": [ROW, ROW]})[0] == 200  # the worker opens shadow.jsonl
        _wait_for(lambda: (log_dir / "shadow.jsonl").exists(), 30, "the first shadow line")
        for name in ("predictions.jsonl", "shadow.jsonl"):
            (log_dir / name).unlink()
        _read_only(log_dir, True)
        time.sleep(1.2)  # past both logs' check of their file
        answers = [post(served.url + "/predict", {"rows": [ROW, ROW]}) for _ in range(count)]
        assert all(status == 200 and len(answer["outputs"]["label"]) == 2 for status, answer in answers)
        key = '{model="classifier",version="failing"}'
        _wait_for(lambda: _metrics(served.url).get(f"edgepack_shadow_requests_total{key}", 0)
                  + _metrics(served.url).get(f"edgepack_shadow_dropped_total{key}", 0) == count + 1, 60,
                  "every shadow run")
        samples = _metrics(served.url)
        ran = samples[f"edgepack_shadow_requests_total{key}"]
        assert samples[f"edgepack_shadow_errors_total{key}"] == ran > count / 2, samples
        assert samples[HEALTHY] == 0 and samples['edgepack_prediction_log_healthy{log="shadow.jsonl"}'] == 0
        assert samples['edgepack_prediction_log_dropped_lines_total{log="shadow.jsonl"}'] >= ran - 1
    finally:
        code = served.stop()  # still read-only
    assert code == 0, "".join(served.log)
    assert "stopped serving classifier" in served.log[-1], served.log[-3:]
    said = [line for line in served.log if not line.startswith(("serving ", "stopped serving", "  "))]
    assert sum("prediction log: cannot write" in line and "predictions.jsonl" in line for line in said) == 1, said
    assert sum("prediction log: cannot write" in line and "shadow.jsonl" in line for line in said) == 1, said
    assert sum(line.startswith("shadow: the candidate classifier failing fails") for line in said) == 1, said
    assert len(said) <= 5, said  # no onnxruntime line per run, no line per request
    print(f"\nfailing shadow, unwritable log: {count + 1} requests all 200, {int(ran)} shadow runs failed, "
          f"{len(said)} stderr lines: {said}")
