"""The choice of variant: recorded in edgepack.lock and reused without timing (--locked gives the same
bytes), pinned with --variant, judged by a user's --metric; twins made once and shown as one; progress
and tables a pipe can read."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import InputError
from edgepack.pipeline import build
from edgepack.spec import BuildSpec

runner = CliRunner()


def _build(spec_for, **overrides):
    return build(spec_for("classifier.skops", **overrides))


def test_the_decision_is_recorded_and_a_locked_build_repeats_it_byte_for_byte(spec_for, tmp_path):
    lock = tmp_path / "edgepack.lock"
    first = _build(spec_for, lock=lock, out=tmp_path / "first")
    entry = json.loads(lock.read_text())["entries"][f"{first.manifest.name}@{first.profile.name}"]
    assert entry["variant"] == first.manifest.variant
    assert {"model", "evaluation", "gates", "metric_code"} <= set(entry["fingerprint"])
    assert entry["evidence"]  # the timing behind it, for people

    again = _build(spec_for, lock=lock, locked=True, out=tmp_path / "again")
    assert again.locked
    assert again.bundle.read_bytes() == first.bundle.read_bytes()
    assert all(row.interval is None for row in again.variants)  # nothing was timed


def test_a_locked_build_refuses_other_inputs_and_a_missing_lock(spec_for, data_dir, tmp_path):
    lock = tmp_path / "edgepack.lock"
    with pytest.raises(InputError, match="does not exist"):
        _build(spec_for, lock=lock, locked=True)
    _build(spec_for, lock=lock, out=tmp_path / "first")
    np.save(tmp_path / "other.npy", np.load(data_dir / "sample.npy")[:50] + 1)
    with pytest.raises(InputError, match=r"made for other inputs: .*evaluation \(\w{12}… → \w{12}…\)") as caught:
        _build(spec_for, lock=lock, locked=True, sample=tmp_path / "other.npy")
    assert "build without --locked" in caught.value.hint
    with pytest.raises(InputError, match="no decision for regressor"):
        build(spec_for("regressor.skops", lock=lock, locked=True, name="regressor"))


def test_variant_pins_the_choice_without_timing(spec_for):
    result = _build(spec_for, variant="int8-dynamic")
    assert result.manifest.variant == "int8-dynamic"
    rows = {row.name: row for row in result.variants}
    assert rows["int8-dynamic"].code.value == "pinned"
    assert all(row.interval is None for row in result.variants)


def test_an_unknown_pinned_variant_is_a_usage_error(data_dir, tmp_path):
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--variant", "int4", "--out", str(tmp_path / "dist")])
    assert result.exit_code == 3 and "int4" in result.output and "int8-dynamic" in result.output


def test_byte_identical_variants_are_made_once_and_shown_as_one(spec_for):
    """An MLP's MatMul weights quantize the same per tensor and per channel when dynamic int8 makes
    them per-tensor anyway (opset and operator dependent): whenever two variants come out equal,
    the table shows one row naming both."""
    result = _build(spec_for)
    digests = [row.sha256 for row in result.variants if row.sha256]
    assert len(digests) == len(set(digests))  # no two rows hold the same bytes
    for row in result.variants:
        for alias in row.aliases:
            assert alias not in {r.name for r in result.variants}
            assert alias in row.label


def test_a_user_metric_judges_variants_on_validation(spec_for, data_dir, tmp_path):
    (tmp_path / "task.py").write_text(textwrap.dedent("""
        import numpy as np

        def hit_rate(outputs, targets):
            labels = next(value for name, value in outputs.items() if value.dtype.kind in "iu")
            return float(np.mean(labels.ravel() == targets["y"].ravel()))
    """))
    rows = np.load(data_dir / "sample.npy")
    np.savez(tmp_path / "validation.npz", X=rows, y=(rows[:, 0] + rows[:, 1] * rows[:, 2] > 0).astype(int))
    result = _build(spec_for, validation=tmp_path / "validation.npz", metric=f"{tmp_path / 'task.py'}:hit_rate")
    assert result.metric_basis and "hit_rate" in json.dumps([row.to_json() for row in result.variants])
    fp32 = next(row for row in result.variants if row.name == "fp32")
    assert fp32.metric is not None and fp32.metric.name == "hit_rate" and 0 < fp32.metric.value <= 1

    bad = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                              "--validation", str(tmp_path / "validation.npz"), "--metric", "task.py:nothing",
                              "--out", str(tmp_path / "dist")])
    assert bad.exit_code == 3 and "nothing" in bad.output, bad.output


def test_a_variant_that_cannot_apply_says_not_applicable(data_dir, tmp_path):
    """A linear model converted by skl2onnx is one LinearClassifier node of the ai.onnx.ml domain:
    neither int8 nor fp16 has anything to convert."""
    from sklearn.linear_model import LogisticRegression
    import skops.io as sio

    rows = np.load(data_dir / "sample.npy")
    sio.dump(LogisticRegression().fit(rows, rows[:, 0] > 0), tmp_path / "linear.skops")
    result = build(BuildSpec(model=tmp_path / "linear.skops", sample=data_dir / "sample.npy", out=tmp_path / "dist",
                             bench_time_s=0.2))
    reasons = {row.name: (row.code.value, row.reason) for row in result.variants}
    assert result.parity.passed  # True/False labels against ONNX's 1/0
    assert reasons["fp16"][0] == "not-applicable", reasons
    assert "could not be made" not in json.dumps(reasons) and "Error" not in json.dumps(reasons)


def test_without_a_tty_progress_is_one_line_per_variant_and_round(data_dir, tmp_path):
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--bench-time", "0.2", "--out", str(tmp_path / "dist")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    made = [line for line in lines if " made " in line]
    assert {"int8-dynamic", "fp16"} <= {word for line in made for word in line.split()}
    assert any(line.strip().startswith("bench    round 1:") for line in lines), result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr


def test_tables_keep_variant_names_whole_at_80_columns(data_dir, tmp_path):
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--bench-time", "0.2", "--out", str(tmp_path / "dist")], terminal_width=80)
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert max(len(line) for line in table.splitlines() if line.startswith(("│", "┃", "┏"))) <= 80
    for name in ("int8-dynamic-per-channel", "int8-static-per-channel", "int8-dynamic", "fp16"):
        assert name in table, table
    assert "…" not in "".join(line for line in table.splitlines() if line.startswith("│"))


@pytest.mark.parametrize("out_name, words", [
    ("a-file", ["a-file", "not a folder"]),  # --out names a file
    ("a-file/below", ["a-file"]),  # --out would be a folder inside a file
])
def test_a_bad_out_is_refused_before_any_work(data_dir, tmp_path, out_name, words):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / out_name
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "load" not in result.stderr  # refused before the model was read
    for word in words:
        assert word in result.output


def test_a_read_only_out_is_refused_before_any_work(data_dir, tmp_path):
    import os

    if os.geteuid() == 0:  # root writes anywhere: a read-only folder is what a non-root CI user has
        out = Path("/proc/edgepack-out")  # a folder no one can create, root included
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "internal error" not in result.output and str(out) in result.output


def test_the_convert_line_reports_the_opset_the_bundle_keeps(data_dir, tmp_path):
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--quantize", "none", "--bench-time", "0.2", "--out", str(tmp_path / "dist"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    bundle = Path(json.loads(result.stdout)["bundle"])
    import tarfile

    with tarfile.open(bundle) as archive:
        manifest = json.loads(archive.extractfile(next(m for m in archive.getmembers()
                                                       if m.name.endswith("/manifest.json"))).read())
    convert_line = next(line for line in result.stderr.splitlines() if line.startswith("✓ convert"))
    assert f"opset {manifest['target']['opset']}, IR {manifest['target']['ir_version']}" in convert_line


def test_a_rebuild_of_the_same_inputs_repeats_the_recorded_decision(spec_for, data_dir, tmp_path):
    """Without --locked, a decision recorded for these very inputs is reused too: timing noise
    cannot make a second build differ. --retime measures again; other inputs decide afresh."""
    lock = tmp_path / "edgepack.lock"
    first = _build(spec_for, lock=lock, out=tmp_path / "first")
    key = f"{first.manifest.name}@{first.profile.name}"
    recorded = json.loads(lock.read_text())["entries"][key]["fingerprint"]
    again = _build(spec_for, lock=lock, out=tmp_path / "again")
    assert again.locked and again.bundle.read_bytes() == first.bundle.read_bytes()
    assert all(row.interval is None for row in again.variants)

    retimed = _build(spec_for, lock=lock, retime=True, out=tmp_path / "retimed")
    assert not retimed.locked and any(row.interval is not None for row in retimed.variants)

    np.save(tmp_path / "other.npy", np.load(data_dir / "sample.npy")[:80])
    other = _build(spec_for, lock=lock, sample=tmp_path / "other.npy", out=tmp_path / "other")
    assert not other.locked and any(row.interval is not None for row in other.variants)
    assert json.loads(lock.read_text())["entries"][key]["fingerprint"]["evaluation"] != recorded["evaluation"]


def test_locked_and_retime_contradict(data_dir, tmp_path):
    result = runner.invoke(app, ["build", str(data_dir / "classifier.skops"), "--sample", str(data_dir / "sample.npy"),
                                 "--locked", "--retime", "--out", str(tmp_path / "dist")])
    assert result.exit_code == 3 and "--retime" in result.output
