"""Repeated processes, batch and concurrency sweeps, and `bench --compare`: real models, real processes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgepack.bench.compare import compare_reports
from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, bench_onnx, results
from edgepack.cli import app
from edgepack.runtime.repeat import mean_interval, t975
from cli_checks import assert_one_line_error

runner = CliRunner()


def matmul_model(path: Path, width: int) -> Path:
    """x[batch, width] @ W[width, width]: the width sets the cost, so two widths give two speeds."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((width, width)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"small": matmul_model(folder / "small.onnx", 16), "big": matmul_model(folder / "big.onnx", 768)}


def test_student_t_and_the_mean_interval():
    assert t975(4) == pytest.approx(2.776) and t975(2.9) == pytest.approx(4.303)  # Welch df round down
    assert 1.96 < t975(200) < 2.0
    centre, half = mean_interval([1.0, 2.0, 3.0])
    assert centre == 2.0 and half == pytest.approx(4.303 / 3**0.5)
    assert mean_interval([5.0]) == (5.0, 0.0)


def test_processes_give_the_interval_between_their_medians(models):
    report = bench_onnx(models["small"], None, resolve_profile("edge-1core"), BenchSettings.timed(0.3, processes=3))
    processes = report["processes"]
    assert len(processes) == 3 and report["interval"].startswith("between 3 processes")
    p50s = [p["p50_ms"] for p in processes]
    assert report["p50_ms"] == pytest.approx(statistics.fmean(p50s))
    low, high = report["p50_ci95_ms"]
    assert low < report["p50_ms"] < high or min(p50s) == max(p50s)
    assert high - low == pytest.approx(2 * t975(2) * statistics.stdev(p50s) / 3**0.5)
    assert report["runs"] == sum(p["runs"] for p in processes)
    assert report["peak_rss_mb"] == max(p["peak_rss_mb"] for p in processes)
    assert len(report["latency_quantiles_ms"]) == 101
    assert report["limits"]["cpu_affinity"].startswith("enforced")  # every process applied the profile
    import hashlib

    assert report["model_sha256"] == hashlib.sha256(models["small"].read_bytes()).hexdigest()
    assert report["input_source"] == "random" and report["input_seed"] == 0


def test_batch_and_concurrency_sweep(models):
    report = bench_onnx(models["small"], None, resolve_profile("cloud-cpu"),
                        BenchSettings.timed(0.2, batches=(1, 4), concurrency=(1, 2), processes=1))
    configs = results(report)
    assert [(r["batch"], r["concurrency"]) for r in configs] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for config in configs:
        assert config["input_shapes"]["x"] == [config["batch"], 16]
        assert config["runs"] > 0 and config["throughput_per_s"] > 0
        assert config["profile"] == "cloud-cpu" and config["measured_on"] == "this host, emulating cloud-cpu"
        assert config["interval"].startswith("within one process")


def test_runtime_rejects_bad_sizes(models):
    for flags in (["--batch", "0"], ["--batch", "1,x"], ["--concurrency", "-2"], ["--processes", "0"]):
        done = subprocess.run([sys.executable, "-m", "edgepack.runtime.bench", "--model", str(models["small"]), *flags],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, (flags, done.stderr)
        assert "expected" in json.loads(done.stderr.strip().splitlines()[-1])["error"]


def _save(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report))
    return path


def test_compare_flags_a_real_slowdown_and_not_the_same_report(models, tmp_path):
    profile, settings = resolve_profile("edge-1core"), BenchSettings.timed(0.3, processes=3)
    fast = _save(tmp_path / "fast.json", bench_onnx(models["small"], None, profile, settings))
    slow = _save(tmp_path / "slow.json", bench_onnx(models["big"], None, profile, settings))

    same = runner.invoke(app, ["bench", "--compare", str(fast), str(fast)])
    assert same.exit_code == 0, same.output
    assert "no regression beyond the noise" in same.output

    worse = runner.invoke(app, ["bench", "--compare", str(fast), str(slow)])
    assert_one_line_error(worse, 6, "regression(s) beyond the noise: p50 ms +")
    better = runner.invoke(app, ["bench", "--compare", str(slow), str(fast), "--json"])
    assert better.exit_code == 0
    changes = {c["metric"]: c for c in json.loads(better.stdout)["configs"][0]["changes"]}
    assert changes["p50_ms"]["verdict"] == "improvement" and changes["p50_ms"]["noise"] > 0
    assert changes["p50_ms"]["change"] < -0.5


def test_compare_judges_against_the_noise():
    def report(p50s):
        return {"profile": "p", "measured_on": "here", "batch": 1, "p50_ms": statistics.fmean(p50s),
                "processes": [{"p50_ms": value} for value in p50s]}

    noisy = compare_reports([report([1.0, 1.2, 0.9, 1.1])], [report([1.1, 1.3, 1.0, 1.2])])
    assert noisy.configs[0].changes[0].verdict == "within noise"  # +9%, but the runs spread more than that
    tight = compare_reports([report([1.0, 1.01, 0.99])], [report([1.1, 1.11, 1.09])])
    assert tight.configs[0].changes[0].verdict == "regression" and tight.regressions
    small = compare_reports([report([1.0, 1.001, 0.999])], [report([1.01, 1.011, 1.009])])
    assert small.configs[0].changes[0].verdict == "within noise"  # beyond the noise, under --min-change 2%
    single = compare_reports([{"profile": "p", "measured_on": "here", "batch": 1, "p50_ms": 1.0}],
                             [{"profile": "p", "measured_on": "here", "batch": 1, "p50_ms": 2.0}])
    assert single.configs[0].changes[0].verdict == "no interval" and single.warnings


def test_compare_errors_are_one_line(models, tmp_path):
    report = {"profile": "edge-1core", "measured_on": "here", "batch": 1, "p50_ms": 1.0}
    one = _save(tmp_path / "one.json", report)
    other = _save(tmp_path / "other.json", {**report, "batch": 8})
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    cases = [
        (["bench", "--compare", str(one), str(tmp_path / "missing.json")], 3, "no such report"),
        (["bench", "--compare", str(one), str(garbage)], 3, "not a JSON benchmark report"),
        (["bench", "--compare", str(one), str(_save(tmp_path / "x.json", {"a": 1}))], 3, "no benchmark figures"),
        (["bench", "--compare", str(one), str(other)], 3, "share no configuration"),
        (["bench", "--compare", str(one), str(one), "--gate", "p42"], 3, "is not a metric"),
        (["bench"], 2, "give a bundle"),
    ]
    for args, code, message in cases:
        assert_one_line_error(runner.invoke(app, args), code, message, args)


def test_bench_and_build_write_html_reports(built_bundle, data_dir, tmp_path):
    page = tmp_path / "reports" / "bench.html"
    result = runner.invoke(app, ["bench", str(built_bundle), "--batch", "1,4", "--processes", "2",
                                 "--bench-time", "0.2", "--report", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert html.count("<svg") == 3  # one distribution per configuration and the overlay
    assert "batch 4" in html and "edge-1core" in html and "://" not in html

    built = tmp_path / "build.html"
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--out", str(tmp_path / "dist"), "--bench-time", "0.2", "--quiet", "--json",
                                 "--report", str(built)])
    assert result.exit_code == 0, result.output
    timed = [row["name"] for row in json.loads(result.stdout)["variants"] if row["p50_ms"] is not None]
    html = built.read_text()
    assert timed and all(name in html for name in timed) and html.count("<svg") == len(timed) + 1

    unwritable = runner.invoke(app, ["bench", str(built_bundle), "--processes", "1", "--bench-time", "0.1",
                                     "--report", str(built_bundle / "x.html")])
    assert_one_line_error(unwritable, 3, "cannot write the report")
