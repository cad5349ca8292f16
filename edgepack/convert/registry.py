"""Picks the converter for a model by what the path looks like; one entry per framework.

Models are files, except MLflow model folders (a directory with an ``MLmodel`` file).
"""

from __future__ import annotations

from pathlib import Path

from edgepack.convert.base import Converter, model_file
from edgepack.convert.boosting import BoostingConverter
from edgepack.convert.mlflow import MlflowConverter
from edgepack.convert.onnx_file import OnnxConverter
from edgepack.convert.sklearn import SklearnConverter
from edgepack.convert.torch import TorchConverter
from edgepack.errors import InputError

MLFLOW = MlflowConverter()  # the one converter of folders

# Converters import their framework lazily, so listing them here costs nothing. One per line.
CONVERTERS: tuple[Converter, ...] = (
    SklearnConverter(),
    OnnxConverter(),
    BoostingConverter(),
    TorchConverter(),
    MLFLOW,
)


def converter_for(path: Path) -> Converter:
    target = model_file(path)
    if not target.exists():
        raise InputError(f"{target}: no such model file", "check the path")
    if target.is_dir():  # only MLflow models are folders, whatever suffix a folder's name ends in
        if MLFLOW.claims(target):
            return MLFLOW
        raise InputError(f"{target}: not a file", "pass the saved model file, or an MLflow model folder (with an MLmodel file)")
    if not target.is_file():
        raise InputError(f"{target}: not a file", "pass the saved model file")
    claimants = [c for c in CONVERTERS if c.claims(path)]
    if len(claimants) > 1:  # two converters claiming one path is a programming error
        raise RuntimeError(f"{path} is claimed by {', '.join(c.name for c in claimants)}")
    if not claimants:
        suffix = target.suffix.lower() or "suffix-less"
        raise InputError(f"{target.name}: edgepack cannot read {suffix} files", "supported models: " + "; ".join(c.formats for c in CONVERTERS))
    return claimants[0]
