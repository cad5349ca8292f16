"""Phased rollout, for real: candidate bundles made here, real server subprocesses, the real CLI.

The gate arithmetic is checked on its own first (plain numbers in, decisions out), then each fault
is injected through a real server: a candidate that disagrees on ~30% of rows, one that fails,
one 10× slower; a good one promoted to the end; a kill -9 mid-rollout; operators steering it
through the admin endpoints and through the state file while the server is down.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app as cli_app
from edgepack.rollout import PhasedReport, report
from edgepack.runtime.errors import InputError
from edgepack.runtime.rollout_state import (COMPLETE, ROLLED_BACK, RUNNING, Gates, Rollout, RolloutSpec, StateLock,
                                            load, save, spec_from)
from edgepack.runtime.phased import bucket, row_agreement
from test_serve import Served, _failing_model, get
from test_shadow import _candidate, _disagreeing_model, _lines, _slow_model, _wait_for

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]


@pytest.fixture(scope="module")
def primary_version(bundle_dir) -> str:
    return json.loads((bundle_dir / "manifest.json").read_text())["version"]


@pytest.fixture(scope="module")
def same_model(bundle_dir, tmp_path_factory) -> Path:
    """The primary's model under another version: a candidate that agrees on everything."""
    return _candidate(bundle_dir, tmp_path_factory.mktemp("same") / "b", "same", lambda path: None)


class Client:
    """One keep-alive connection: hundreds of requests a second from the test process."""

    def __init__(self, url: str, token: str | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.token = token

    def call(self, method: str, path: str, payload: object = None, **headers: str) -> tuple[int, dict]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **headers}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def predict(self, rows: np.ndarray, key: str | None = None) -> tuple[int, dict]:
        headers = {"X-Rollout-Key": key} if key is not None else {}
        return self.call("POST", "/predict", {"rows": rows.tolist()}, **headers)

    def status(self) -> dict:
        status, answer = self.call("GET", "/admin/rollout")
        assert status == 200, answer
        return answer


def _phased(bundle_dir: Path, candidate: Path, state_dir: Path, *flags: str, log_dir: Path | None = None) -> Served:
    command = [*SERVE, "--phased", str(candidate), "--state-dir", str(state_dir), *flags]
    if log_dir is not None:
        command += ["--log-dir", str(log_dir), "--log-sample-rate", "0"]
    return Served(command, bundle_dir)


# -- the arithmetic ----------------------------------------------------------------------------

def test_gates_fail_once_the_step_cannot_pass_and_promote_when_it_has():
    spec = RolloutSpec(steps=(10, 50, 100), min_samples=100, step_duration_s=0,
                       gates=Gates(max_error_rate=0.05, max_p99_ms=10)).check()
    rollout = Rollout.start(spec, "m", "v1", "v2", now=0)
    assert (rollout.state, rollout.step, rollout.weight) == (RUNNING, 0, 10)
    for _ in range(5):  # 5 errors of a 100-sample budget: still within 5%
        assert rollout.record_candidate(False, 1, now=1) is None
    decision = rollout.record_candidate(False, 1, now=1)  # the 6th: the step cannot pass any more
    assert decision["event"] == "rollback" and "6 of 6 candidate requests failed" in decision["reason"]
    assert (rollout.state, rollout.weight) == (ROLLED_BACK, 0)
    assert rollout.record_candidate(True, 1, now=2) is None  # rolled back: nothing more is decided

    rollout.steer("promote", 3, "retry")  # from a rollback: the same step, afresh
    assert (rollout.state, rollout.step, rollout.counts.candidate) == (RUNNING, 0, 0)
    assert rollout.record_candidate(True, 50, now=4) is None  # one slow request of 100 is the 1% a p99 allows
    decisions = [rollout.record_candidate(True, 1, now=4) for _ in range(99)]
    assert [d["event"] for d in decisions if d] == ["promote"] and decisions[-1]["figures"]["slow"] == 1
    assert (rollout.step, rollout.weight) == (1, 50)
    rollout.record_candidate(True, 50, now=5)
    assert rollout.record_candidate(True, 50, now=5)["reason"].startswith("gate failed: p99: 2 of 2")

    rollout = Rollout.start(RolloutSpec(steps=(50, 100), min_samples=3, step_duration_s=10).check(), "m", "a", "b", 0)
    for _ in range(3):
        rollout.record_candidate(True, 1, now=1)
    assert rollout.evaluate(now=9) is None and rollout.evaluate(now=10)["event"] == "promote"  # duration too
    for _ in range(3):
        rollout.record_candidate(True, 1, now=11)
    assert rollout.evaluate(now=20)["state"] == COMPLETE and rollout.weight == 100
    with pytest.raises(InputError, match="already complete"):
        rollout.steer("promote", 21, "")
    rollout.steer("rollback", 22, "a late regression")
    with pytest.raises(InputError, match="already rolled back"):
        rollout.steer("rollback", 23, "")


def test_agreement_gate_counts_rows_against_its_checked_budget():
    spec = RolloutSpec(min_samples=200, agreement_sample=0.5, step_duration_s=0,
                       gates=Gates(max_error_rate=None, min_agreement=0.9)).check()
    assert spec.min_checked_rows == 100
    rollout = Rollout.start(spec, "m", "a", "b", 0)
    assert rollout.record_check(rows=20, agreed=10, now=1) is None  # 10 disagreed of a 100-row budget: 10%
    assert "11 of 21 checked rows disagreed" in rollout.record_check(rows=1, agreed=0, now=1)["reason"]
    passing = Rollout.start(spec, "m", "a", "b", 0)
    for _ in range(200):
        passing.record_candidate(True, 1, now=1)
    assert passing.state == RUNNING and passing.step == 0  # enough requests, not yet enough checked rows
    assert passing.record_check(rows=100, agreed=95, now=2)["event"] == "promote"


def test_row_agreement_by_label_or_tolerance():
    labels_a = {"label": np.array([0, 1, 2]), "probabilities": np.eye(3, dtype=np.float32)}
    labels_b = {"label": np.array([0, 2, 2]), "probabilities": np.eye(3, dtype=np.float32)}
    assert row_agreement(labels_a, labels_b, 1e-3) == (3, 2)
    values = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    assert row_agreement({"y": values}, {"y": values + np.array([[0], [1e-5], [0.1]], np.float32)}, 1e-3) == (3, 2)


def test_sticky_buckets_split_by_weight_and_differ_between_rollouts():
    keys = [f"user-{i}" for i in range(20000)]
    points = [bucket("salt-a", k) for k in keys]
    assert points == [bucket("salt-a", k) for k in keys]  # the same key, the same point
    assert all(0 <= p < 100 for p in points)
    for weight in (10, 50):
        assert abs(sum(p < weight for p in points) / len(points) - weight / 100) < 0.01
    other = [bucket("salt-b", k) for k in keys]
    assert abs(sum((a < 10) and (b < 10) for a, b in zip(points, other)) / len(keys) - 0.01) < 0.005  # independent


def test_spec_files_and_flags(tmp_path):
    toml = tmp_path / "rollout.toml"
    toml.write_text('[rollout]\nsteps = [5, 25, 100]\nmin_samples = 50\nkey_header = "x-user"\n'
                    "[rollout.gates]\nmax_p99_ms = 4\nmin_agreement = 0.97\n")
    spec = spec_from(toml, min_samples=80)
    assert (spec.steps, spec.min_samples, spec.key_header) == ((5, 25, 100), 80, "x-user")
    assert spec.gates == Gates(max_error_rate=0.01, max_p99_ms=4, min_agreement=0.97)
    as_json = tmp_path / "rollout.json"
    as_json.write_text(json.dumps(spec.to_json()))
    assert spec_from(as_json) == spec
    assert spec_from(None, steps="20,100", max_error_rate=0.02).steps == (20, 100)
    for text, message in [('steps = [50, 10]', "expected increasing percentages"),
                          ('stpes = [10]', "unknown key stpes"),
                          ('[gates]\nmin_agreement = 2', "min_agreement 2"),
                          ('steps = [10', "not valid TOML")]:
        toml.write_text(text)
        with pytest.raises(InputError, match=message):
            spec_from(toml)


def test_state_file_round_trip_and_lock(tmp_path):
    rollout = Rollout.start(RolloutSpec(), "m", "a", "b", 0)
    rollout.record_candidate(True, 1, now=1)
    save(tmp_path, rollout.to_json())
    again = load(tmp_path)
    assert again.to_json() == rollout.to_json() and again.counts.candidate == 1
    assert [p.name for p in tmp_path.iterdir()] == ["rollout.json"]  # no temporary file left
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    (tmp_path / "rollout.json").write_text('{"format": 1, "spec": {}}')
    with pytest.raises(InputError, match="not a rollout state file"):
        load(tmp_path)


# -- real servers ------------------------------------------------------------------------------

def test_a_good_candidate_is_promoted_step_by_step_and_assignment_is_sticky(bundle_dir, same_model, tmp_path, rows,
                                                                             primary_version):
    state_dir, log_dir = tmp_path / "state", tmp_path / "log"
    served = _phased(bundle_dir, same_model, state_dir, "--steps", "10,50,100", "--min-samples", "20",
                     "--step-duration", "0", "--min-agreement", "0.99", "--agreement-sample", "1",
                     "--max-p99-ms", "2000", log_dir=log_dir)
    client = Client(served.url)
    seen: dict[str, str] = {}
    try:
        status = client.status()
        assert (status["mode"], status["state"], status["step"], status["weight"]) == ("phased", "running", 1, 10)
        assert status["gates"] == {"max_error_rate": 0.01, "max_p99_ms": 2000, "min_agreement": 0.99}
        weights = []
        for i in range(2000):
            key = f"user-{i % 150}"
            code, answer = client.predict(rows[i % 300:i % 300 + 1], key)
            assert code == 200
            step = client.status() if i % 25 == 0 else None
            if step is not None and (not weights or weights[-1] != step["weight"]):
                weights.append(step["weight"])
            # A user who got the candidate keeps it while the weight grows.
            if seen.get(key) == "same":
                assert answer["model_version"] == "same", key
            seen[key] = answer["model_version"]
            if step is not None and step["state"] == COMPLETE:
                break
        final = client.status()
        assert final["state"] == COMPLETE and final["weight"] == 100, final
        assert weights[0] == 10 and 50 in weights
        assert [e["event"] for e in final["history"]] == ["start", "promote", "promote", "promote"]
        assert all(client.predict(rows[i:i + 1])[1]["model_version"] == "same" for i in range(20))
        metrics = get(served.url + "/metrics")[1]
        assert 'edgepack_rollout_weight_percent{model="classifier"} 100' in metrics
        assert 'edgepack_rollout_state{model="classifier",state="complete"} 1' in metrics
        done = CliRunner().invoke(cli_app, ["rollout", "status", "--url", served.url, "--json"])
        assert done.exit_code == 0, done.output
        shown = json.loads(done.stdout)
        assert (shown["mode"], shown["step"], shown["weight"], shown["source"]) == ("phased", 3, 100, "server")
        assert shown["figures"]["error_rate"] is None or shown["figures"]["error_rate"] == 0
    finally:
        assert served.stop() == 0
    summary = report(log_dir)
    assert isinstance(summary, PhasedReport) and summary.state == COMPLETE and summary.agreement == 1.0
    assert summary.requests["candidate"] > 0 and summary.requests["primary"] > 0
    assert summary.spec["steps"] == [10, 50, 100]  # the spec is recorded in the log


def test_a_disagreeing_candidate_is_rolled_back_within_its_step_budget(bundle_dir, tmp_path, rows, primary_version):
    threshold = float(np.quantile(rows[:, 4], 0.7))  # about 30% of the rows disagree
    candidate = _candidate(bundle_dir, tmp_path / "biased", "biased",
                           _disagreeing_model(bundle_dir / "model.onnx", threshold))
    served = _phased(bundle_dir, candidate, tmp_path / "state", "--steps", "10,50,100", "--min-samples", "100",
                     "--min-agreement", "0.95", "--agreement-sample", "1")
    client = Client(served.url)
    theirs = ort.InferenceSession(str(candidate / "model.onnx"), providers=["CPUExecutionProvider"])
    try:
        answered_by_candidate = 0
        for i in range(3000):
            row = rows[i % 300:i % 300 + 1]
            code, answer = client.predict(row, f"user-{i}")
            assert code == 200
            if answer["model_version"] == "biased":  # real traffic: the candidate's own answer went out
                answered_by_candidate += 1
                assert answer["outputs"]["label"] == theirs.run(["label"], {"X": row})[0].tolist()
            if i % 10 == 0 and client.status()["state"] == ROLLED_BACK:
                break
        status = client.status()
        assert status["state"] == ROLLED_BACK and status["weight"] == 0 and status["step"] == 1
        assert status["history"][-1]["event"] == "rollback" and "agreement" in status["history"][-1]["reason"]
        assert answered_by_candidate <= 100  # within the step's sample budget
        assert all(client.predict(rows[i:i + 1], f"user-{i}")[1]["model_version"] == primary_version
                   for i in range(50))
    finally:
        assert served.stop() == 0
    assert any("rollback -> rolled_back at step 1" in line for line in served.log)


def test_a_failing_candidate_costs_users_nothing_and_is_rolled_back(bundle_dir, tmp_path, rows, primary_version):
    candidate = _candidate(bundle_dir, tmp_path / "failing", "failing", _failing_model)  # fails past one row
    log_dir = tmp_path / "log"
    served = _phased(bundle_dir, candidate, tmp_path / "state", "--steps", "50,100", "--min-samples", "100",
                     log_dir=log_dir)
    client = Client(served.url)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    try:
        for i in range(40):
            batch = rows[i:i + 2]
            code, answer = client.predict(batch, f"user-{i}")
            assert code == 200 and answer["model_version"] == primary_version  # the primary answered
            assert answer["outputs"]["label"] == session.run(["label"], {"X": batch})[0].tolist()
        status = client.status()
        assert status["state"] == ROLLED_BACK
        assert status["history"][-1]["figures"]["errors"] == 2  # more than 1% of 100: the second failure
        metrics = get(served.url + "/metrics")[1]
        assert 'edgepack_rollout_requests_total{model="classifier",variant="candidate",outcome="error"} 2' in metrics
    finally:
        assert served.stop() == 0
    fallbacks = [r for r in _lines(log_dir) if r["role"] == "primary" and "fallback" in r]
    assert len(fallbacks) == 2 and all("onnxruntime failed" in r["fallback"] for r in fallbacks)


def test_a_slow_candidate_is_rolled_back_on_its_p99(bundle_dir, tmp_path, rows):
    candidate = _candidate(bundle_dir, tmp_path / "slow", "slow", _slow_model)
    served = _phased(bundle_dir, candidate, tmp_path / "state", "--steps", "50,100", "--min-samples", "100",
                     "--max-p99-ms", "0.8", "--inference", "thread")
    client = Client(served.url)
    try:
        slow_answers = 0
        for i in range(200):
            code, answer = client.predict(rows[i % 300:i % 300 + 1], f"user-{i}")
            assert code == 200
            slow_answers += answer["model_version"] == "slow"
            if client.status()["state"] == ROLLED_BACK:
                break
        status = client.status()
        assert status["state"] == ROLLED_BACK and "p99" in status["history"][-1]["reason"]
        assert slow_answers == 2  # 1% of the 100-request budget may be slow; the second one ends it
    finally:
        assert served.stop() == 0


def test_kill_9_mid_rollout_resumes_the_same_step_with_every_line(bundle_dir, same_model, tmp_path, rows):
    state_dir, log_dir = tmp_path / "state", tmp_path / "log"
    flags = ("--steps", "10,50,100", "--min-samples", "30", "--step-duration", "0")
    served = _phased(bundle_dir, same_model, state_dir, *flags, log_dir=log_dir)
    client = Client(served.url)
    acknowledged = 0
    try:
        i = 0
        while client.status()["step"] < 2:
            assert client.predict(rows[i % 300:i % 300 + 1], f"user-{i}")[0] == 200
            acknowledged += 1
            i += 1
        for j in range(i, i + 40):  # some counts at step 2
            assert client.predict(rows[j % 300:j % 300 + 1], f"user-{j}")[0] == 200
            acknowledged += 1
        before = client.status()
        assert before["step"] == 2 and before["weight"] == 50 and before["figures"]["candidate_requests"] > 0
        _wait_for(lambda: load(state_dir).counts.candidate == client.status()["figures"]["candidate_requests"], 10)
        on_disk = load(state_dir)
    finally:
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=30)
    lines = _lines(log_dir)
    assert sum(r["role"] == "primary" for r in lines) == acknowledged  # no acknowledged line lost

    # Down: the state file answers, and an operator's decision waits there for the next start.
    runner = CliRunner()
    down = runner.invoke(cli_app, ["rollout", "status", "--state-dir", str(state_dir), "--json"])
    assert down.exit_code == 0, down.output
    shown = json.loads(down.stdout)
    assert (shown["source"], shown["step"], shown["weight"]) == ("state file", 2, 50)
    assert shown["figures"]["candidate_requests"] == on_disk.counts.candidate

    again = _phased(bundle_dir, same_model, state_dir, *flags, log_dir=log_dir)
    client = Client(again.url)
    try:
        resumed = client.status()
        assert (resumed["state"], resumed["step"], resumed["weight"]) == (RUNNING, 2, 50)
        assert resumed["figures"]["candidate_requests"] == on_disk.counts.candidate
        assert resumed["history"][-1]["event"] == "resume"
        assert resumed["spec"] == before["spec"]
        # A second server on the same state folder is refused.
        second = runner.invoke(cli_app, ["serve", str(bundle_dir), "--port", "0", "--phased", str(same_model),
                                         "--state-dir", str(state_dir)])
        assert_one_line_error(second, 3, "is in use by another edgepack serve")
    finally:
        assert again.stop() == 0


def test_operators_steer_it_through_the_server_and_the_state_file(bundle_dir, same_model, tmp_path, rows,
                                                                  primary_version):
    state_dir = tmp_path / "state"
    runner = CliRunner()
    served = _phased(bundle_dir, same_model, state_dir, "--steps", "10,50,100", "--min-samples", "1000000",
                     "--admin-token", "s3cret")
    try:
        assert Client(served.url).call("GET", "/admin/rollout")[0] == 401
        assert_one_line_error(runner.invoke(cli_app, ["rollout", "status", "--url", served.url]), 3,
                              "admin endpoints need this server's admin token")
        token = ["--url", served.url, "--token", "s3cret"]
        promoted = runner.invoke(cli_app, ["rollout", "promote", *token, "--reason", "looks fine", "--json"])
        assert promoted.exit_code == 0, promoted.output
        assert (json.loads(promoted.stdout)["step"], json.loads(promoted.stdout)["weight"]) == (2, 50)
        rolled = runner.invoke(cli_app, ["rollout", "rollback", *token, "--reason", "pager went off"])
        assert rolled.exit_code == 0 and "ROLLED BACK" in rolled.stdout and "pager went off" in rolled.stdout
        client = Client(served.url, "s3cret")
        assert all(client.predict(rows[i:i + 1], f"u{i}")[1]["model_version"] == primary_version for i in range(30))
        assert client.call("POST", "/admin/rollout/rollback", {})[0] == 409
        assert client.call("POST", "/admin/rollout/promote", [1])[0] == 400
        # The state folder is locked by the server: the command talks to the server.
        status = runner.invoke(cli_app, ["rollout", "status", "--state-dir", str(state_dir), *token, "--json"])
        assert json.loads(status.stdout)["source"] == "server"
    finally:
        assert served.stop() == 0
    promoted = runner.invoke(cli_app, ["rollout", "promote", "--state-dir", str(state_dir), "--reason", "fixed"])
    assert promoted.exit_code == 0 and "from the state file" in promoted.stdout, promoted.output
    assert load(state_dir).state == RUNNING and load(state_dir).step == 1
    again = _phased(bundle_dir, same_model, state_dir, "--steps", "10,50,100", "--min-samples", "1000000")
    try:
        status = Client(again.url).status()
        assert (status["state"], status["step"], status["weight"]) == (RUNNING, 2, 50)
        events = [e["event"] for e in status["history"]]
        assert events[-3:] == ["operator_rollback", "operator_promote", "resume"]
        assert "while the server was down" in status["history"][-2]["reason"]
    finally:
        assert again.stop() == 0
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "status", "--url", again.url]), 3, "no server answers")


def test_phased_errors_are_one_line(built_bundle, bundle_dir, same_model, tmp_path):
    runner = CliRunner()
    base = ["serve", str(built_bundle), "--port", "0"]
    assert_one_line_error(runner.invoke(cli_app, [*base, "--phased", str(same_model)]), 3, "--phased needs --state-dir")
    assert_one_line_error(runner.invoke(cli_app, [*base, "--phased", str(same_model), "--state-dir", str(tmp_path / "s"),
                                                  "--steps", "50,20"]), 3, "expected increasing percentages")
    assert_one_line_error(runner.invoke(cli_app, [*base, "--phased", str(same_model), "--shadow", str(same_model),
                                                  "--state-dir", str(tmp_path / "s")]), 3, "--shadow and --phased")
    assert_one_line_error(runner.invoke(cli_app, [*base, "--steps", "10,100"]), 2, "go with --phased")
    assert_one_line_error(runner.invoke(cli_app, [*base, "--phased", str(built_bundle), "--state-dir", str(tmp_path / "s")]),
                          3, "is the bundle already served: nothing to roll out")
    assert not (tmp_path / "s").exists()  # refused before anything was written
    other = tmp_path / "other-state"
    other.mkdir()
    save(other, Rollout.start(RolloutSpec(), "classifier", "v0", "v9", 0).to_json())
    assert_one_line_error(runner.invoke(cli_app, [*base, "--phased", str(same_model), "--state-dir", str(other)]), 3,
                          "holds the rollout of classifier v9 over v0")
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "status", "--state-dir", str(tmp_path / "none")]), 3,
                          "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(runner.invoke(cli_app, ["rollout", "promote", "--state-dir", str(empty)]), 3,
                          "no rollout.json in it")


def test_a_versioned_request_is_answered_by_that_version_outside_the_gates(bundle_dir, same_model, tmp_path, rows,
                                                                          primary_version):
    served = _phased(bundle_dir, same_model, tmp_path / "state", "--steps", "10,100", "--min-samples", "1000")
    client = Client(served.url)
    try:
        models = get(served.url + "/v2/models/classifier")[1]
        assert sorted(models["versions"]) == sorted([primary_version, "same"])
        body = {"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": rows[0].tolist()}]}
        for version in ("same", primary_version):
            for _ in range(5):
                code, answer = client.call("POST", f"/v2/models/classifier/versions/{version}/infer", body)
                assert code == 200 and answer["model_version"] == version
        figures = client.status()["figures"]
        assert figures["candidate_requests"] == figures["primary_requests"] == 0  # pinned: not the rollout's traffic
    finally:
        assert served.stop() == 0
