"""MLflow model folders as input: a directory holding an ``MLmodel`` file, read without mlflow itself.

``MLmodel`` (YAML) lists the flavors the model was saved in. The first of ``onnx``, ``sklearn`` and
``pytorch`` that it has is built, by the converter that reads the flavor's file:

- ``onnx``: the ONNX file the flavor names (``data``), as given (``edgepack.convert.onnx_file``);
- ``sklearn``: the estimator file (``pickled_model``): ``model.skops`` through skops, a pickle
  (``serialization_format`` pickle or cloudpickle) only with ``--allow-pickle`` (``edgepack.convert.sklearn``);
- ``pytorch``: ``data/model.pth``, a TorchScript archive (read as the torch converter reads one) or a
  pickled module, or ``data/model.pt2``, a ``torch.export`` archive, which ``torch.export.load``
  unpickles: those two only with ``--allow-pickle`` (``edgepack.convert.torch``).

What the folder adds to the model file:

- the signature: the inputs' names, dtypes and shapes where the model file does not record them
  (a PyTorch module records none; an ONNX graph records all, and a signature naming other inputs is
  refused: clients would send those names). A column-based signature is one table of that many
  columns for a one-input model, else one input per column (as MLflow feeds them);
- the saved input example, the build's sample when none is given. MLflow writes it as JSON; it is
  turned into the .npz the sample reader takes;
- where it came from: ``run_id``, ``model_uuid`` (and ``model_id``, ``mlflow_version``), which the
  manifest keeps as ``source.provenance``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from edgepack.convert.base import LoadOptions, SourceModel
from edgepack.convert.onnx_file import OnnxConverter
from edgepack.convert.sklearn import SklearnConverter
from edgepack.convert.torch import (
    TorchConverter,
    is_torchscript,
    load_exported_module,
    load_pickled_module,
    module_source,
)
from edgepack.errors import InputError
from edgepack.runtime.bundle import sha256_file
from edgepack.samples import Examples
from edgepack.signature import UNNAMED, TensorInfo, dims_text

MLMODEL = "MLmodel"
PROVENANCE_KEYS = ("run_id", "model_uuid", "model_id", "mlflow_version")
EXAMPLE_FILE = "input_example.npz"
RESAVE = "save the model again with mlflow (mlflow.<flavor>.save_model or log_model)"
# MLflow's column types edgepack can feed; binary, datetime, array, object and map columns it cannot.
COLUMN_DTYPES = {"boolean": "bool", "integer": "int32", "long": "int64", "float": "float32",
                 "double": "float64", "string": "string"}

# How a flavor's input names relate to the signature's:
# "graph": the model file names its inputs, and clients send those: the signature must agree;
# "converter": the converter names the one input (scikit-learn's X): the signature's names are not used;
# "signature": the export names the inputs as the source says: the signature's names are used.
NamePolicy = Literal["graph", "converter", "signature"]


@dataclass(frozen=True)
class MlflowModel:
    """An MLflow model folder and its parsed ``MLmodel``."""

    folder: Path
    description: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.folder.name}/{MLMODEL}"

    def file(self, relative: Any, what: str) -> Path:
        """A file of the folder that MLmodel names, which must be there."""
        if not isinstance(relative, str) or not relative:
            raise InputError(f"{self.where} names no {what}", RESAVE)
        path = self.folder / relative
        if not path.is_file():
            raise InputError(f"{self.folder.name}/{relative}: no such file (the {what} {MLMODEL} names)",
                             "the folder is incomplete: copy or download the whole MLflow model folder")
        return path


@dataclass(frozen=True)
class Flavor:
    load: Callable[[MlflowModel, dict[str, Any], LoadOptions], SourceModel]
    names: NamePolicy


def is_mlflow_model(path: Path) -> bool:
    """A folder holding an MLmodel file, or that file itself."""
    if path.is_dir():
        return (path / MLMODEL).is_file()
    return path.name == MLMODEL and path.is_file()


def read_mlmodel(path: Path) -> MlflowModel:
    """The folder (``path`` or, for an MLmodel file, its parent) with its MLmodel parsed and checked."""
    import yaml

    folder = path if path.is_dir() else path.parent
    where = f"{folder.name}/{MLMODEL}"
    try:
        text = (folder / MLMODEL).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where} is not a text file", RESAVE) from None
    except OSError as err:
        raise InputError(f"{where} cannot be read ({err.strerror or err})", "check the folder") from None
    try:
        description = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{where} is not valid YAML ({_yaml_reason(err)})", RESAVE) from None
    flavors = description.get("flavors") if isinstance(description, dict) else None
    if not isinstance(flavors, dict) or not flavors:
        raise InputError(f"{where} lists no flavors: it is not an MLflow model description", RESAVE)
    return MlflowModel(folder, description)


def _yaml_reason(err: Exception) -> str:
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class MlflowConverter:
    name = "mlflow"
    formats = "MLflow model folders (with an MLmodel file) of the onnx, sklearn or pytorch flavor"

    def claims(self, path: Path) -> bool:
        return is_mlflow_model(path)

    def load(self, path: Path, options: LoadOptions) -> SourceModel:
        model = read_mlmodel(path)
        name, conf = _flavor(model)
        flavor = FLAVORS[name]
        source = flavor.load(model, conf, options)
        declared = declared_inputs(model, len(source.inputs))
        inputs = source.inputs if declared is None else merged_inputs(
            source.inputs, declared, flavor.names, f"{model.where}'s signature", source.path.name)
        return replace(source, file_format=f"mlflow {source.file_format}", inputs=inputs,
                       default_sample=example_sample(model, inputs), provenance=provenance(model))

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]) -> onnx.ModelProto:
        # The flavor's own converter made the source (it names its framework) and converts it.
        return _DELEGATES[source.framework].convert(source, sample, opsets)


_DELEGATES = {converter.name: converter for converter in (OnnxConverter(), SklearnConverter(), TorchConverter())}


def _flavor(model: MlflowModel) -> tuple[str, dict[str, Any]]:
    """The first flavor edgepack reads, in the order of FLAVORS."""
    flavors = model.description["flavors"]
    for name in FLAVORS:
        if name in flavors:
            conf = flavors[name]
            if not isinstance(conf, dict):
                raise InputError(f"{model.where}: the {name} flavor is not a mapping of settings", RESAVE)
            return name, conf
    raise InputError(
        f"{model.where}: edgepack reads the {', '.join(FLAVORS)} flavors; this model has {', '.join(map(str, flavors))}",
        "log the model with mlflow.onnx, mlflow.sklearn or mlflow.pytorch, or export it to ONNX and pass the .onnx file",
    )


# -- the flavors ---------------------------------------------------------------------------------------

def _load_onnx(model: MlflowModel, conf: dict[str, Any], options: LoadOptions) -> SourceModel:
    return _DELEGATES["onnx"].load(model.file(conf.get("data"), "ONNX file"), options)


def _load_sklearn(model: MlflowModel, conf: dict[str, Any], options: LoadOptions) -> SourceModel:
    path = model.file(conf.get("pickled_model"), "estimator file")
    # The suffix decides, as the scikit-learn converter reads the file by it. The types MLmodel
    # records as skops-trusted are not taken as --trust: a model file cannot vouch for itself.
    if path.suffix.lower() != ".skops":
        serialized = conf.get("serialization_format") or "pickle"
        _check_pickle_allowed(model, path, f"a pickle (serialization_format {serialized})", options,
                              'save it with mlflow.sklearn.save_model(..., serialization_format="skops")')
    return _DELEGATES["scikit-learn"].load(path, options)


def _load_pytorch(model: MlflowModel, conf: dict[str, Any], options: LoadOptions) -> SourceModel:
    data = model.folder / str(conf.get("model_data") or "data")
    pickled, exported = data / "model.pth", data / "model.pt2"  # the names mlflow.pytorch writes
    safe = ("save it as TorchScript (mlflow.pytorch.save_model(torch.jit.script(model), path, "
            'serialization_format="pickle")) or with mlflow.onnx')
    if pickled.is_file():
        if is_torchscript(pickled):  # a scripted module: read as the torch converter reads TorchScript
            return _DELEGATES["pytorch"].load(pickled, options)
        _check_pickle_allowed(model, pickled, "a pickled torch module", options, safe)
        return module_source(load_pickled_module(pickled), pickled, sha256_file(pickled), "pickle")
    if exported.is_file():
        _check_pickle_allowed(model, exported, "a torch.export archive, which torch.export.load unpickles",
                              options, safe)
        source = module_source(load_exported_module(exported), exported, sha256_file(exported), "pt2")
        return replace(source, estimator="torch.export program")  # its module's class is a generated one
    raise InputError(f"{model.folder.name}/{data.name}: no model.pth or model.pt2 (the pytorch flavor's model file)",
                     "the folder is incomplete: copy or download the whole MLflow model folder")


FLAVORS: dict[str, Flavor] = {  # in the order a folder's flavors are tried
    "onnx": Flavor(_load_onnx, "graph"),
    "sklearn": Flavor(_load_sklearn, "converter"),
    "pytorch": Flavor(_load_pytorch, "signature"),
}


def _check_pickle_allowed(model: MlflowModel, path: Path, what: str, options: LoadOptions, safe: str) -> None:
    if not options.allow_pickle:
        relative = path.relative_to(model.folder).as_posix()
        raise InputError(f"{model.folder.name}/{relative} is {what}: loading it can run arbitrary code",
                         f"{safe}; or pass --allow-pickle if you trust its source")


# -- the signature ------------------------------------------------------------------------------------

def declared_inputs(model: MlflowModel, model_inputs: int) -> tuple[TensorInfo, ...] | None:
    """The inputs the signature declares (a name of "" where it names none); None without a signature.
    ``model_inputs``: how many the model takes, which says what a column-based signature means."""
    signature = model.description.get("signature")
    specs = signature.get("inputs") if isinstance(signature, dict) else None
    if isinstance(specs, str):  # MLflow writes the schema as a JSON string inside the YAML
        try:
            specs = json.loads(specs)
        except json.JSONDecodeError as err:
            raise InputError(f"{model.where}: the signature's inputs are not valid JSON ({err.msg})", RESAVE) from None
    if not specs:
        return None
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
        raise InputError(f"{model.where}: the signature's inputs are not a list of specs", RESAVE)
    if all(spec.get("type") == "tensor" for spec in specs):
        return tuple(_tensor_spec(spec) for spec in specs)
    return _column_specs(model, specs, model_inputs)


def _tensor_spec(spec: dict[str, Any]) -> TensorInfo:
    tensor = spec.get("tensor-spec") if isinstance(spec.get("tensor-spec"), dict) else {}
    shape = tensor.get("shape")
    dims = tuple(int(d) if isinstance(d, int) and d >= 0 else UNNAMED for d in shape) if isinstance(shape, list) else None
    return TensorInfo(str(spec.get("name") or ""), _numpy_dtype(tensor.get("dtype")), dims)


def _numpy_dtype(name: Any) -> str | None:
    """The numpy dtype name of a tensor spec's dtype; "string" for text; None for object or unknown."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        return None
    if dtype is None or dtype.kind == "O":
        return None
    return "string" if dtype.kind in "US" else dtype.name


def _column_specs(model: MlflowModel, specs: list[dict[str, Any]], model_inputs: int) -> tuple[TensorInfo, ...]:
    columns = [(str(spec.get("name") or ""), spec.get("type")) for spec in specs]
    for name, kind in columns:
        if kind not in COLUMN_DTYPES:
            raise InputError(f"{model.where}: signature column {name or '(unnamed)'!r} is of type {kind}; edgepack "
                             f"takes {', '.join(COLUMN_DTYPES)} columns", "encode the column as numbers before the model")
    if model_inputs == 1:  # one table: the columns are its features
        text = [name for name, kind in columns if kind == "string"]
        if text:
            raise InputError(f"{model.where}: signature column {text[0]!r} is text; edgepack builds tables of numbers",
                             "encode the column as numbers before the model")
        return (TensorInfo("", "float32", (UNNAMED, len(columns))),)
    return tuple(TensorInfo(name, COLUMN_DTYPES[kind]) for name, kind in columns)


def merged_inputs(recorded: tuple[TensorInfo, ...], declared: tuple[TensorInfo, ...], policy: NamePolicy,
                  where: str, file: str) -> tuple[TensorInfo, ...]:
    """The model file's inputs, with what it does not record (dtype, dims; names by ``policy``) from the
    signature. Where both know a fact they must agree, except dtypes: the model's is the one its
    converted graph takes (scikit-learn models convert for float32 whatever the training data was)."""
    listing = ", ".join(repr(t.name) for t in recorded)
    if len(declared) != len(recorded):
        raise InputError(f"{where} declares {len(declared)} input{'s' if len(declared) != 1 else ''}, {file} takes "
                         f"{len(recorded)} ({listing})", "log the model with a signature of its own inputs "
                         "(mlflow.models.infer_signature)")
    pairs = list(zip(recorded, declared))
    if policy == "graph" and all(t.name for t in declared):  # named: pair them by name, in the graph's order
        by_name = {t.name: t for t in declared}
        unknown = [name for name in by_name if name not in {t.name for t in recorded}]
        if unknown:
            raise InputError(f"{where} names input {unknown[0]!r}, which {file} does not have (it takes {listing})",
                             "log the model with a signature naming the graph's inputs")
        pairs = [(t, by_name[t.name]) for t in recorded]
    return tuple(_merged(mine, theirs, policy, where, file) for mine, theirs in pairs)


def _merged(recorded: TensorInfo, declared: TensorInfo, policy: NamePolicy, where: str, file: str) -> TensorInfo:
    if recorded.dims is not None and declared.dims is not None and not _dims_agree(recorded.dims, declared.dims):
        raise InputError(f"{where} gives input {recorded.name!r} the shape {dims_text(declared.dims)}, {file} "
                         f"{dims_text(recorded.dims)}", "log the model with a signature of its own inputs "
                         "(mlflow.models.infer_signature)")
    name = declared.name if policy == "signature" and declared.name else recorded.name
    dims = recorded.dims if recorded.dims is not None else declared.dims
    return TensorInfo(name, recorded.dtype or declared.dtype, dims)


def _dims_agree(first: tuple[Any, ...], second: tuple[Any, ...]) -> bool:
    return len(first) == len(second) and all(
        not isinstance(a, int) or not isinstance(b, int) or a == b for a, b in zip(first, second))


# -- the input example ----------------------------------------------------------------------------------

def example_sample(model: MlflowModel, inputs: tuple[TensorInfo, ...]) -> Path | None:
    """The saved input example as a file the sample reader takes: an .npz keyed by input name (MLflow
    writes JSON). None without an example, or for one that is not arrays (free-form JSON objects,
    strings of mixed lengths): the build then generates the inputs, as for any model file."""
    info = model.description.get("saved_input_example_info")
    if not isinstance(info, dict):
        return None
    path = model.file(info.get("artifact_path"), "input example")
    if path.suffix.lower() in (".npy", ".npz"):
        return path
    try:
        example = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{model.folder.name}/{path.name} is not valid JSON ({err})", RESAVE) from None
    if info.get("params") and isinstance(example, dict):  # saved with params: {"inputs": ..., "params": ...}
        example = example.get("inputs")
    arrays = _example_arrays(example, str(info.get("type")), inputs)
    return None if arrays is None else _scratch_file(arrays)


def _example_arrays(example: Any, kind: str, inputs: tuple[TensorInfo, ...]) -> dict[str, np.ndarray] | None:
    """The example's arrays by input name, after the layouts of mlflow.models.utils._Example."""
    names = [t.name for t in inputs]
    if kind == "dataframe" and isinstance(example, dict):  # pandas "split": {"columns": [...], "data": rows}
        rows = _array(example.get("data"))
        if rows is None or rows.ndim != 2:
            return None
        if len(names) == 1:
            return {names[0]: rows}
        columns = example.get("columns")  # one input per column, as MLflow feeds a multi-input model
        return {str(c): rows[:, i] for i, c in enumerate(columns)} if isinstance(columns, list) else None
    if kind in ("sparse_matrix_csr", "sparse_matrix_csc") and isinstance(example, dict) and len(names) == 1:
        return _dense(example, kind, names[0])
    if kind not in ("ndarray", "json_object"):
        return None
    if isinstance(example, dict):
        if len(example) == 1 and len(names) == 1:  # one array for the one input, whatever the key
            example = {names[0]: next(iter(example.values()))}
        arrays = {str(key): _array(value) for key, value in example.items()}
    elif len(names) == 1:
        arrays = {names[0]: _array(example)}
    else:
        return None
    return None if any(array is None for array in arrays.values()) else arrays  # type: ignore[return-value]


def _array(values: Any) -> np.ndarray | None:
    """JSON values as an array of numbers, booleans or strings; None where they are no such array.
    MLflow writes NaN as null: those become NaN (the sample reader then names them)."""
    if not isinstance(values, list):
        return None
    try:
        array = np.asarray(values)
        if array.dtype.kind == "O":
            array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):  # ragged lists, or nulls among strings
        return None
    return array if array.dtype.kind in "biufU" else None


def _dense(example: dict[str, Any], kind: str, name: str) -> dict[str, np.ndarray] | None:
    from scipy import sparse

    matrix = sparse.csr_matrix if kind == "sparse_matrix_csr" else sparse.csc_matrix
    try:
        parts = (np.asarray(example["data"]), np.asarray(example["indices"]), np.asarray(example["indptr"]))
        return {name: matrix(parts, shape=tuple(example["shape"])).toarray()}
    except (KeyError, TypeError, ValueError):
        return None


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory[str]:
    """Where converted examples are written: never into the MLflow folder (it may be shared or read-only);
    removed when the process ends."""
    return tempfile.TemporaryDirectory(prefix="edgepack-mlflow-")


def _scratch_file(arrays: dict[str, np.ndarray]) -> Path:
    path = Path(tempfile.mkdtemp(dir=_scratch().name)) / EXAMPLE_FILE  # a folder each: two models never collide
    np.savez(path, **arrays)
    return path


def provenance(model: MlflowModel) -> dict[str, str]:
    return {key: str(model.description[key]) for key in PROVENANCE_KEYS
            if model.description.get(key) not in (None, "")}
