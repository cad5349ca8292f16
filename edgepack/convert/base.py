"""What every converter takes and returns.

A converter is a class registered in ``edgepack.convert.registry``. It must not import its
framework at module import time (``edgepack --help`` stays fast, and a missing optional extra is
reported only when a model of that kind is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

import onnx

from edgepack.output_kinds import OutputKind
from edgepack.signature import TensorInfo

if TYPE_CHECKING:
    from edgepack.samples import Examples


@dataclass(frozen=True)
class LoadOptions:
    allow_pickle: bool = False
    trust: tuple[str, ...] = ()
    weights: Path | None = None  # a state dict for models given as ``module.py:factory``


@dataclass(frozen=True)
class SourceModel:
    """A loaded model and how to ask it for the outputs its ONNX form must reproduce."""

    framework: str
    file_format: str
    path: Path
    sha256: str  # of the model file (and weights, where there are two files)
    estimator: str  # human description, e.g. "Pipeline(StandardScaler, MLPClassifier)"
    # The inputs as the format records them: names always, dtypes and dims where known (a TorchScript
    # file knows neither; the sample fixes them).
    inputs: tuple[TensorInfo, ...]
    # What each ONNX output is, where the converter knows (None for an output it does not, or for all).
    output_kinds: tuple[OutputKind | None, ...] | None
    # The original's answers for one feed (input name -> array), in the order of the ONNX outputs.
    predict: Callable[[dict[str, np.ndarray]], list[np.ndarray]] = field(repr=False)
    native: Any = field(repr=False)
    versions: dict[str, str] = field(default_factory=dict)
    converter: str = ""  # what made the ONNX model, e.g. "skl2onnx", "torch.onnx (dynamo)"
    # Tree ensembles whose ONNX form compares float32 thresholds: a sample lying between a float64
    # threshold and its float32 rounding lands on the other side of a split. Parity then reports
    # how many samples flipped and allows a small share instead of failing.
    float32_thresholds: bool = False
    default_sample: Path | None = None  # examples the model file carries (an MLflow input example)
    provenance: dict[str, str] = field(default_factory=dict)  # e.g. an MLflow run_id and model_uuid


class Converter(Protocol):
    name: str
    formats: str  # for error messages, e.g. ".skops, .pkl/.joblib (with --allow-pickle)"

    def claims(self, path: Path) -> bool:
        """Whether this converter reads ``path`` (by suffix, or a form like ``module.py:factory``)."""
        ...

    def load(self, path: Path, options: LoadOptions) -> SourceModel: ...

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]) -> onnx.ModelProto:
        """The ONNX model at the given opsets, its inputs named as ``source.inputs``, with an open batch
        axis where the model takes rows."""
        ...


def model_file(path: Path) -> Path:
    """The file part of ``module.py:factory`` style paths; the path itself otherwise."""
    text = str(path)
    head, sep, _ = text.rpartition(":")
    return Path(head) if sep and head.endswith(".py") else path


CONVERTER_KEY = "edgepack.converter"


def record_converter(model: onnx.ModelProto, description: str) -> None:
    """Say in the model itself what made it, when that is only known after converting (a fallback
    exporter, an opset upgrade); the build copies it into the manifest."""
    for prop in model.metadata_props:
        if prop.key == CONVERTER_KEY:
            prop.value = description
            return
    model.metadata_props.add(key=CONVERTER_KEY, value=description)


def recorded_converter(model: onnx.ModelProto) -> str | None:
    return next((prop.value for prop in model.metadata_props if prop.key == CONVERTER_KEY), None)
