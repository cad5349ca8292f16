"""LightGBM and XGBoost boosters: their native model files (never pickles) to ONNX via onnxmltools.

LightGBM: the text model of ``Booster.save_model("model.txt")``. XGBoost: the JSON or UBJSON model of
``save_model("model.json" | "model.ubj")``, from a Booster or the scikit-learn wrappers alike.

The scikit-learn API estimators (``LGBMClassifier``, ``XGBRegressor``, ...) inside a pickled or skops
scikit-learn model are converted by the scikit-learn converter; ``register_sklearn_api`` below
teaches skl2onnx onnxmltools' converters for them, under the same objective checks as the files here.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from edgepack.convert.base import LoadOptions, OutputKind, SourceModel
from edgepack.errors import ConversionError, InputError, UnsupportedHere
from edgepack.runtime.bundle import sha256_file
from edgepack.samples import Examples
from edgepack.signature import TensorInfo

INPUT_NAME = "X"
INSTALL_HINT = 'install the boosting extra: pip install -e ".[boosting]"'
# Objectives whose ONNX form onnxmltools writes faithfully (checked against the frameworks' own answers).
# Left out: LightGBM multiclassova (probabilities are not normalised the same way), cross_entropy, mape,
# fair, ranking; XGBoost multi:softmax (ONNX would give margins for probabilities), reg:logistic and
# binary:logitraw (wrong or no post-transform), ranking, survival.
LIGHTGBM_OBJECTIVES = {
    "binary": "classifier", "multiclass": "classifier",
    "regression": "regressor", "regression_l1": "regressor", "huber": "regressor", "quantile": "regressor",
    "poisson": "regressor", "gamma": "regressor", "tweedie": "regressor",
}
XGBOOST_OBJECTIVES = {
    "binary:logistic": "classifier", "binary:hinge": "classifier", "multi:softprob": "classifier",
    "reg:squarederror": "regressor", "reg:squaredlogerror": "regressor", "reg:absoluteerror": "regressor",
    "reg:pseudohubererror": "regressor", "reg:quantileerror": "regressor", "count:poisson": "regressor",
    "reg:gamma": "regressor", "reg:tweedie": "regressor",
}


class BoostingConverter:
    name = "LightGBM/XGBoost"
    formats = "LightGBM .txt (Booster.save_model), XGBoost .json/.ubj (save_model)"

    def claims(self, path: Path) -> bool:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _starts_like_lightgbm(path)
        if suffix == ".json":
            return _parses_as_xgboost_json(path)
        return suffix == ".ubj"

    def load(self, path: Path, options: LoadOptions) -> SourceModel:
        if path.suffix.lower() == ".txt":
            return _load_lightgbm(path)
        return _load_xgboost(path)

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]) -> onnx.ModelProto:
        rows = sample.arrays[INPUT_NAME]
        if rows.ndim != 2 or sample.stacked:
            raise InputError(f"{source.framework} models take a table of rows; the sample has shape "
                             f"{list(rows.shape)}", "pass a 2-D sample (rows x features)")
        onnxmltools = _require("onnxmltools", source.framework)
        from onnxmltools.convert.common.data_types import FloatTensorType
        from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

        # onnxmltools writes up to its own newest opset (15 in 1.16); the result is raised to the
        # target's opset below, so the model declares what the target profile runs.
        opset = min(opsets[""], get_maximum_opset_supported())
        inputs = [(INPUT_NAME, FloatTensorType([None, rows.shape[1]]))]
        # A fixed graph name: onnxmltools' default is a random UUID, which would change the bundle's bytes.
        name = source.framework.lower()
        try:
            if source.framework == "LightGBM":
                # zipmap=False: a tensor of probabilities rather than a list of dicts, what clients want.
                model = onnxmltools.convert_lightgbm(source.native, name=name, initial_types=inputs,
                                                     target_opset=opset, zipmap=False)
            else:  # XGBoost classifiers always write a probability tensor
                model = onnxmltools.convert_xgboost(source.native, name=name, initial_types=inputs,
                                                    target_opset=opset)
        except Exception as err:  # onnxmltools reports unsupported trees and options with many types
            raise ConversionError(f"onnxmltools failed on {source.estimator}: {_first_line(err)}",
                                  "run with --debug for the traceback and report the model's parameters") from err
        model = _at_opset(model, opsets[""])
        _declare_outputs(model, source)
        return model


# -- detection ---------------------------------------------------------------------------------------

def _starts_like_lightgbm(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return _lightgbm_opening(handle.read(64))
    except OSError:
        return False


def _lightgbm_opening(head: bytes) -> bool:
    """LightGBM text models open with a line ``tree`` and then ``version=v<N>``."""
    lines = head.split(b"\n")
    return len(lines) > 2 and lines[0].strip() == b"tree" and lines[1].startswith(b"version=")


def _parses_as_xgboost_json(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            document = json.load(handle)
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return isinstance(document, dict) and "learner" in document


# -- LightGBM ----------------------------------------------------------------------------------------

def _load_lightgbm(path: Path) -> SourceModel:
    lightgbm = _require("lightgbm", "LightGBM")
    onnxmltools = _require("onnxmltools", "LightGBM")
    text = path.read_bytes()
    header = _lightgbm_header(path, text)
    try:
        with _quiet_native_stderr():
            booster = lightgbm.Booster(model_str=text.decode("utf-8"))
    except Exception as err:  # LightGBMError, or a decoding error on a binary file
        raise InputError(f"{path.name} is not a readable LightGBM model ({_first_line(err)})",
                         "re-save it with Booster.save_model") from None
    objective_line = header.get("objective", "")
    kind = _lightgbm_kind(path.name, objective_line, bool(booster.params.get("linear_tree")))
    objective = objective_line.split()[0]
    classifier = kind == "classifier"
    return SourceModel(
        framework="LightGBM",
        file_format="lightgbm-text",
        path=path,
        sha256=sha256_file(path),
        estimator=f"LightGBM Booster (objective {objective}, {booster.num_trees()} trees)",
        inputs=(TensorInfo(INPUT_NAME, "float32", ("?", int(booster.num_feature()))),),
        output_kinds=_output_kinds(kind),
        predict=lambda feed: _lightgbm_outputs(booster, classifier, feed[INPUT_NAME]),
        native=booster,
        versions={"lightgbm": lightgbm.__version__, "onnxmltools": onnxmltools.__version__},
        converter="onnxmltools",
        float32_thresholds=True,
    )


def _lightgbm_header(path: Path, text: bytes) -> dict[str, str]:
    """The ``key=value`` lines before the first tree, after checking the trees lie inside the file.

    LightGBM reads the trees in parallel at the byte offsets ``tree_sizes`` gives, without checking
    them against the file's length: a truncated file makes it read past the end or abort the process.
    """
    invalid = InputError(f"{path.name} is not a complete LightGBM text model",
                         "re-save it with Booster.save_model; the file may be truncated")
    trees_at = text.find(b"\nTree=")
    if not _lightgbm_opening(text[:64]) or trees_at < 0:
        raise invalid
    header: dict[str, str] = {}
    for line in text[:trees_at].decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    if "tree_sizes" in header:
        try:
            sizes = [int(size) for size in header["tree_sizes"].split()]
        except ValueError:
            raise invalid from None
        start = trees_at + 1
        offsets = np.cumsum([0, *sizes])
        if start + offsets[-1] > len(text) or any(not text.startswith(b"Tree=", start + int(o)) for o in offsets[:-1]):
            raise invalid
    return header


def _lightgbm_kind(name: str, objective_line: str, linear_tree: bool) -> str:
    """"classifier" or "regressor" for a model onnxmltools converts faithfully; ConversionError otherwise.

    ``objective_line``: the text model's ``objective=`` value, e.g. ``binary sigmoid:1``.
    """
    objective, *settings = objective_line.split()
    kind = LIGHTGBM_OBJECTIVES.get(objective)
    if kind is None:
        raise ConversionError(f"edgepack cannot convert LightGBM models with objective {objective or 'none'!r}",
                              f"supported objectives: {', '.join(LIGHTGBM_OBJECTIVES)}")
    if linear_tree:
        raise ConversionError(f"{name} has linear trees, which onnxmltools does not convert",
                              "retrain with linear_tree=False")
    if any(s.startswith("sigmoid:") and float(s.split(":")[1]) != 1.0 for s in settings):
        raise ConversionError(f"{name} uses a sigmoid scale other than 1, which onnxmltools ignores",
                              "retrain with sigmoid=1.0")
    return kind


def _lightgbm_outputs(booster: Any, classifier: bool, rows: np.ndarray) -> list[np.ndarray]:
    """LightGBM's answers, shaped like the ONNX outputs: labels and (N, classes) probabilities, or (N, 1)."""
    scores = np.asarray(booster.predict(rows.reshape(len(rows), -1).astype(np.float64)))
    if not classifier:
        return [scores.reshape(len(rows), 1)]
    probabilities = np.column_stack([1.0 - scores, scores]) if scores.ndim == 1 else scores
    return [probabilities.argmax(axis=1), probabilities]


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """LightGBM's C++ core prints ``[LightGBM] [Fatal] ...`` to file descriptor 2 before raising the same text."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- XGBoost -----------------------------------------------------------------------------------------

def _load_xgboost(path: Path) -> SourceModel:
    xgboost = _require("xgboost", "XGBoost")
    onnxmltools = _require("onnxmltools", "XGBoost")
    try:
        booster = xgboost.Booster(model_file=str(path))
        learner = json.loads(booster.save_config())["learner"]
    except Exception as err:  # XGBoostError, or a decoding error on a corrupt UBJSON file
        raise InputError(f"{path.name} is not a readable XGBoost model ({_first_line(err)})",
                         "re-save it with save_model(\"model.json\") or (\"model.ubj\")") from None
    objective = learner["objective"]["name"]
    kind = _xgboost_kind(path.name, learner)
    # The scikit-learn wrapper, loaded from the same file, is what onnxmltools converts most surely: it
    # carries the objective and classes (a bare Booster makes onnxmltools guess them from the trees).
    model = (xgboost.XGBClassifier if kind == "classifier" else xgboost.XGBRegressor)()
    model.load_model(str(path))
    # onnxmltools maps splits to columns by the names f0, f1, ...; edgepack feeds unnamed columns in order.
    model.get_booster().feature_names = None
    trees = learner["gradient_booster"]["gbtree_model_param"]["num_trees"]
    return SourceModel(
        framework="XGBoost",
        file_format="xgboost-json" if path.suffix.lower() == ".json" else "xgboost-ubjson",
        path=path,
        sha256=sha256_file(path),
        estimator=f"XGBoost Booster (objective {objective}, {trees} trees)",
        inputs=(TensorInfo(INPUT_NAME, "float32", ("?", int(booster.num_features()))),),
        output_kinds=_output_kinds(kind),
        predict=lambda feed: _xgboost_outputs(model, kind, feed[INPUT_NAME]),
        native=model,
        versions={"xgboost": xgboost.__version__, "onnxmltools": onnxmltools.__version__},
        converter="onnxmltools",
        float32_thresholds=True,
    )


def _xgboost_kind(name: str, learner: dict[str, Any]) -> str:
    """"classifier" or "regressor" for a learner (``save_config()["learner"]``) onnxmltools converts."""
    objective = learner["objective"]["name"]
    kind = XGBOOST_OBJECTIVES.get(objective)
    if kind is None:
        raise ConversionError(f"edgepack cannot convert XGBoost models with objective {objective!r}",
                              f"supported objectives: {', '.join(XGBOOST_OBJECTIVES)}")
    gradient_booster = learner["gradient_booster"]["name"]
    if gradient_booster != "gbtree":
        raise ConversionError(f"{name} uses the {gradient_booster} booster; onnxmltools converts gbtree only",
                              "retrain with booster=\"gbtree\"")
    if int(learner["learner_model_param"].get("num_target", 1)) != 1:
        raise ConversionError(f"{name} predicts several targets; edgepack converts single-target models",
                              "train one model per target")
    return kind


def _xgboost_outputs(model: Any, kind: str, rows: np.ndarray) -> list[np.ndarray]:
    table = rows.reshape(len(rows), -1)
    if kind == "classifier":
        return [np.asarray(model.predict(table)), np.asarray(model.predict_proba(table))]
    return [np.asarray(model.predict(table)).reshape(len(rows), 1)]


# -- the scikit-learn API, inside scikit-learn models -----------------------------------------------

# What skl2onnx learns to convert, by the estimator's full type name: onnxmltools' converter for the
# framework and skl2onnx's shape calculator for the kind (the mechanism skl2onnx documents in
# "Convert a pipeline with a LightGBM classifier" / "... with a XGBoost model").
SKLEARN_API_TYPES = {
    "lightgbm.sklearn.LGBMClassifier": "classifier",
    "lightgbm.sklearn.LGBMRegressor": "regressor",
    "xgboost.sklearn.XGBClassifier": "classifier",
    "xgboost.sklearn.XGBRegressor": "regressor",
}
# The parser options a classifier's converter accepts: zipmap=False gives a probability tensor.
CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
_registered: set[type] = set()


def is_sklearn_api(estimator: Any) -> bool:
    """A LightGBM or XGBoost estimator (any of them, a ranker too), told without importing either."""
    return type(estimator).__module__.split(".")[0] in ("lightgbm", "xgboost")


def _type_name(estimator: Any) -> str:
    return f"{type(estimator).__module__}.{type(estimator).__qualname__}"


def _framework(estimator: Any) -> str:
    return "LightGBM" if type(estimator).__module__.startswith("lightgbm") else "XGBoost"


def check_sklearn_api(estimator: Any) -> None:
    """Refuse, before converting, what onnxmltools would convert wrongly or not at all: the native
    files' objective checks, applied to the estimator's booster."""
    name = type(estimator).__name__
    expected = SKLEARN_API_TYPES.get(_type_name(estimator))
    if expected is None:
        raise ConversionError(f"edgepack cannot convert {name} ({_framework(estimator)}'s scikit-learn API)",
                              "supported: LGBMClassifier, LGBMRegressor, XGBClassifier, XGBRegressor")
    try:
        if _framework(estimator) == "LightGBM":
            booster = estimator.booster_
            kind = _lightgbm_kind(name, str(booster.dump_model(num_iteration=1).get("objective", "")),
                                  bool(booster.params.get("linear_tree")))
        else:
            kind = _xgboost_kind(name, json.loads(estimator.get_booster().save_config())["learner"])
    except ConversionError:
        raise
    except Exception as err:  # NotFittedError, LightGBMError, XGBoostError: the estimator was never fitted
        raise InputError(f"the {name} in the model is not fitted ({_first_line(err)})",
                         "save the estimator after calling fit") from None
    if kind != expected:
        raise ConversionError(f"{name} was trained with a {kind}'s objective; its predictions would not match ONNX",
                              f"use {'LGBM' if _framework(estimator) == 'LightGBM' else 'XGB'}"
                              f"{'Classifier' if kind == 'classifier' else 'Regressor'} for this objective")


def sklearn_api_versions(estimators: list[Any]) -> dict[str, str]:
    """The versions a SourceModel records; UnsupportedHere (with the install hint) without onnxmltools."""
    versions = {}
    for estimator in estimators:
        framework = _framework(estimator)
        versions[framework.lower()] = _require(framework.lower(), framework).__version__
        versions["onnxmltools"] = _require("onnxmltools", framework).__version__
    return versions


def register_sklearn_api(estimators: list[Any]) -> None:
    """Teach skl2onnx onnxmltools' converters for these estimators' types, once per type and process."""
    for estimator in estimators:
        cls = type(estimator)
        if cls in _registered:
            continue
        framework = _framework(estimator)
        _require("onnxmltools", framework)
        from skl2onnx import update_registered_converter
        from skl2onnx.common.shape_calculator import (
            calculate_linear_classifier_output_shapes,
            calculate_linear_regressor_output_shapes,
        )

        if framework == "LightGBM":
            from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm as convert
        else:
            from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost as convert
        alias = f"{'LightGbm' if framework == 'LightGBM' else 'XGBoost'}{cls.__name__}"  # skl2onnx's names
        if SKLEARN_API_TYPES[_type_name(estimator)] == "classifier":
            update_registered_converter(cls, alias, calculate_linear_classifier_output_shapes, convert,
                                        options=CLASSIFIER_OPTIONS)
        else:
            update_registered_converter(cls, alias, calculate_linear_regressor_output_shapes, convert)
        _registered.add(cls)


def without_feature_names(estimator: Any) -> None:
    """onnxmltools maps XGBoost splits to columns by the names f0, f1, ...; a model fitted on a named
    table (a DataFrame) names them otherwise. edgepack feeds unnamed columns in order: drop the names
    (on the copy that is converted)."""
    if _framework(estimator) == "XGBoost":
        estimator.get_booster().feature_names = None


# -- shared ------------------------------------------------------------------------------------------

def _require(module: str, framework: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnsupportedHere(f"{module} is not installed; edgepack needs it for {framework} models",
                              INSTALL_HINT) from None


def _output_kinds(kind: str) -> tuple[OutputKind, ...]:
    return ("label", "probabilities") if kind == "classifier" else ("regression",)


def _at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at the target's default-domain opset; the ai.onnx.ml operators keep their version.

    onnxmltools declares the lowest opsets its operators need (XGBoost graphs have no default-domain
    operator at all). The tree operators it writes are ai.onnx.ml version 1, valid up to ml opset 4
    and run by every onnxruntime edgepack supports.
    """
    declared = {entry.domain: entry.version for entry in model.opset_import}
    if "" not in declared:
        model.opset_import.append(onnx.helper.make_opsetid("", opset))
    elif declared[""] < opset:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, opset)
        except Exception as err:  # the converter raises RuntimeError and ValueError subclasses
            raise ConversionError(f"could not raise the ONNX model from opset {declared['']} to {opset}: "
                                  f"{_first_line(err)}", "run with --debug and report the model type") from None
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def _declare_outputs(model: onnx.ModelProto, source: SourceModel) -> None:
    """Declare the shapes the outputs really have; onnxmltools leaves some as [1] or [N, 1]."""
    outputs = model.graph.output
    if source.output_kinds == ("label", "probabilities"):
        shapes: list[list[int | None]] = [[None], [None, _class_count(source)]]
    else:
        shapes = [[None, 1]]
    if len(outputs) != len(shapes):
        raise ConversionError(f"onnxmltools wrote {len(outputs)} outputs for {source.estimator}, "
                              f"expected {len(shapes)}", "report the model's parameters")
    for output, shape in zip(outputs, shapes):
        elem_type = output.type.tensor_type.elem_type
        output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, elem_type, shape))


def _class_count(source: SourceModel) -> int:
    if source.framework == "LightGBM":  # binary boosters have one tree per round, and two classes
        return max(source.native.num_model_per_iteration(), 2)
    return len(source.native.classes_)


def _first_line(err: BaseException) -> str:
    """An exception's first line, without XGBoost's ``[12:00:00] /path/file.cc:409:`` prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
