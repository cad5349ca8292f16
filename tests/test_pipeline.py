"""Each stage on tiny real models, through the library API."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pytest

from edgepack.errors import BudgetExceeded, ConversionError, InputError, ParityError
from edgepack.bench.runner import paired_ratio
from edgepack.pipeline import build
from edgepack.runtime.session import create_session


def _manifest(bundle):
    with tarfile.open(bundle) as archive:
        name = next(n for n in archive.getnames() if n.endswith("/manifest.json"))
        return json.load(archive.extractfile(name))


@pytest.mark.parametrize("model, kinds", [
    ("classifier.skops", ["label", "values"]),
    ("regressor.skops", ["values"]),
    ("pipeline.skops", ["label", "values"]),
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


def test_int8_variant_is_checked_and_either_chosen_or_dropped_with_reason(spec_for):
    result = build(spec_for("classifier.skops", quantize="int8-dynamic"))
    rows = {row.name: row for row in result.variants}
    int8 = rows["int8-dynamic"]
    assert int8.agreement is not None
    assert int8.agreement.outputs[0].agreement >= 0.99
    assert int8.bench is not None and rows["fp32"].bench is not None
    faster = paired_ratio(int8.bench, rows["fp32"].bench) < 0.97
    assert result.manifest.variant == ("int8-dynamic" if faster else "fp32")
    assert int8.reason and rows["fp32"].reason


def test_variant_outside_tolerance_is_dropped(data_dir, tmp_path):
    # A "variant" that is really another classifier (trained on shuffled labels) must fail the gate.
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from edgepack.convert.base import LoadOptions
    from edgepack.convert.sklearn import SklearnConverter
    from edgepack.quantize import Variant
    from edgepack.sample_data import read_sample
    from edgepack.select import EvalData, SelectOptions, _evaluate, _reference_row, run_model

    sample = read_sample(data_dir / "sample.npy")
    source = SklearnConverter().load(data_dir / "classifier.skops", LoadOptions())
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(SklearnConverter().convert(source, sample, {"": 17, "ai.onnx.ml": 3}).SerializeToString())
    shuffled = np.random.default_rng(1).permutation(source.native.predict(sample.rows))
    other = LogisticRegression().fit(sample.rows, shuffled)
    impostor = tmp_path / "impostor.onnx"
    impostor.write_bytes(to_onnx(other, sample.rows[:1], options={"zipmap": False}, target_opset=17).SerializeToString())
    names, outputs = run_model(fp32, sample.rows)
    # Without labels: agreement with fp32 decides.
    unlabelled = EvalData(sample.rows, None, "sample")
    row = _evaluate(Variant("int8-dynamic", impostor), names, source.output_kinds, outputs, unlabelled, None,
                    SelectOptions())
    assert row.verdict == "dropped"
    assert row.reason.startswith("outside tolerance of fp32: label: label agreement")
    # With labels: the task metric against fp32's decides.
    labelled = EvalData(sample.rows, source.native.predict(sample.rows), "labels")
    reference = _reference_row(Variant("fp32", fp32), source.output_kinds, outputs, labelled)
    row = _evaluate(Variant("int8-dynamic", impostor), names, source.output_kinds, outputs, labelled,
                    reference.metric, SelectOptions(max_accuracy_drop=1.0))
    assert reference.metric.value == 1.0
    assert row.verdict == "dropped" and row.reason.startswith("accuracy drop beyond --max-accuracy-drop 1 points")
    assert row.metric.value < 0.9 and row.metric.change.endswith("pt")


def test_quantize_none_and_non_quantizable_model(spec_for):
    none = build(spec_for("classifier.skops", quantize="none"))
    assert [r.name for r in none.variants] == ["fp32"]
    ridge = build(spec_for("regressor.skops", quantize="auto"))
    skipped = next(r for r in ridge.variants if r.name == "int8-dynamic")
    assert skipped.verdict == "skipped" and "no quantizable operators" in skipped.reason


def test_parity_failure_aggregates_outputs(spec_for):
    with pytest.raises(ParityError) as caught:
        build(spec_for("classifier.skops", atol=0.0, rtol=0.0, quantize="none"))
    assert "probabilities" in str(caught.value) and "beyond tolerance" in str(caught.value)


def test_random_rows_when_only_a_shape_is_given(spec_for):
    result = build(spec_for("regressor.skops", sample=None, input_shape="6", quantize="none"))
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
    ({"sample": None}, InputError, "no input signature"),
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
    with pytest.raises(InputError, match="rows have 3 features but MLPClassifier expects 6"):
        build(spec_for("classifier.skops", sample=tmp_path / "narrow.npy"))
