"""The scikit-learn converter: LightGBM/XGBoost estimators of the scikit-learn API (alone and inside
pipelines), and scikit-learn's own internal types that .skops files load without --trust."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pytest
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.convert.base import LoadOptions
from edgepack.convert.skops_trust import SAFE_TYPES
from edgepack.convert.sklearn import SklearnConverter
from edgepack.errors import ConversionError, InputError, UnsupportedHere
from edgepack.samples import conform

INSTALL = "the boosting extra is not installed: pip install -e '.[boosting]'"
FEATURES = 6
OPSETS = {"": 17, "ai.onnx.ml": 3}
runner = CliRunner()


def _table(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)


def _targets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    three = (rows[:, 0] + rows[:, 1] * rows[:, 2] > 0).astype(int) + (rows[:, 3] > 0.8).astype(int)
    value = rows @ np.arange(1, FEATURES + 1, dtype=np.float32) + np.sin(3 * rows[:, 4])
    return three, value


def _convert_and_run(path: Path, options: LoadOptions, rows: np.ndarray):
    converter = SklearnConverter()
    source = converter.load(path, options)
    model = converter.convert(source, conform({"X": rows}, source.inputs, "rows"), OPSETS)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return source, session.run(None, {"X": rows})


def _assert_answers_like(estimator, rows: np.ndarray, outputs: list[np.ndarray]) -> None:
    """ONNX against the estimator itself (not the SourceModel's reference): labels and probabilities,
    or the regression values."""
    if hasattr(estimator, "predict_proba"):
        labels, probabilities = outputs
        assert (labels == estimator.predict(rows)).mean() >= 0.99  # float32 thresholds may flip a row
        np.testing.assert_allclose(probabilities, estimator.predict_proba(rows), atol=1e-5)
    else:
        (values,) = outputs
        np.testing.assert_allclose(values.ravel(), estimator.predict(rows), rtol=1e-5, atol=1e-4)


# -- LightGBM and XGBoost through the scikit-learn API ---------------------------------------------

def _boosting_estimators() -> dict:
    lgb = pytest.importorskip("lightgbm", reason=INSTALL)
    xgb = pytest.importorskip("xgboost", reason=INSTALL)
    pytest.importorskip("onnxmltools", reason=INSTALL)
    small = {"n_estimators": 20, "random_state": 0, "n_jobs": 1}
    return {
        "LGBMClassifier": lambda: lgb.LGBMClassifier(num_leaves=8, verbose=-1, **small),
        "LGBMRegressor": lambda: lgb.LGBMRegressor(num_leaves=8, verbose=-1, **small),
        "XGBClassifier": lambda: xgb.XGBClassifier(max_depth=3, **small),
        "XGBRegressor": lambda: xgb.XGBRegressor(max_depth=3, **small),
        # Scaled columns 0-2, the rest passed through, into LightGBM.
        "Pipeline(ColumnTransformer, LGBMClassifier)": lambda: Pipeline([
            ("columns", ColumnTransformer([("scaled", StandardScaler(), [0, 1, 2])], remainder="passthrough")),
            ("model", lgb.LGBMClassifier(num_leaves=8, verbose=-1, **small)),
        ]),
    }


def _fit(name: str):
    train = _table(1, 400)
    three, value = _targets(train)
    estimator = _boosting_estimators()[name]()
    return estimator.fit(train, value if name.endswith("Regressor") else three)


@pytest.mark.parametrize("name", ["LGBMClassifier", "LGBMRegressor", "XGBClassifier", "XGBRegressor",
                                  "Pipeline(ColumnTransformer, LGBMClassifier)"])
def test_boosting_estimators_convert_from_a_pickle(name, tmp_path):
    estimator = _fit(name)
    joblib.dump(estimator, tmp_path / "model.joblib")
    rows = _table(2, 300)
    source, outputs = _convert_and_run(tmp_path / "model.joblib", LoadOptions(allow_pickle=True), rows)
    _assert_answers_like(estimator, rows, outputs)
    classifier = hasattr(estimator, "predict_proba")
    assert source.estimator == name
    assert source.output_kinds == (("label", "probabilities") if classifier else ("regression",))
    assert source.float32_thresholds and source.converter == "skl2onnx + onnxmltools"
    assert "onnxmltools" in source.versions and ("lightgbm" if "LGBM" in name else "xgboost") in source.versions
    expected = [np.asarray(value) for value in source.predict({"X": rows})]  # what parity compares
    assert len(expected) == len(outputs)


def test_xgboost_feature_names_do_not_stop_the_conversion(tmp_path):
    # A model fitted on a DataFrame names its features; onnxmltools reads splits by f0, f1, ...
    estimator = _fit("XGBRegressor")
    estimator.get_booster().feature_names = [f"column_{i}" for i in range(FEATURES)]
    joblib.dump(estimator, tmp_path / "named.joblib")
    rows = _table(2, 100)
    _, outputs = _convert_and_run(tmp_path / "named.joblib", LoadOptions(allow_pickle=True), rows)
    _assert_answers_like(estimator, rows, outputs)


def test_boosting_estimator_in_skops_needs_its_trust_flags(tmp_path):
    estimator = _fit("LGBMClassifier")
    sio.dump(estimator, tmp_path / "model.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "model.skops")
    # LightGBM's own types are outside the allowlist: their state runs LightGBM's native model parser.
    with pytest.raises(InputError) as caught:
        SklearnConverter().load(tmp_path / "model.skops", LoadOptions())
    assert caught.value.hint == "review them, then pass " + " ".join(f"--trust {name}" for name in untrusted)
    assert "lightgbm.basic.Booster" in untrusted
    rows = _table(2, 200)
    _, outputs = _convert_and_run(tmp_path / "model.skops", LoadOptions(trust=tuple(untrusted)), rows)
    _assert_answers_like(estimator, rows, outputs)


@pytest.mark.parametrize("make, message", [
    (lambda lgb, xgb: lgb.LGBMRegressor(objective="mape", n_estimators=3, verbose=-1),
     "cannot convert LightGBM models with objective 'mape'"),
    (lambda lgb, xgb: xgb.XGBClassifier(objective="multi:softmax", n_estimators=3),
     "cannot convert XGBoost models with objective 'multi:softmax'"),
    (lambda lgb, xgb: lgb.LGBMRegressor(objective="binary", n_estimators=3, verbose=-1),
     "LGBMRegressor was trained with a classifier's objective"),
])
def test_unfaithful_objectives_are_refused_at_load(tmp_path, make, message):
    lgb = pytest.importorskip("lightgbm", reason=INSTALL)
    xgb = pytest.importorskip("xgboost", reason=INSTALL)
    train = _table(1, 200)
    three, value = _targets(train)
    estimator = make(lgb, xgb)
    estimator.fit(train, (three > 0).astype(int) if "binary" in str(estimator.objective) else
                  three if "softmax" in str(estimator.objective) else np.abs(value) + 1)
    joblib.dump(make_pipeline(StandardScaler(), estimator), tmp_path / "model.joblib")
    with pytest.raises(ConversionError, match=message) as caught:
        SklearnConverter().load(tmp_path / "model.joblib", LoadOptions(allow_pickle=True))
    assert caught.value.hint and "\n" not in str(caught.value)


def test_missing_onnxmltools_says_how_to_install(tmp_path, monkeypatch):
    joblib.dump(_fit("XGBClassifier"), tmp_path / "model.joblib")
    monkeypatch.setitem(sys.modules, "onnxmltools", None)  # what an environment without the extra gives
    with pytest.raises(UnsupportedHere, match="onnxmltools is not installed") as caught:
        SklearnConverter().load(tmp_path / "model.joblib", LoadOptions(allow_pickle=True))
    assert 'pip install -e ".[boosting]"' in caught.value.hint


def test_cli_builds_a_pipeline_with_lightgbm(tmp_path):
    joblib.dump(_fit("Pipeline(ColumnTransformer, LGBMClassifier)"), tmp_path / "model.joblib")
    np.save(tmp_path / "sample.npy", _table(2, 200))
    arguments = ["build", str(tmp_path / "model.joblib"), "--sample", str(tmp_path / "sample.npy"),
                 "--quantize", "none", "--bench-time", "0.1", "--no-lock", "--out", str(tmp_path / "dist"),
                 "--json", "--quiet"]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 3 and "--allow-pickle" in refused.stderr
    result = runner.invoke(app, [*arguments, "--allow-pickle"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parity"]["passed"] and Path(summary["bundle"]).is_file()


# -- scikit-learn's internal types in .skops files --------------------------------------------------

def _deep_targets(rows: np.ndarray) -> np.ndarray:
    return ((rows[:, 0] * rows[:, 1] > 0) ^ (np.sin(2 * rows[:, 2]) > rows[:, 3])).astype(int)


SKOPS_MODELS = {
    "RandomForestClassifier": lambda: RandomForestClassifier(n_estimators=5, max_depth=6, random_state=0),
    "GradientBoostingClassifier": lambda: GradientBoostingClassifier(n_estimators=5, random_state=0),
    "GradientBoostingRegressor": lambda: GradientBoostingRegressor(n_estimators=5, random_state=0),
    "HistGradientBoostingClassifier": lambda: HistGradientBoostingClassifier(max_iter=5, random_state=0),
    "MLPClassifier": lambda: MLPClassifier(hidden_layer_sizes=(8,), solver="adam", max_iter=30, random_state=0),
}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("name", list(SKOPS_MODELS))
def test_internal_types_load_without_trust(name, tmp_path):
    train = _table(1, 300)
    labels = _deep_targets(train)
    estimator = SKOPS_MODELS[name]().fit(train, labels if "Classifier" in name else train @ np.arange(FEATURES))
    sio.dump(estimator, tmp_path / "model.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "model.skops")
    assert untrusted and set(untrusted) <= set(SAFE_TYPES), untrusted  # skops alone would refuse the file
    rows = _table(2, 200)
    if name.startswith("HistGradientBoosting"):
        # skl2onnx 1.20 cannot convert it with onnx 1.23 (a boolean in an ints attribute); loading is the point.
        source = SklearnConverter().load(tmp_path / "model.skops", LoadOptions())
        np.testing.assert_array_equal(source.native.predict(rows), estimator.predict(rows))
        return
    source, outputs = _convert_and_run(tmp_path / "model.skops", LoadOptions(), rows)
    assert source.estimator == name and source.file_format == "skops"
    _assert_answers_like(estimator, rows, outputs)


def shifted(rows):  # a function of this module: a FunctionTransformer's func skops does not know
    return rows + 1.0


def test_other_types_still_need_trust(tmp_path):
    train = _table(1, 100)
    pipeline = make_pipeline(FunctionTransformer(shifted), RandomForestClassifier(n_estimators=3, random_state=0))
    sio.dump(pipeline.fit(train, _deep_targets(train)), tmp_path / "model.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "model.skops")
    outside = [name for name in untrusted if name not in SAFE_TYPES]
    assert outside == [f"{shifted.__module__}.shifted"]
    with pytest.raises(InputError, match="types skops does not trust by default") as caught:
        SklearnConverter().load(tmp_path / "model.skops", LoadOptions())
    assert caught.value.hint == f"review them, then pass --trust {outside[0]}"  # the tree needs none
    assert "sklearn.tree._tree.Tree" not in str(caught.value)
    assert SklearnConverter().load(tmp_path / "model.skops", LoadOptions(trust=tuple(outside))).native is not None


def _set_node(tree, field: str, value: int, node: int = 0) -> None:
    state = tree.__getstate__()
    state["nodes"][field][node] = value
    tree.__setstate__(state)


def _forest(**changes):
    train = _table(1, 300)
    forest = RandomForestClassifier(n_estimators=3, max_depth=5, random_state=0).fit(train, _deep_targets(train))
    for field, value in changes.items():
        _set_node(forest.estimators_[1].tree_, field, value)
    return forest


def _gradient_boosting_with_extra_column():
    train = _table(1, 200)
    boosting = GradientBoostingClassifier(n_estimators=3, random_state=0).fit(train, _deep_targets(train))
    boosting.estimators_ = np.concatenate([boosting.estimators_, boosting.estimators_], axis=1)
    return boosting


def _hist_gradient_boosting(field: str, value: int):
    train = _table(1, 200)
    boosting = HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(train, _deep_targets(train))
    boosting._predictors[1][0].nodes[field][0] = value
    return boosting


@pytest.mark.parametrize("make, message", [
    # Indices scikit-learn's compiled predict follows without bounds checks: out of the tree, a cycle,
    # a feature past the input's columns, a leaf with one child.
    (lambda: _forest(left_child=10**6), "DecisionTreeClassifier.tree_ has a child index outside the tree"),
    (lambda: _forest(right_child=0), "DecisionTreeClassifier.tree_ has a child index outside the tree or before its parent"),
    (lambda: _forest(feature=99), "DecisionTreeClassifier.tree_ splits on a feature outside its 6"),
    (lambda: _forest(right_child=-1), "DecisionTreeClassifier.tree_ has a node with one child"),
    (_gradient_boosting_with_extra_column, "GradientBoostingClassifier has 2 trees per stage for 1 outputs"),
    (lambda: _hist_gradient_boosting("feature_idx", 50), "splits on a feature outside the model's 6"),
    (lambda: _hist_gradient_boosting("left", 0), "has a child index outside the tree or before its parent"),
])
def test_inconsistent_internal_types_are_refused(tmp_path, make, message):
    sio.dump(make(), tmp_path / "crafted.skops")
    with pytest.raises(InputError, match="crafted.skops is not a consistent scikit-learn model") as caught:
        SklearnConverter().load(tmp_path / "crafted.skops", LoadOptions())
    assert message in caught.value.message and "skops.io.dump" in caught.value.hint


def test_a_narrower_forest_than_its_trees_is_refused(tmp_path):
    forest = _forest()
    forest.n_features_in_ = 3  # the forest would hand its trees 3 columns; they read up to 6
    sio.dump(forest, tmp_path / "narrow.skops")
    with pytest.raises(InputError, match=r"RandomForestClassifier.estimators_\[0\] takes 6 features of 3"):
        SklearnConverter().load(tmp_path / "narrow.skops", LoadOptions())
