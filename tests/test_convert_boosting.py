"""LightGBM and XGBoost: native model files through the converter, the build and the command line."""

from __future__ import annotations

import json
import runpy
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

INSTALL = "the boosting extra is not installed: pip install -e '.[boosting]'"
lgb = pytest.importorskip("lightgbm", reason=INSTALL)
xgb = pytest.importorskip("xgboost", reason=INSTALL)
pytest.importorskip("onnxmltools", reason=INSTALL)

from cli_checks import assert_one_line_error  # noqa: E402
from edgepack.cli import app  # noqa: E402
from edgepack.convert.base import LoadOptions  # noqa: E402
from edgepack.convert.boosting import BoostingConverter  # noqa: E402
from edgepack.convert.registry import converter_for  # noqa: E402
from edgepack.errors import ConversionError, InputError, UnsupportedHere  # noqa: E402
from edgepack.pipeline import build  # noqa: E402
from edgepack.runtime.session import create_session  # noqa: E402
from edgepack.samples import read_sample  # noqa: E402
from edgepack.spec import BuildSpec  # noqa: E402
from edgepack.parity import PARITY, compare  # noqa: E402

FEATURES = 6
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def _table(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)


def _targets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    binary = (rows[:, 0] + rows[:, 1] * rows[:, 2] > 0).astype(int)
    three = binary + (rows[:, 3] > 0.8).astype(int)
    value = rows @ np.arange(1, FEATURES + 1, dtype=np.float32) + np.sin(3 * rows[:, 4])
    return binary, three, value


@pytest.fixture(scope="session")
def boost_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny boosters in each native format, saved through both the Booster and the scikit-learn APIs."""
    root = tmp_path_factory.mktemp("boosters")
    train = _table(1, 400)
    binary, three, value = _targets(train)
    np.save(root / "sample.npy", _table(2, 300))
    small = {"n_estimators": 20, "random_state": 0, "n_jobs": 1}
    lgb.LGBMClassifier(num_leaves=8, verbose=-1, **small).fit(train, binary).booster_.save_model(
        root / "lgbm_classifier.txt")
    lgb.train({"objective": "regression", "num_leaves": 8, "verbose": -1, "num_threads": 1},
              lgb.Dataset(train, value), num_boost_round=20).save_model(root / "lgbm_regressor.txt")
    xgb.XGBClassifier(max_depth=3, **small).fit(train, three).save_model(root / "xgb_classifier.json")
    xgb.train({"objective": "reg:squarederror", "max_depth": 3, "nthread": 1},
              xgb.DMatrix(train, value), num_boost_round=20).save_model(root / "xgb_regressor.ubj")
    return root


def _spec(boost_dir: Path, model: str, out: Path, **overrides) -> BuildSpec:
    fields = {"model": boost_dir / model, "sample": boost_dir / "sample.npy", "out": out, "bench_time_s": 0.2,
              **overrides}
    return BuildSpec(**fields)


def _bundled_model(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as archive:
        name = next(n for n in archive.getnames() if n.endswith("/model.onnx"))
        dest.write_bytes(archive.extractfile(name).read())
        manifest = next(n for n in archive.getnames() if n.endswith("/manifest.json"))
        (dest.parent / "manifest.json").write_bytes(archive.extractfile(manifest).read())
    return dest


def _flips(reference: list[np.ndarray], got: list[np.ndarray], kinds: tuple[str, ...]) -> np.ndarray:
    """Rows whose answer differs past parity's tolerance: a sample on the other side of a float32 split."""
    flipped = np.zeros(len(reference[0]), dtype=bool)
    for ref, out, kind in zip(reference, got, kinds):
        ref, out = np.asarray(ref).reshape(len(flipped), -1), np.asarray(out).reshape(len(flipped), -1)
        if kind == "label":
            flipped |= (ref != out).any(axis=1)
        else:
            flipped |= ~np.isclose(out, ref, atol=PARITY.atol, rtol=PARITY.rtol).all(axis=1)
    return flipped


@pytest.mark.parametrize("model, framework, file_format, kinds, output_shapes", [
    ("lgbm_classifier.txt", "LightGBM", "lightgbm-text", ["label", "probabilities"], [["batch"], ["batch", 2]]),
    ("lgbm_regressor.txt", "LightGBM", "lightgbm-text", ["regression"], [["batch", 1]]),
    ("xgb_classifier.json", "XGBoost", "xgboost-json", ["label", "probabilities"], [["batch"], ["batch", 3]]),
    ("xgb_regressor.ubj", "XGBoost", "xgboost-ubjson", ["regression"], [["batch", 1]]),
])
def test_build_each_booster_kind(boost_dir, tmp_path, model, framework, file_format, kinds, output_shapes):
    result = build(_spec(boost_dir, model, tmp_path / "dist"))
    assert result.parity.passed, result.parity.failures()
    assert [d.kind for d in result.parity.outputs] == kinds
    onnx_path = _bundled_model(result.bundle, tmp_path / "model.onnx")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    source = manifest["source"]
    assert (source["framework"], source["format"], source["converter"]) == (framework, file_format, "onnxmltools")
    assert set(source["versions"]) >= {framework.lower(), "onnxmltools", "onnx"}
    assert manifest["inputs"][0]["name"] == "X" and manifest["inputs"][0]["shape"] == ["batch", FEATURES]
    assert [o["shape"] for o in manifest["outputs"]] == output_shapes
    import onnx

    declared = {o.domain: o.version for o in onnx.load(onnx_path).opset_import}
    assert declared[""] == manifest["target"]["opset"]
    # The bundled model answers like the original on fresh rows too, allowing for samples that land on
    # the other side of a split whose threshold was rounded to float32 (none are expected here).
    loaded = BoostingConverter().load(boost_dir / model, LoadOptions())
    rows = _table(7, 500)
    session, _ = create_session(onnx_path)
    flipped = _flips(loaded.predict({"X": rows}), session.run(None, {"X": rows}), loaded.output_kinds)
    assert flipped.mean() <= 0.01


def test_same_booster_gives_the_same_bundle(boost_dir, tmp_path):
    first = build(_spec(boost_dir, "lgbm_classifier.txt", tmp_path / "a", quantize="none"))
    second = build(_spec(boost_dir, "lgbm_classifier.txt", tmp_path / "b", quantize="none"))
    assert first.bundle_sha256 == second.bundle_sha256


def test_source_model_contract(boost_dir):
    source = BoostingConverter().load(boost_dir / "xgb_classifier.json", LoadOptions())
    assert source.float32_thresholds and source.converter == "onnxmltools"
    assert source.inputs[0].dims == ("?", FEATURES) and source.output_kinds == ("label", "probabilities")
    assert set(source.versions) == {"xgboost", "onnxmltools"}
    labels, probabilities = source.predict({"X": _table(3, 4)})
    assert labels.shape == (4,) and probabilities.shape == (4, 3)
    binary = BoostingConverter().load(boost_dir / "lgbm_classifier.txt", LoadOptions())
    labels, probabilities = binary.predict({"X": _table(3, 4)})  # (N, 2) like the ONNX model, not LightGBM's (N,)
    assert probabilities.shape == (4, 2) and np.array_equal(labels, probabilities.argmax(axis=1))
    assert binary.estimator == "LightGBM Booster (objective binary, 20 trees)"


@pytest.mark.parametrize("framework, objective", [
    ("lightgbm", "multiclass"), ("lightgbm", "poisson"), ("lightgbm", "quantile"),
    ("xgboost", "binary:logistic"), ("xgboost", "binary:hinge"), ("xgboost", "count:poisson"),
    ("xgboost", "reg:absoluteerror"),
])
def test_supported_objectives_convert_faithfully(tmp_path, framework, objective):
    train = _table(4, 300)
    binary, three, value = _targets(train)
    if framework == "lightgbm":
        target = three if objective == "multiclass" else np.abs(value)
        extra = {"num_class": 3} if objective == "multiclass" else {}
        path = tmp_path / "model.txt"
        lgb.train({"objective": objective, "num_leaves": 8, "verbose": -1, "num_threads": 1, **extra},
                  lgb.Dataset(train, target), num_boost_round=10).save_model(path)
    else:
        target = binary if objective.startswith("binary") else np.abs(value)
        path = tmp_path / "model.json"
        xgb.train({"objective": objective, "max_depth": 3, "nthread": 1}, xgb.DMatrix(train, target),
                  num_boost_round=10).save_model(path)
    converter = converter_for(path)
    source = converter.load(path, LoadOptions())
    sample = read_sample(_save(tmp_path / "sample.npy", _table(5, 200)), source.inputs)
    model = converter.convert(source, sample, {"": 21, "ai.onnx.ml": 4})
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    session, _ = create_session(tmp_path / "model.onnx")
    names = [o.name for o in session.get_outputs()]
    report = compare(source.predict(sample.arrays), session.run(None, sample.arrays), names,
                     source.output_kinds, PARITY)
    assert report.passed, report.failures()


def _save(path: Path, rows: np.ndarray) -> Path:
    np.save(path, rows)
    return path


def test_example_builds_and_keeps_its_accuracy(tmp_path):
    result = build(BuildSpec(model=EXAMPLES / "tabular_lgbm.txt", sample=EXAMPLES / "tabular_sample.npy",
                             validation=EXAMPLES / "tabular_validation.npz", out=tmp_path / "dist",
                             bench_time_s=0.2, quantize="auto"))
    assert result.parity.passed and result.parity.samples == 1000
    # A tree model has nothing for int8 to quantize, and says so plainly.
    for row in result.variants:
        if row.name.startswith("int8"):
            assert row.verdict == "skipped" and row.reason == "not applicable: no quantizable operators (MatMul, Gemm, Conv) in the model"
    chosen = next(r for r in result.variants if r.verdict == "chosen")
    if chosen.name != "fp32":
        assert chosen.bench["p50_ms"] < result.variants[0].bench["p50_ms"]
    assert result.manifest.inputs[0].shape == ["batch", 20]
    session, _ = create_session(_bundled_model(result.bundle, tmp_path / "model.onnx"))
    validation = np.load(EXAMPLES / "tabular_validation.npz")
    labels = session.run(None, {"X": validation["X"]})[0]
    original = lgb.Booster(model_file=EXAMPLES / "tabular_lgbm.txt").predict(validation["X"]).argmax(axis=1)
    assert np.array_equal(labels, original)
    assert (labels == validation["y"]).mean() > 0.8


def test_example_script_reproduces_the_committed_files(tmp_path, monkeypatch):
    script = runpy.run_path(str(EXAMPLES / "make_lightgbm.py"))
    monkeypatch.setitem(script["main"].__globals__, "HERE", tmp_path)
    script["main"]()
    for name in ("tabular_sample.npy",):
        assert np.array_equal(np.load(tmp_path / name), np.load(EXAMPLES / name))
    rows = np.load(EXAMPLES / "tabular_sample.npy")
    fresh = lgb.Booster(model_file=tmp_path / "tabular_lgbm.txt").predict(rows)
    committed = lgb.Booster(model_file=EXAMPLES / "tabular_lgbm.txt").predict(rows)
    np.testing.assert_allclose(fresh, committed, atol=1e-9)
    assert (tmp_path / "tabular_lgbm.txt").stat().st_size < 1_000_000


@pytest.mark.parametrize("name, claimed", [
    ("lgbm_classifier.txt", True), ("xgb_classifier.json", True), ("xgb_regressor.ubj", True),
    ("notes.txt", False), ("config.json", False), ("sample.npy", False),
])
def test_claims_only_native_booster_files(boost_dir, tmp_path, name, claimed):
    path = boost_dir / name if (boost_dir / name).exists() else tmp_path / name
    if not path.exists():
        path.write_text("tree of life\n" if name.endswith(".txt") else '{"version": [1, 0, 0]}')
    assert BoostingConverter().claims(path) is claimed


def _bad_models(boost_dir: Path, tmp: Path) -> dict[str, Path]:
    """Each kind of bad input, written next to the good models it was made from."""
    text = (boost_dir / "lgbm_classifier.txt").read_bytes()
    train = _table(6, 200)
    binary, three, _ = _targets(train)
    files = {
        "notes.txt": b"some notes, not a model\n",
        "config.json": b'{"learning_rate": 0.1}',
        "truncated.txt": text[: len(text) // 2],
        "no_classes.txt": b"\n".join(line for line in text.split(b"\n") if not line.startswith(b"num_class=")),
        "corrupt.ubj": bytes(range(256)) * 4,
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    xgb.train({"objective": "binary:logitraw", "max_depth": 2}, xgb.DMatrix(train, binary),
              num_boost_round=3).save_model(tmp / "logitraw.json")
    lgb.train({"objective": "multiclassova", "num_class": 3, "verbose": -1}, lgb.Dataset(train, three),
              num_boost_round=3).save_model(tmp / "ova.txt")
    np.save(tmp / "narrow.npy", train[:, :3])
    return {name: tmp / name for name in [*files, "logitraw.json", "ova.txt", "narrow.npy"]}


BAD_INPUTS = [
    ("notes.txt", None, InputError, 3, "notes.txt: edgepack cannot read .txt files"),
    ("config.json", None, InputError, 3, "config.json: edgepack cannot read .json files"),
    ("truncated.txt", None, InputError, 3, "truncated.txt is not a complete LightGBM text model"),
    ("no_classes.txt", None, InputError, 3, "not a readable LightGBM model (Model file doesn't specify the number"),
    ("corrupt.ubj", None, InputError, 3, "corrupt.ubj is not a readable XGBoost model"),
    ("logitraw.json", None, ConversionError, 4, "cannot convert XGBoost models with objective 'binary:logitraw'"),
    ("ova.txt", None, ConversionError, 4, "cannot convert LightGBM models with objective 'multiclassova'"),
    ("lgbm_classifier.txt", "narrow.npy", InputError, 3,
     "sample narrow.npy: input 'X' takes [?, 6], given [200, 3]"),
]


@pytest.mark.parametrize("model, sample, error, code, text", BAD_INPUTS)
def test_bad_inputs_raise_their_error(boost_dir, tmp_path, capfd, model, sample, error, code, text):
    bad = _bad_models(boost_dir, tmp_path)
    spec = BuildSpec(model=bad.get(model, boost_dir / model), out=tmp_path / "dist", bench_time_s=0.2,
                     sample=bad[sample] if sample else boost_dir / "sample.npy")
    with pytest.raises(error) as caught:
        build(spec)
    assert text in str(caught.value) and caught.value.hint
    assert int(caught.value.exit_code) == code
    # Nothing from the frameworks' native code on the terminal: the error is the only message.
    assert "[LightGBM]" not in capfd.readouterr().err


def test_bad_inputs_through_the_cli_give_one_line(boost_dir, tmp_path):
    bad = _bad_models(boost_dir, tmp_path)
    for model, sample, _, code, text in BAD_INPUTS:
        model_path = bad.get(model, boost_dir / model)
        sample_path = bad[sample] if sample else boost_dir / "sample.npy"
        result = runner.invoke(app, ["build", str(model_path), "-s", str(sample_path), "--quiet",
                                     "--out", str(tmp_path / "out")])
        assert_one_line_error(result, code, text, model)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_builds_a_booster(boost_dir, tmp_path):
    result = runner.invoke(app, ["build", str(boost_dir / "xgb_regressor.ubj"), "--sample",
                                 str(boost_dir / "sample.npy"), "--out", str(tmp_path), "--bench-time", "0.2",
                                 "--quiet", "--json", "--target", "edge"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parity"]["passed"] and Path(summary["bundle"]).is_file()
    assert summary["variant"] == "fp32"  # tree ensembles have nothing to quantize


def test_missing_extra_says_how_to_install(boost_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxmltools", None)  # what an environment without the extra gives
    with pytest.raises(UnsupportedHere) as caught:
        BoostingConverter().load(boost_dir / "lgbm_regressor.txt", LoadOptions())
    assert "onnxmltools is not installed" in str(caught.value)
    assert 'pip install -e ".[boosting]"' in caught.value.hint
