"""The command line, through typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app

runner = CliRunner()


def _build_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
            "--out", str(out), "--bench-time", "0.2", "--quiet", *extra]


def test_build_json_contract(data_dir, tmp_path):
    result = runner.invoke(app, _build_args(data_dir, tmp_path, "--json", "--target", "edge"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["bundle"]).is_file()
    assert summary["variant"] in ("fp32", "int8-dynamic")
    assert summary["parity"]["passed"] is True
    bench = summary["bench"]["edge-1core"]
    assert bench["p50_ms"] > 0 and bench["p99_ms"] >= bench["p50_ms"]
    assert summary["not_measured"] == {name: "aarch64 profile: benchmark it on the device"
                                       for name in ("edge-arm64-4c-4gb", "edge-arm64-jetson-nano")}


def test_build_human_summary(data_dir, tmp_path):
    result = runner.invoke(app, _build_args(data_dir, tmp_path), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("Parity", "Variants on edge-1core", "p50 ms", "p99 ms", "Bundle:", "Next steps:",
                 "edgepack verify", "edgepack bench"):
        assert text in result.stdout


def test_verify_bench_profiles(built_bundle):
    verified = runner.invoke(app, ["verify", str(built_bundle), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"] is True
    bench = runner.invoke(app, ["bench", str(built_bundle), "--profile", "edge-1core", "--json", "--bench-time", "0.2"])
    assert bench.exit_code == 0, bench.output
    report = json.loads(bench.stdout)
    assert report["p50_ms"] > 0 and report["p99_ms"] > 0 and report["profile"] == "edge-1core"
    assert report["limits"]["cpu_affinity"].startswith("enforced")
    assert {report["limits"][limit].split(" (")[0] for limit in ("memory", "cpu_quota")} <= {"enforced", "not enforced"}
    listed = runner.invoke(app, ["profiles", "--json"])
    names = {p["name"] for p in json.loads(listed.stdout)}
    assert {"cloud-cpu", "edge-1core", "edge-arm64-4c-4gb"} <= names


def _bad_inputs(data_dir: Path, tmp: Path, built_bundle: Path):
    import joblib
    import skops.io as sio
    from sklearn.semi_supervised import LabelPropagation

    rows = np.load(data_dir / "sample.npy")
    (tmp / "corrupt.skops").write_bytes(b"not a zip file")
    joblib.dump(sio.load(data_dir / "regressor.skops"), tmp / "model.pkl")
    sio.dump(LabelPropagation().fit(rows, rows[:, 0] > 0), tmp / "lp.skops")
    np.save(tmp / "narrow.npy", rows[:, :2])
    tampered = tmp / "tampered.tar.gz"
    raw = bytearray(built_bundle.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    traversal = tmp / "traversal.tar.gz"
    with tarfile.open(traversal, "w:gz") as archive:
        info = tarfile.TarInfo("../../evil.sh")
        archive.addfile(info)
    model, sample = str(data_dir / "classifier.skops"), str(data_dir / "sample.npy")
    return [
        (["build", str(tmp / "missing.skops"), "-s", sample], 3, "no such model file"),
        (["build", str(tmp / "corrupt.skops"), "-s", sample], 3, "not a readable skops file"),
        (["build", str(tmp / "model.pkl"), "-s", sample], 3, "--allow-pickle"),
        (["build", str(tmp / "lp.skops"), "-s", sample], 4, "cannot convert LabelPropagation"),
        (["build", model, "-s", str(tmp / "narrow.npy")], 3, "input 'X' takes [?, 6], given [300, 2]"),
        (["build", model, "-s", sample, "--atol", "0", "--rtol", "0"], 5, "differs from the original"),
        (["build", model, "-s", sample, "--max-p99-ms", "0.0000001"], 6, "exceeds the budget"),
        (["build", model, "-s", sample, "--quantize", "int4"], 3, "is not a mode"),
        (["verify", str(tampered)], 7, "tampered.tar.gz"),
        (["verify", str(traversal)], 7, "unsafe path"),
        (["bench", str(built_bundle), "--profile", "edge-arm64-4c-4gb"], 8, "only on the device"),
        (["bench", str(built_bundle), "--profile", "nope"], 3, "unknown profile"),
    ]


def test_bad_inputs_give_one_line_and_their_exit_code(data_dir, built_bundle, tmp_path):
    for args, code, text in _bad_inputs(data_dir, tmp_path, built_bundle):
        result = runner.invoke(app, [*args, "--quiet", "--out", str(tmp_path / "out")] if args[0] == "build" else args)
        assert_one_line_error(result, code, text, args)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_usage_error_exits_2():
    result = runner.invoke(app, ["build"])
    assert result.exit_code == 2


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "verify", str(tmp_path / "none.tar.gz")])
    assert result.exit_code == 3 and "Traceback" in result.stderr  # a missing bundle is bad input


def test_subprocess_end_to_end(data_dir, tmp_path):
    exe = [sys.executable, "-m", "edgepack"]
    built = subprocess.run([*exe, *_build_args(data_dir, tmp_path, "--json")], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    bundle = json.loads(built.stdout)["bundle"]
    verified = subprocess.run([*exe, "verify", bundle], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and "intact" in verified.stdout
    missing = subprocess.run([*exe, "verify", str(tmp_path / "nope.tar.gz")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_help_is_fast_and_lists_exit_codes():
    probe = ("import sys, edgepack.cli; heavy = {'onnx', 'onnxruntime', 'skl2onnx', 'sklearn', 'numpy', 'skops'};"
             "print(sorted(heavy & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]"
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "Exit codes" in shown.stdout and "7 integrity failure" in shown.stdout


def test_budgets_fail_bench_and_build_after_reporting(data_dir, built_bundle, tmp_path):
    # bench: the report is printed, then one error line and exit 6.
    result = runner.invoke(app, ["bench", str(built_bundle), "--profile", "edge-1core", "--bench-time", "0.1",
                                 "--json", "--max-memory-mb", "1"])
    assert result.exit_code == 6
    assert json.loads(result.stdout)["peak_rss_mb"] > 1
    assert result.stderr.count("\n") == 1 and "peak memory" in result.stderr and "budget of 1 MB" in result.stderr
    within = runner.invoke(app, ["bench", str(built_bundle), "--bench-time", "0.1", "--max-memory-mb", "4096",
                                 "--max-p99-ms", "1000"])
    assert within.exit_code == 0, within.output
    # build: nothing is written when the chosen variant is over budget.
    built = runner.invoke(app, [*_build_args(data_dir, tmp_path / "out"), "--max-memory-mb", "1"])
    assert_one_line_error(built, 6, "exceeds the budget of 1 MB")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar.gz"))


def test_profile_budgets_apply(data_dir, tmp_path):
    profile = tmp_path / "tight.toml"
    profile.write_text('name = "tight"\ndescription = "d"\nkind = "edge"\narch = "x86_64"\ncpus = 1\n'
                       '[onnxruntime]\nversion = "1.17"\nthreads = 1\n[budgets]\nmax_memory_mb = 1\n')
    result = runner.invoke(app, [*_build_args(data_dir, tmp_path / "out"), "--target", str(profile)])
    assert_one_line_error(result, 6, "peak memory")
