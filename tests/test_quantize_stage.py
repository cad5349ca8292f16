"""The quantize stage inside builds: accuracy gate, calibration data, and the example models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import InputError
from edgepack.pipeline import build

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_validation_labels_gate_every_variant(spec_for, data_dir, tmp_path):
    import skops.io as sio

    rows = np.load(data_dir / "sample.npy")
    np.savez(tmp_path / "val.npz", X=rows, y=sio.load(data_dir / "classifier.skops").predict(rows))
    result = build(spec_for("classifier.skops", validation=tmp_path / "val.npz"))
    assert result.metric_basis == "labels in val.npz"
    for row in result.variants:
        if row.verdict != "skipped":
            assert row.metric is not None and row.metric.name == "accuracy"
    manifest_rows = {v.name: v for v in result.manifest.variants}
    assert manifest_rows["fp32"].metric["value"] == 1.0
    assert result.manifest.quantization["calibration"]["data"] == "sample.npy (the sample)"
    assert isinstance(result.manifest.quantization["reduce_range"], bool)
    assert result.manifest.quantization["cpu_flags"]


def test_regressor_metric_is_rmse(spec_for, data_dir, tmp_path):
    import skops.io as sio

    rows = np.load(data_dir / "sample.npy")
    targets = sio.load(data_dir / "regressor.skops").predict(rows) + 0.1
    np.savez(tmp_path / "val.npz", X=rows, y=targets)
    result = build(spec_for("regressor.skops", validation=tmp_path / "val.npz", quantize="none"))
    assert result.variants[0].metric.name == "rmse"
    assert result.variants[0].metric.value == pytest.approx(0.1, abs=1e-3)


def test_csv_validation_with_label_column(spec_for, data_dir, tmp_path):
    rows = np.load(data_dir / "sample.npy")[:50]
    lines = ["a,b,c,d,e,f,label"] + [",".join(map(str, [*row, 1])) for row in rows]
    (tmp_path / "val.csv").write_text("\n".join(lines))
    result = build(spec_for("classifier.skops", validation=tmp_path / "val.csv", quantize="none"))
    assert result.variants[0].metric.name == "accuracy"
    with pytest.raises(InputError, match="no column named 'target'"):
        build(spec_for("classifier.skops", validation=tmp_path / "val.csv", label_column="target"))


@pytest.mark.parametrize("make, message", [
    (lambda rows: rows[:, :3], r"calibration data cal.npy has rows of shape \(3,\), the model takes \(6,\)"),
    (lambda rows: np.where(np.arange(rows.size).reshape(rows.shape) == 7, np.nan, rows), "NaN or infinite"),
])
def test_bad_calibration_data(spec_for, data_dir, tmp_path, make, message):
    np.save(tmp_path / "cal.npy", make(np.load(data_dir / "sample.npy")))
    with pytest.raises(InputError, match=message):
        build(spec_for("classifier.skops", calibration=tmp_path / "cal.npy"))


def test_bad_calibration_via_cli_is_one_line(data_dir, tmp_path):
    rows = np.load(data_dir / "sample.npy")
    rows[3, 2] = np.nan
    np.save(tmp_path / "cal.npy", rows)
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "-s", str(data_dir / "sample.npy"),
                                 "--calibration", str(tmp_path / "cal.npy"), "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "NaN" in result.stderr


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(data_dir, tmp_path, method):
    # Through the CLI with --json: the calibrators' progress prints must not reach stdout.
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "-s", str(data_dir / "sample.npy"),
                                 "--quantize", "int8-static", "--calibration-method", method, "--bench-time", "0.1",
                                 "--out", str(tmp_path), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    static = next(r for r in summary["variants"] if r["name"] == "int8-static")
    assert static["verdict"] in ("chosen", "dropped") and static["size_bytes"]


def test_weights_only_for_torch(spec_for, data_dir):
    with pytest.raises(InputError, match="--weights applies to PyTorch"):
        build(spec_for("classifier.skops", weights=data_dir / "sample.npy"))


@pytest.mark.parametrize("model, sample, validation", [
    ("digits_mlp.skops", "digits_sample.npy", "digits_validation.npz"),
    ("digits_mlp3x1024.skops", "digits_sample.npy", "digits_validation.npz"),
])
def test_examples_build_with_auto(model, sample, validation, tmp_path):
    result = runner.invoke(app, ["build", str(EXAMPLES / model), "--sample", str(EXAMPLES / sample),
                                 "--validation", str(EXAMPLES / validation), "--quantize", "auto",
                                 "--out", str(tmp_path), "--bench-time", "0.2", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parity"]["passed"]
    rows = {row["name"]: row for row in summary["variants"]}
    chosen = rows[summary["variant"]]
    # Never slower than fp32, never past the accuracy gate.
    if summary["variant"] != "fp32":
        assert chosen["p50_ms"] < rows["fp32"]["p50_ms"]
        assert chosen["metric"]["passed"]
    assert rows["fp16"]["verdict"] in ("dropped", "skipped") and rows["fp16"]["reason"]
