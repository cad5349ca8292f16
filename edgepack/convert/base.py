"""What every converter takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import onnx

OutputKind = Literal["label", "values"]


@dataclass(frozen=True)
class LoadOptions:
    allow_pickle: bool = False
    trust: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceModel:
    """A loaded model and how to ask it for the outputs its ONNX form must reproduce."""

    framework: str
    file_format: str
    path: Path
    sha256: str
    estimator: str  # human description, e.g. "Pipeline(StandardScaler, MLPClassifier)"
    n_features: int | None
    output_kinds: tuple[OutputKind, ...]
    predict: Callable[[np.ndarray], list[np.ndarray]] = field(repr=False)
    native: Any = field(repr=False)
    versions: dict[str, str] = field(default_factory=dict)


class Converter(Protocol):
    name: str
    suffixes: tuple[str, ...]

    def load(self, path: Path, options: LoadOptions) -> SourceModel: ...

    def convert(self, source: SourceModel, n_features: int, opsets: dict[str, int]) -> onnx.ModelProto: ...
