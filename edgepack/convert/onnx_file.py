"""ONNX files as input: checked, shape-inferred, and upgraded or refused for the target's runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.convert.base import LoadOptions, SourceModel, record_converter
from edgepack.errors import InputError, UnsupportedHere
from edgepack.runtime.bundle import sha256_file
from edgepack.sample_data import SampleData

OLDEST_OPSET = 7  # onnxruntime runs opset 7 and newer; older models are upgraded
_LABEL_TYPES = {"tensor(int64)", "tensor(int32)", "tensor(string)"}


class OnnxConverter:
    name = "onnx"
    formats = "ONNX .onnx files"

    def claims(self, path: Path) -> bool:
        return path.suffix.lower() == ".onnx"

    def load(self, path: Path, options: LoadOptions) -> SourceModel:
        import onnx

        try:
            model = onnx.load(path)
        except Exception as err:  # protobuf decoding fails with several types
            raise InputError(f"{path.name} is not a readable ONNX file ({type(err).__name__})",
                             "check the file; export it again") from None
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise InputError(f"{path.name} fails the ONNX checker: {str(err).strip().splitlines()[0]}",
                             "fix or re-export the model") from None
        inputs = _graph_inputs(model)
        if len(inputs) != 1:
            raise InputError(f"{path.name} has {len(inputs)} inputs; edgepack builds single-input models for now",
                             "wrap the model so it takes one tensor")
        if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise InputError(f"{path.name}: input {inputs[0].name!r} is not float32",
                             "export the model with a float32 input")
        dims = inputs[0].type.tensor_type.shape.dim
        per_sample = tuple(d.dim_value for d in dims[1:])
        opset = default_opset(model)
        import onnxruntime as ort

        reference = _session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        kinds = tuple("label" if o.type in _LABEL_TYPES and len(o.shape) == 1 else "values"
                      for o in reference.get_outputs())
        return SourceModel(
            framework="onnx", file_format="onnx", path=path, sha256=sha256_file(path),
            estimator=f"ONNX graph {model.graph.name or '(unnamed)'} (opset {opset}, {len(model.graph.node)} nodes)",
            input_shape=per_sample if per_sample and all(per_sample) else None,
            output_kinds=kinds,  # type: ignore[arg-type]
            # The reference is the file as given, run without graph optimizations.
            predict=lambda rows: reference.run(None, {reference.get_inputs()[0].name: rows.astype(np.float32)}),
            native=model, versions={"onnx": onnx.__version__, "onnxruntime": ort.__version__},
            converter="onnx (as given)",
        )

    def convert(self, source: SourceModel, sample: SampleData, opsets: dict[str, int]):  # -> onnx.ModelProto
        import onnx
        from onnx import shape_inference, version_converter

        model = onnx.ModelProto()
        model.CopyFrom(source.native)
        opset, target = default_opset(model), opsets[""]
        if opset > target:
            raise UnsupportedHere(
                f"{source.path.name} uses opset {opset}; the target's onnxruntime runs up to opset {target}",
                f"re-export the model at opset {target} or lower, or pick a profile with a newer onnxruntime",
            )
        if opset < OLDEST_OPSET:
            try:
                model = version_converter.convert_version(model, target)
            except Exception as err:  # the version converter lacks adapters for some ops
                raise UnsupportedHere(
                    f"{source.path.name} uses opset {opset}, which onnxruntime no longer runs, and upgrading "
                    f"it to {target} failed: {str(err).strip().splitlines()[0][:150]}",
                    f"re-export the model at opset {target}",
                ) from None
            record_converter(model, f"onnx (upgraded from opset {opset} to {target})")
        try:
            return shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as err:  # shape inference raises InferenceError and others
            raise InputError(f"{source.path.name} fails ONNX shape inference: {str(err).strip().splitlines()[0][:200]}",
                             "fix or re-export the model") from None


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graph_inputs(model) -> list:
    # Older exporters list initializers among the inputs; those are weights, not inputs.
    weights = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _session(path: Path, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime refuses models in many ways
        raise InputError(f"{path.name}: onnxruntime cannot load it: {str(err).strip().splitlines()[0][:200]}",
                         "check the operators and opset against the onnxruntime release") from None
