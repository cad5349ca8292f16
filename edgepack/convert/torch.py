"""PyTorch models to ONNX with torch.onnx: a TorchScript file, or ``module.py:factory`` plus a state dict.

The two forms a model can be given in:

- a TorchScript archive (``torch.jit.save``; ``.pt``, ``.pth`` or ``.ts``), read with ``torch.jit.load``;
- ``module.py:factory --weights state_dict.pt``: edgepack imports ``module.py`` (which runs its code:
  the user names their own file), calls ``factory()`` for an ``nn.Module`` and loads the weights
  into it with ``torch.load(weights_only=True)``. Nothing is ever unpickled: a whole model saved
  with ``torch.save(model)`` is refused, not loaded.

MLflow folders (``edgepack.convert.mlflow``) also hold pickled modules and ``torch.export`` archives;
``load_pickled_module`` and ``load_exported_module`` read those, called only with ``--allow-pickle``.

Export: the dynamo exporter (``torch.export`` + onnxscript) for ``nn.Module`` objects; the
TorchScript exporter for TorchScript archives (``torch.export`` cannot trace a ScriptModule),
where onnxscript is missing, for opsets below 18, and as the fallback when dynamo fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from edgepack.convert.base import LoadOptions, SourceModel, model_file, record_converter
from edgepack.errors import ConversionError, InputError, UnsupportedHere
from edgepack.runtime.bundle import sha256_file
from edgepack.samples import Examples
from edgepack.signature import TensorInfo

# Unpinned, pip resolves torch to a multi-GB CUDA build; the pinned version is a CPU wheel here.
TORCH_INSTALL = 'pip install torch==2.13.0 && pip install -e ".[torch]"'
EXPORT_GUIDE = "https://docs.pytorch.org/docs/stable/onnx_export.html"
DYNAMO, TORCHSCRIPT = "torch.onnx (dynamo)", "torch.onnx (torchscript)"
INPUT_NAME, OUTPUT_NAME = "input", "output"
# The dynamo exporter implements operators from opset 18 on; asked for less, it exports at 18 and
# down-converts with onnx's version converter, which lacks adapters for common operators (Relu
# 14 -> 13) and then silently keeps opset 18. Below 18 the TorchScript exporter writes the opset natively.
DYNAMO_MIN_OPSET = 18
LOWEST_EXPORT_OPSET = 17  # every supported torch's TorchScript exporter writes up to this one
# torch.export specializes a dimension of size 0 or 1 to a constant: trace with a batch of 2.
EXAMPLE_BATCH = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def missing_torch_error() -> UnsupportedHere:
    return UnsupportedHere("PyTorch models need the torch extra, which is not installed here",
                           f"{TORCH_INSTALL}; always pin torch: unpinned, pip pulls a multi-GB CUDA build")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise missing_torch_error() from None
    return torch


def _import_onnxscript() -> Any:
    """onnxscript where installed (the dynamo exporter needs it); None sends exports to TorchScript."""
    try:
        import onnxscript
    except ImportError:
        return None
    return onnxscript


class TorchConverter:
    name = "pytorch"
    formats = "PyTorch TorchScript .pt/.pth/.ts, or module.py:factory with --weights state_dict.pt"
    suffixes = (".pt", ".pth", ".ts")

    def claims(self, path: Path) -> bool:
        # ``model.py:make_model`` (model_file strips the factory), or a bare ``model.py``, which
        # load() answers with how to name the factory.
        return model_file(path) != path or path.suffix.lower() in (*self.suffixes, ".py")

    def load(self, path: Path, options: LoadOptions) -> SourceModel:
        if model_file(path) == path and path.suffix.lower() == ".py":
            raise InputError(f"{path.name}: name the function in it that builds the model",
                             f"pass {path.name}:FACTORY --weights state_dict.pt, naming the function that returns the nn.Module")
        _import_torch()  # a missing torch extra is said before anything is read
        if model_file(path) != path:
            model, digest = _load_factory_model(path, options.weights)
            file_format = "module + state dict"
        else:
            if options.weights is not None:
                raise InputError(f"--weights is for module.py:factory models; {path.name} is TorchScript and "
                                 "carries its own weights", f"drop --weights {options.weights.name}")
            model, digest, file_format = _load_torchscript(path), sha256_file(path), "torchscript"
        model.eval()
        return module_source(model, path, digest, file_format)

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]) -> onnx.ModelProto:
        model, opset = source.native, opsets[""]
        names = [tensor.name for tensor in source.inputs]
        example = _example(sample, names)
        outputs = _check_takes_sample(model, example, source, sample)
        output_names = _output_names(outputs)
        batched = [name for name in names if not sample.stacked and example[name].dim() > 0]

        exported, used, dynamo_failure = None, TORCHSCRIPT, ""
        if source.converter == DYNAMO and opset >= DYNAMO_MIN_OPSET:
            try:
                exported, used = _export_dynamo(model, example, names, output_names, batched, opset), DYNAMO
            except Exception as err:  # torch.export fails in many ways on code it cannot trace
                dynamo_failure = f"dynamo: {_reason(err)}; "
        if exported is None:
            try:
                exported = _export_torchscript(model, example, names, output_names, batched, opset)
            except Exception as err:  # the TorchScript exporter too
                raise ConversionError(
                    f"torch.onnx could not export {source.estimator}: {dynamo_failure}torchscript: {_reason(err)}",
                    f"see {EXPORT_GUIDE}; run with --debug for the traceback",
                ) from err
        exported = _at_opset(exported, opset)
        _drop_initializer_value_info(exported)
        if batched:
            _check_batch_axis(exported, {name: tensor.numpy() for name, tensor in example.items()}, batched, source)
        # SourceModel is frozen and made before the export; the model itself records which
        # exporter wrote it, so a fallback to TorchScript is never hidden.
        record_converter(exported, used)
        return exported


def module_source(model: Any, path: Path, digest: str, file_format: str) -> SourceModel:
    """The source of a module already loaded, in the mode it is exported in: ``TorchConverter.load``
    puts its modules in eval mode; a ``torch.export`` program's module keeps the mode it was traced
    in (it refuses ``eval()``). ``edgepack.convert.mlflow`` loads the modules an MLflow folder holds."""
    torch = _import_torch()
    scripted = isinstance(model, torch.jit.ScriptModule)
    onnxscript = None if scripted else _import_onnxscript()
    versions = {"torch": torch.__version__.split("+")[0]}
    if onnxscript is not None:
        versions["onnxscript"] = onnxscript.__version__
    return SourceModel(
        framework="pytorch",
        file_format=file_format,
        path=path,
        sha256=digest,
        estimator=getattr(model, "original_name", None) or type(model).__name__,
        # No form records the inputs' shapes or dtypes; the sample (or an MLflow signature) fixes them.
        inputs=tuple(TensorInfo(name) for name in _input_names(model)),
        output_kinds=None,
        predict=lambda feed: _predict(model, feed),
        native=model,
        versions=versions,
        converter=TORCHSCRIPT if onnxscript is None else DYNAMO,
    )


def _input_names(model: Any) -> list[str]:
    """forward's parameters, in order (one input keeps the name ``input``, as single-input bundles always had)."""
    import inspect

    torch = _import_torch()
    try:
        if isinstance(model, torch.jit.ScriptModule):
            names = [argument.name for argument in model.forward.schema.arguments[1:]]
        else:
            names = [name for name, parameter in inspect.signature(model.forward).parameters.items()
                     if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                     and parameter.default is parameter.empty]
    except (AttributeError, TypeError, ValueError):  # a forward without an inspectable signature
        names = []
    return names if len(names) > 1 else [INPUT_NAME]


def _example(sample: Examples, names: list[str]) -> dict[str, Any]:
    """The tracing example: EXAMPLE_BATCH rows of each input (repeated when the sample has fewer), or its first feed."""
    torch = _import_torch()
    feed = next(sample.chunks(EXAMPLE_BATCH))
    if not sample.stacked and sample.count < EXAMPLE_BATCH:
        feed = {name: np.concatenate([array] * EXAMPLE_BATCH)[:EXAMPLE_BATCH] if array.ndim else array
                for name, array in feed.items()}
    return {name: torch.from_numpy(np.array(feed[name], copy=True)) for name in names}


def _load_factory_model(path: Path, weights: Path | None) -> tuple[Any, str]:
    """The module built by ``factory()`` with the weights loaded; the sha256 of the two files.

    The sha256 is that of the text "<module sha256>\\n<weights sha256>\\n" (hex digests): it
    changes when either file does and does not depend on the files' names.
    """
    torch = _import_torch()
    text, _, factory_name = str(path).rpartition(":")
    module_path = Path(text)
    if not factory_name.isidentifier():
        raise InputError(f"{path.name}: {factory_name!r} is not a function name",
                         f"write {module_path.name}:make_model, naming the function that builds the model")
    if weights is None:
        raise InputError(f"{path.name} needs its trained weights",
                         "pass --weights with the state dict, saved by torch.save(model.state_dict(), path)")
    if not weights.is_file():
        raise InputError(f"{weights}: no such weights file", "pass --weights with the state dict file")
    state = _read_state_dict(weights)  # before running any of the user's code: it is the cheap check
    with _directory_on_path(module_path.parent):
        module = _import_module(module_path)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            defined = [name for name, value in vars(module).items()
                       if callable(value) and getattr(value, "__module__", None) == module.__name__]
            raise InputError(f"{module_path.name} has no function {factory_name}",
                             f"name one of {', '.join(defined)}" if defined else
                             f"define def {factory_name}() -> torch.nn.Module in it")
        try:
            model = factory()
        except Exception as err:  # the user's factory can fail in any way
            raise InputError(f"{factory_name}() in {module_path.name} raised {_reason(err)}",
                             "fix the factory: edgepack calls it with no arguments; run with --debug for the traceback") from err
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{factory_name}() in {module_path.name} returned a {type(model).__name__}, not a torch.nn.Module",
                         "return the nn.Module itself from the factory")
    _load_weights(model, state, weights.name, f"{factory_name}()")
    digest = hashlib.sha256(f"{sha256_file(module_path)}\n{sha256_file(weights)}\n".encode()).hexdigest()
    return model, digest


@contextlib.contextmanager
def _directory_on_path(folder: Path) -> Iterator[None]:
    """The module's folder on sys.path while it is imported and its factory runs, for sibling imports."""
    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _import_module(path: Path) -> ModuleType:
    # A private name, so a user's file called e.g. torch.py can never replace a real package.
    name = f"edgepack_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path.name} cannot be imported as a Python module", "pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up while it runs
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's module can fail in any way
        sys.modules.pop(name, None)
        raise InputError(f"importing {path.name} failed: {_reason(err)}",
                         "fix the module; run with --debug for the traceback") from err
    return module


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    torch = _import_torch()
    if is_torchscript(path):
        raise InputError(f"--weights {path.name} is a TorchScript model, not a state dict",
                         f"build it on its own, without --weights: edgepack build {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path.name} holds more than weights (a pickled model or other objects); edgepack "
                         "loads weights only and never unpickles",
                         "save the weights alone: torch.save(model.state_dict(), path)") from None
    except Exception as err:  # torch.load fails in many ways on a file that is not its own
        raise InputError(f"{path.name} is not a readable torch.save file ({_reason(err)})",
                         "save the weights with torch.save(model.state_dict(), path)") from None
    if not _is_state_dict(state):
        held = (f"a dict with non-tensor entries ({', '.join(map(str, list(state)[:4]))})"
                if isinstance(state, Mapping) else f"a {type(state).__name__}")
        raise InputError(f"{path.name} is not a state dict: it holds {held}",
                         "save model.state_dict() itself, not a checkpoint wrapped around it")
    return state


def _load_weights(model: Any, state: Mapping[str, Any], weights_name: str, built_by: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    resized = [f"{key} file {_dims(state[key].shape)} vs model {_dims(value.shape)}"
               for key, value in expected.items() if key in state and state[key].shape != value.shape]
    problems = [f"{label} {_some(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("sizes differ:", resized)) if keys]
    hint = "pass the state dict saved from the model this factory builds"
    if problems:
        raise InputError(f"{weights_name} does not fit the model {built_by} builds: {'; '.join(problems)}", hint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # a dtype or custom-hook problem the checks above do not see
        raise InputError(f"{weights_name} does not fit the model {built_by} builds: {_reason(err)}", hint) from None


def _load_torchscript(path: Path) -> Any:
    torch = _import_torch()
    if not is_torchscript(path):
        save_it = ("save the model with torch.jit.save(torch.jit.script(model), path), or pass "
                   "module.py:factory --weights state_dict.pt")
        try:
            held = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(f"{path.name} is a pickled torch.save file, not TorchScript; edgepack never unpickles",
                             save_it) from None
        except Exception:  # not torch's at all: say what edgepack reads
            held = None
        if _is_state_dict(held):
            raise InputError(f"{path.name} is a state dict (weights only), not a TorchScript model",
                             f"pass the module that builds the network with it: module.py:factory --weights {path.name}")
        raise InputError(f"{path.name} is not a TorchScript archive", save_it)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the archive is what was given
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # a damaged archive fails in many ways
        raise InputError(f"{path.name} is not a loadable TorchScript archive ({_reason(err)})",
                         "save it again with torch.jit.save") from None


def load_pickled_module(path: Path) -> Any:
    """A whole module saved with ``torch.save(model)``, in eval mode. This unpickles, which runs code:
    the caller has the user's leave (``--allow-pickle``)."""
    torch = _import_torch()
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling fails in arbitrary ways (a class that does not import here)
        raise InputError(f"{path.name} could not be unpickled ({_reason(err)})",
                         "run edgepack where the model's classes import, or save the model as TorchScript") from None
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{path.name} holds a {type(module).__name__}, not a torch.nn.Module",
                         "save the nn.Module itself")
    return module.eval()


def load_exported_module(path: Path) -> Any:
    """The module of a ``torch.export.save`` archive (``.pt2``), in the mode it was traced in.
    ``torch.export.load`` unpickles: the caller has the user's leave (``--allow-pickle``)."""
    torch = _import_torch()
    try:
        return torch.export.load(path).module()
    except Exception as err:  # a damaged or foreign archive fails in many ways
        raise InputError(f"{path.name} is not a loadable torch.export archive ({_reason(err)})",
                         "save it again with torch.export.save") from None


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` record; torch.save files have none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_state_dict(held: Any) -> bool:
    torch = _import_torch()
    return isinstance(held, Mapping) and all(isinstance(value, torch.Tensor) for value in held.values())


def _check_takes_sample(model: Any, example: dict[str, Any], source: SourceModel, sample: Examples) -> Any:
    torch = _import_torch()
    try:
        with torch.no_grad():
            output = model(*example.values())
    except Exception as err:  # a shape or dtype mismatch, raised from anywhere in forward
        shapes = ", ".join(f"{name} {list(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"
                           for name, tensor in example.items())
        raise InputError(f"{source.estimator} cannot take the sample ({shapes}): {_reason(err)}",
                         "pass --sample inputs shaped like the model's, batch first: e.g. N x 1 x 8 x 8 for images; "
                         "an .npz keyed by forward's parameter names for several inputs") from err
    return _tensors(output, source.estimator)


def _tensors(output: Any, estimator: str) -> Any:
    """The output as a tensor, a tuple of tensors or a dict of them; anything else is refused."""
    torch = _import_torch()
    if isinstance(output, torch.Tensor):
        return output
    values = list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, (tuple, list)) else None
    if values and all(isinstance(value, torch.Tensor) for value in values):
        return output
    what = f"a {type(output).__name__}" if values is None else f"a {type(output).__name__} holding non-tensors"
    raise ConversionError(f"{estimator}'s forward returns {what}; edgepack converts models whose outputs are tensors",
                          "wrap the model so forward returns a tensor, or a tuple or dict of tensors")


def _output_names(output: Any) -> list[str]:
    torch = _import_torch()
    if isinstance(output, torch.Tensor):
        return [OUTPUT_NAME]
    if isinstance(output, dict):
        return [str(key) for key in output]
    return [f"{OUTPUT_NAME}_{index}" for index in range(len(output))]


def _predict(model: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    torch = _import_torch()
    with torch.no_grad():
        output = model(*(torch.from_numpy(np.array(array, copy=True)) for array in feed.values()))
    output = _tensors(output, "the model")
    if isinstance(output, torch.Tensor):
        return [output.numpy()]
    values = output.values() if isinstance(output, dict) else output
    return [value.numpy() for value in values]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporters print progress and log warnings (e.g. torchvision missing): stdout carries --json."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export_dynamo(model: Any, example: dict[str, Any], names: list[str], output_names: list[str],
                   batched: list[str], opset: int) -> onnx.ModelProto:
    torch = _import_torch()
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if name in batched else None for name in names)
    with _quiet_export():
        program = torch.onnx.export(
            model, tuple(example.values()), dynamo=True, opset_version=opset, input_names=names,
            output_names=output_names, dynamic_shapes=dynamic, verbose=False,
        )
    return program.model_proto


def _export_torchscript(model: Any, example: dict[str, Any], names: list[str], output_names: list[str],
                        batched: list[str], opset: int) -> onnx.ModelProto:
    """At ``opset``, or (past what this torch writes) the newest it writes, converted up after."""
    torch = _import_torch()
    axes = {name: {0: "batch"} for name in batched}
    if batched:
        axes.update({name: {0: "batch"} for name in output_names})
    for version in range(opset, LOWEST_EXPORT_OPSET - 1, -1) if opset > LOWEST_EXPORT_OPSET else [opset]:
        buffer = io.BytesIO()
        try:
            with _quiet_export():
                torch.onnx.export(
                    model, tuple(example.values()), buffer, dynamo=False, opset_version=version, input_names=names,
                    output_names=output_names, dynamic_axes=axes,
                )
        except (RuntimeError, ValueError) as err:
            if "opset" in str(err).lower() and version > LOWEST_EXPORT_OPSET:
                continue  # e.g. "Unsupported onnx_opset_version: 24": try the one below
            raise
        return onnx.load_from_string(buffer.getvalue())
    raise AssertionError("unreachable: the lowest opset either exports or raises")


def _at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), opset)
    if current == opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as err:  # the converter lacks adapters for some operators and versions
        raise ConversionError(f"the exporter wrote opset {current}; onnx could not convert it to the target's "
                              f"opset {opset} ({_reason(err)})",
                              f"target an onnxruntime that runs opset {current}, or upgrade torch") from None


def _drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """The dynamo exporter also lists each weight in value_info, which adds nothing (an initializer
    carries its shape). onnxruntime's int8 quantizer transposes Gemm weights under the same name;
    the stale entry then contradicts shape inference and no int8 variant can be made."""
    weights = {initializer.name for initializer in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _check_batch_axis(model: onnx.ModelProto, example: dict[str, np.ndarray], batched: list[str],
                      source: SourceModel) -> None:
    """A forward that fixes the batch size (``x.view(2, -1)``) exports a graph that only takes that batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for batch in (1, EXAMPLE_BATCH + 1):
        feed = {name: np.ascontiguousarray(np.resize(array, (batch, *array.shape[1:]))) if name in batched else array
                for name, array in example.items()}
        try:
            session.run(None, feed)
        except Exception as err:  # onnxruntime reports shape errors with several types
            raise ConversionError(
                f"the exported {source.estimator} does not take a batch of {batch} ({_reason(err)})",
                "keep forward independent of the batch size, e.g. x.flatten(1) instead of x.view(2, -1)",
            ) from None


def _reason(err: BaseException) -> str:
    """The innermost cause's type and first line: exporter errors wrap the real one in pages of advice."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = _ANSI.sub("", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _dims(shape: Any) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _some(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
