"""Each stage on tiny real models, through the library API."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pytest

from edgepack.errors import BudgetExceeded, ConversionError, InputError, ParityError
from edgepack.select import Reason
from edgepack.speed import FASTER_MARGIN, Speed
from edgepack.pipeline import build
from edgepack.runtime.session import create_session


def _manifest(bundle):
    with tarfile.open(bundle) as archive:
        name = next(n for n in archive.getnames() if n.endswith("/manifest.json"))
        return json.load(archive.extractfile(name))


@pytest.mark.parametrize("model, kinds", [
    ("classifier.skops", ["label", "probabilities"]),
    ("regressor.skops", ["regression"]),
    ("pipeline.skops", ["label", "probabilities"]),
])
def test_build_each_model_kind(spec_for, data_dir, model, kinds):
    result = build(spec_for(model))
    assert result.parity.passed
    assert [d.kind for d in result.parity.outputs] == kinds
    # The bundled model answers like the original on fresh rows, not only on the sample.
    manifest = _manifest(result.bundle)
    assert manifest["parity"]["passed"] and manifest["parity"]["samples"] == 300
    assert manifest["inputs"][0]["shape"] == ["batch", 6]
    assert manifest["inputs"][0]["features"] == [f"f{i}" for i in range(6)]
    assert [o["kind"] for o in manifest["outputs"]] == kinds and manifest["schema_version"] == 2
    assert {o["kind_from"] for o in manifest["outputs"]} == {"converter"}
    assert manifest["source"]["sha256"] and manifest["source"]["format"] == "skops"
    assert result.bench is not None and result.bench["p50_ms"] > 0
    assert result.bench["limits"]["threads"].startswith("enforced")


def test_chosen_model_matches_original_on_new_rows(spec_for, data_dir, tmp_path):
    import skops.io as sio

    result = build(spec_for("regressor.skops", quantize="none"))
    with tarfile.open(result.bundle) as archive:
        model_name = next(n for n in archive.getnames() if n.endswith("/model.onnx"))
        (tmp_path / "m.onnx").write_bytes(archive.extractfile(model_name).read())
    session, _ = create_session(tmp_path / "m.onnx")
    rows = np.random.default_rng(7).normal(size=(50, 6)).astype(np.float32)
    original = sio.load(data_dir / "regressor.skops")
    np.testing.assert_allclose(session.run(None, {"X": rows})[0].ravel(), original.predict(rows), rtol=1e-4, atol=1e-4)


def test_opset_follows_target_onnxruntime(spec_for):
    edge = build(spec_for("classifier.skops", quantize="none", target="edge-1core"))
    cloud = build(spec_for("classifier.skops", quantize="none", target="cloud", image=False))
    assert edge.manifest.target.opset == 20 and edge.manifest.target.onnxruntime == "1.17"
    assert cloud.manifest.target.opset == 21
    for result in (edge, cloud):
        with tarfile.open(result.bundle) as archive:
            name = next(n for n in archive.getnames() if n.endswith("/model.onnx"))
            model = onnx.load_from_string(archive.extractfile(name).read())
        default = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert default == result.manifest.target.opset
        assert model.ir_version <= result.manifest.target.ir_version


def test_int8_variant_is_gated_timed_and_judged_with_confidence(spec_for):
    result = build(spec_for("classifier.skops", quantize="int8-dynamic"))
    rows = {row.name: row for row in result.variants}
    int8 = rows["int8-dynamic"]
    checks = {check.output: check for check in int8.gate.checks}
    assert checks["label"].rule == "labels" and checks["label"].value >= 0.99
    assert checks["probabilities"].rule == "argmax"
    assert int8.bench is not None and rows["fp32"].bench is not None
    assert int8.interval is not None and int8.interval.low <= int8.interval.ratio <= int8.interval.high
    assert int8.interval.rounds >= 6 and len(int8.bench["rounds_p50_ms"]) == int8.interval.rounds
    # Chosen exactly when the whole interval clears the margin; an inconclusive test keeps fp32.
    assert (result.manifest.variant == "int8-dynamic") == (int8.speed is Speed.FASTER)
    assert (int8.speed is Speed.FASTER) == (int8.interval.high < 1 - FASTER_MARGIN)
    chosen = rows[result.manifest.variant]
    assert chosen.code in (Reason.FASTER, Reason.NO_FASTER_VARIANT)
    # The manifest's words do not depend on timing.
    for record in result.manifest.variants:
        assert "x" not in record.reason.split() and "ms" not in record.reason


def test_variant_outside_tolerance_is_dropped(data_dir, tmp_path):
    # A "variant" that is really another classifier (trained on shuffled labels) must fail the gate.
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from edgepack.convert.base import LoadOptions
    from edgepack.convert.sklearn import SklearnConverter
    from edgepack.gates import GateSettings, label_metric
    from edgepack.quantize import Variant
    from edgepack.samples import read_sample
    from edgepack.select import Evaluation, Verdict, VariantRow, _gate_row, run_model

    source = SklearnConverter().load(data_dir / "classifier.skops", LoadOptions())
    sample = read_sample(data_dir / "sample.npy", source.inputs)
    rows = sample.arrays["X"]
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(SklearnConverter().convert(source, sample, {"": 17, "ai.onnx.ml": 3}).SerializeToString())
    shuffled = np.random.default_rng(1).permutation(source.native.predict(rows))
    other = LogisticRegression().fit(rows, shuffled)
    impostor = tmp_path / "impostor.onnx"
    impostor.write_bytes(to_onnx(other, rows[:1], options={"zipmap": False}, target_opset=17).SerializeToString())
    reference = run_model(fp32, sample)
    names, kinds, dims = ["label", "probabilities"], ["label", "probabilities"], [("N",), ("N", 3)]
    # Without labels: every output is judged against fp32 by its kind's rule.
    row = VariantRow("int8-dynamic", Variant("int8-dynamic", impostor))
    _gate_row(row, names, kinds, dims, reference, Evaluation(sample), None, GateSettings())
    assert row.verdict is Verdict.DROPPED and row.code is Reason.INACCURATE
    assert row.reason.startswith("fails the accuracy gate: label (label): label agreement")
    assert {check.output for check in row.gate.checks if not check.passed} == {"label", "probabilities"}
    # With labels: the task metric against fp32's decides for the outputs it reads.
    labels = source.native.predict(rows)
    metric = label_metric(names, kinds, labels, reference[0])
    labelled = Evaluation(sample, labels, metric)
    row = VariantRow("int8-dynamic", Variant("int8-dynamic", impostor))
    fp32_accuracy = metric.score({"label": np.concatenate([run[0] for run in reference])})
    _gate_row(row, names, kinds, dims, reference, labelled, fp32_accuracy, GateSettings(max_accuracy_drop=1.0))
    assert fp32_accuracy == 1.0
    assert row.verdict is Verdict.DROPPED and "accuracy" in row.reason
    assert row.metric.value < 0.9 and row.metric.change.endswith("pt")
    assert not next(c for c in row.gate.checks if c.output == "label").gated  # the metric judges it
    assert not next(c for c in row.gate.checks if c.output == "probabilities").passed


def test_quantize_none_and_non_quantizable_model(spec_for):
    none = build(spec_for("classifier.skops", quantize="none"))
    assert [r.name for r in none.variants] == ["fp32"]
    ridge = build(spec_for("regressor.skops", quantize="auto"))
    skipped = next(r for r in ridge.variants if r.name == "int8-dynamic")
    assert skipped.verdict.value == "skipped" and skipped.code is Reason.NOT_APPLICABLE
    assert skipped.reason.startswith("not applicable: no quantizable operators")
    fp16 = next(r for r in ridge.variants if r.name == "fp16")
    assert fp16.code is Reason.NOT_APPLICABLE and "no float weights" in fp16.reason


def test_parity_failure_aggregates_outputs(spec_for):
    with pytest.raises(ParityError) as caught:
        build(spec_for("classifier.skops", atol=0.0, rtol=0.0, quantize="none"))
    assert "probabilities" in str(caught.value) and "beyond tolerance" in str(caught.value)


def test_random_rows_when_only_a_shape_is_given(spec_for):
    result = build(spec_for("regressor.skops", sample=None, input_shape=("6",), quantize="none"))
    assert result.manifest.parity["data"] == "random"


def test_aarch64_profile_packages_without_benchmark(spec_for):
    result = build(spec_for("classifier.skops", target="edge-arm64-4c-4gb", quantize="int8-dynamic"))
    assert result.bench is None
    assert result.manifest.target.arch == "aarch64"
    assert result.manifest.variant == "int8-dynamic"
    assert "not measured" in next(r for r in result.variants if r.name == "int8-dynamic").reason


@pytest.mark.parametrize("overrides, error, text", [
    ({"model": "missing.skops"}, InputError, "no such model file"),
    ({"model": "sample.npy"}, InputError, "cannot read .npy files"),
    ({"max_p99_ms": 1e-9}, BudgetExceeded, "exceeds the budget"),
    ({"max_size_mb": 1e-6}, BudgetExceeded, "exceeds the budget"),
    ({"target": "no-such-profile"}, InputError, "unknown profile"),
    ({"sample": None, "input_shape": ("5",)}, InputError, r"input 'X' takes \[\?, 6\], given \[1, 5\]"),
])
def test_bad_build_inputs(spec_for, data_dir, tmp_path, overrides, error, text):
    if "model" in overrides:
        overrides["model"] = data_dir / overrides["model"]
    with pytest.raises(error, match=text):
        build(spec_for("classifier.skops", **overrides))
    # Nothing half-written is left where a bundle is expected.
    assert not list((tmp_path / "dist").glob("*.tar.gz")) if (tmp_path / "dist").exists() else True
    assert not list(tmp_path.rglob("*.partial"))


def test_unsupported_estimator_is_named(spec_for, data_dir, tmp_path):
    import skops.io as sio
    from sklearn.semi_supervised import LabelPropagation

    rows = np.load(data_dir / "sample.npy")
    sio.dump(LabelPropagation().fit(rows, rows[:, 0] > 0), tmp_path / "lp.skops")
    with pytest.raises(ConversionError, match="cannot convert LabelPropagation"):
        build(spec_for("classifier.skops", model=tmp_path / "lp.skops"))


def test_wrong_sample_width(spec_for, tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"narrow.npy: input 'X' takes \[\?, 6\], given \[5, 3\] \(3 at dimension 1"):
        build(spec_for("classifier.skops", sample=tmp_path / "narrow.npy"))
