"""scikit-learn estimators and pipelines: skops (safe) or pickle/joblib (opt-in) to ONNX via skl2onnx.

LightGBM and XGBoost estimators of the scikit-learn API (``LGBMClassifier``, ``XGBRegressor``, ...), alone
or inside pipelines and column transformers, convert too: skl2onnx learns onnxmltools' converters for
them when a model holds one (``edgepack.convert.boosting.register_sklearn_api``).
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.convert.base import LoadOptions, OutputKind, SourceModel
from edgepack.convert.boosting import (
    check_sklearn_api,
    is_sklearn_api,
    register_sklearn_api,
    sklearn_api_versions,
    without_feature_names,
)
from edgepack.convert.skops_trust import admitted, check_admitted
from edgepack.samples import Examples
from edgepack.signature import TensorInfo
from edgepack.errors import ConversionError, InputError
from edgepack.runtime.bundle import sha256_file

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
SUPPORTED_LIST = "https://onnx.ai/sklearn-onnx/supported.html"
INPUT_NAME = "X"


class SklearnConverter:
    name = "scikit-learn"
    formats = "scikit-learn .skops, or .pkl/.pickle/.joblib with --allow-pickle"
    suffixes = (".skops", *PICKLE_SUFFIXES)

    def claims(self, path: Path) -> bool:
        return path.suffix.lower() in self.suffixes

    def load(self, path: Path, options: LoadOptions) -> SourceModel:
        import sklearn

        suffix = path.suffix.lower()
        if suffix == ".skops":
            model, file_format = _load_skops(path, options.trust), "skops"
        else:
            if not options.allow_pickle:
                raise InputError(
                    f"{path.name} is a pickle: loading it can run arbitrary code",
                    "save the model with skops.io.dump instead, or pass --allow-pickle if you trust its source",
                )
            model, file_format = _load_pickle(path), "pickle"
        if not hasattr(model, "predict") and not hasattr(model, "transform"):
            raise InputError(f"{path.name} holds a {type(model).__name__}, not a fitted estimator",
                             "save the fitted scikit-learn estimator or pipeline")
        kinds = _output_kinds(model)
        boosters = [leaf for leaf in _leaves(model) if is_sklearn_api(leaf)]
        for booster in boosters:
            check_sklearn_api(booster)
        import skl2onnx

        return SourceModel(
            framework="scikit-learn",
            file_format=file_format,
            path=path,
            sha256=sha256_file(path),
            estimator=describe(model),
            inputs=(TensorInfo(INPUT_NAME, "float32",
                               ("?", int(model.n_features_in_)) if hasattr(model, "n_features_in_") else None),),
            output_kinds=kinds,
            predict=lambda feed: _reference_outputs(model, kinds, feed[INPUT_NAME]),
            native=model,
            versions={"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                      **sklearn_api_versions(boosters)},
            converter="skl2onnx + onnxmltools" if boosters else "skl2onnx",
            float32_thresholds=any(_is_tree(part) or is_sklearn_api(part) for part in _leaves(model)),
        )

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]) -> onnx.ModelProto:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
        from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

        model = source.native
        rows = sample.arrays[INPUT_NAME]
        if rows.ndim != 2 or sample.stacked:
            raise InputError(f"scikit-learn models take a table of rows; the sample has shape {list(rows.shape)}",
                             "pass a 2-D sample (rows x features)")
        n_features = rows.shape[1]
        boosters = [leaf for leaf in _leaves(model) if is_sklearn_api(leaf)]
        register_sklearn_api(boosters)
        if boosters:
            model = copy.deepcopy(model)  # converted without XGBoost's feature names; the original keeps them
            for leaf in _leaves(model):
                if is_sklearn_api(leaf):
                    without_feature_names(leaf)
        unsupported = _unsupported_parts(model)
        if unsupported:
            raise ConversionError(
                f"skl2onnx cannot convert {', '.join(unsupported)} (in {source.estimator})",
                f"replace it with a supported estimator ({SUPPORTED_LIST}) or register a custom "
                "converter with skl2onnx.update_registered_converter",
            )
        from sklearn.base import is_classifier

        def run(options: dict | None) -> onnx.ModelProto:
            return to_onnx(model, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                           options=options, target_opset=opsets)

        try:
            if not is_classifier(model):
                return run(None)
            try:
                # A tensor of probabilities rather than a list of dicts (ZipMap): what clients want.
                return run({"zipmap": False})
            except NameError as err:  # classifiers without probabilities (LinearSVC) have no zipmap
                if "zipmap" not in str(err):
                    raise
                return run(None)
        except (MissingConverter, MissingShapeCalculator) as err:
            raise ConversionError(f"skl2onnx has no converter for a part of {source.estimator}",
                                  f"see {SUPPORTED_LIST}") from err
        except Exception as err:  # skl2onnx reports option and shape problems with many types
            raise ConversionError(
                f"skl2onnx failed on {source.estimator}: {_innermost_reason(err)}",
                f"check the estimator's options against {SUPPORTED_LIST}; run with --debug for the traceback",
            ) from err


def _innermost_reason(err: BaseException) -> str:
    """The first line of the innermost error: skl2onnx wraps e.g. onnx's TypeError in a ValueError
    whose first line prints the node's attributes."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def describe(model: Any) -> str:
    steps = getattr(model, "steps", None)
    if steps:
        return f"{type(model).__name__}({', '.join(describe(step) for _, step in steps)})"
    return type(model).__name__


def _load_skops(path: Path, trust: tuple[str, ...]) -> Any:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise InputError(f"{path.name} is not a readable skops file ({err})",
                         "re-save the model with skops.io.dump") from None
    # scikit-learn's own internal types that skops rebuilds from plain data need no --trust
    # (edgepack/convert/skops_trust.py says why, type by type); their content is checked once loaded.
    vouched, refused = admitted(untrusted, trust)
    if refused:
        flags = " ".join(f"--trust {name}" for name in refused)
        raise InputError(
            f"{path.name} holds types skops does not trust by default: {', '.join(refused)}",
            f"review them, then pass {flags}",
        )
    try:
        model = sio.load(path, trusted=list(untrusted))
    except Exception as err:  # skops raises many kinds of errors on a corrupt payload
        raise InputError(f"{path.name} could not be loaded by skops ({type(err).__name__}: {err})",
                         "re-save the model with skops.io.dump") from None
    check_admitted(model, vouched, path.name)
    return model


def _load_pickle(path: Path) -> Any:
    import joblib

    try:
        return joblib.load(path)
    except Exception as err:  # unpickling fails in arbitrary ways on a corrupt file
        raise InputError(f"{path.name} could not be unpickled ({type(err).__name__}: {err})",
                         "check the file, or save the model with skops.io.dump") from None


def _output_kinds(model: Any) -> tuple[OutputKind, ...]:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(model):
        return ("label", "probabilities" if hasattr(model, "predict_proba") else "scores")
    if is_regressor(model):
        return ("regression",)
    return ("unknown",)


def _reference_outputs(model: Any, kinds: tuple[OutputKind, ...], rows: np.ndarray) -> list[np.ndarray]:
    """The original model's answers, in the order skl2onnx writes its outputs."""
    rows = rows.astype(np.float64)  # how scikit-learn computes: the reference for float32 ONNX
    if kinds[0] == "label":
        scores = model.predict_proba(rows) if hasattr(model, "predict_proba") else model.decision_function(rows)
        return [np.asarray(model.predict(rows)), np.asarray(scores)]
    if hasattr(model, "predict"):
        return [np.asarray(model.predict(rows))]
    return [np.asarray(model.transform(rows))]


def _leaves(model: Any) -> list[Any]:
    """The estimators inside pipelines, unions and column transformers."""
    if model in ("drop", "passthrough", None):
        return []
    name = type(model).__name__
    if name == "Pipeline":
        return [leaf for _, step in model.steps for leaf in _leaves(step)]
    if name == "FeatureUnion":
        return [leaf for _, part in model.transformer_list for leaf in _leaves(part)]
    if name == "ColumnTransformer":
        return [leaf for _, part, _ in getattr(model, "transformers_", model.transformers) for leaf in _leaves(part)]
    return [model]


def _is_tree(estimator: Any) -> bool:
    # Tree ensembles become TreeEnsemble operators whose thresholds are float32.
    return any(part in type(estimator).__name__ for part in ("Tree", "Forest", "GradientBoosting", "Boost"))


def _unsupported_parts(model: Any) -> list[str]:
    """Estimators inside ``model`` that skl2onnx has no converter for, named before it fails."""
    from skl2onnx._supported_operators import sklearn_operator_name_map

    return [type(leaf).__name__ for leaf in _leaves(model) if type(leaf) not in sklearn_operator_name_map]
