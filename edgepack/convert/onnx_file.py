"""ONNX files as input: checked, shape-inferred, and upgraded or refused for the target's runtime."""

from __future__ import annotations

from pathlib import Path

from edgepack.convert.base import LoadOptions, SourceModel, record_converter
from edgepack.errors import InputError, UnsupportedHere
from edgepack.runtime.bundle import sha256_file
from edgepack.runtime.session import quiet_run
from edgepack.samples import Examples
from edgepack.signature import from_onnx

OLDEST_OPSET = 7  # onnxruntime runs opset 7 and newer; older models are upgraded
_NOT_TENSORS = {"sequence_type": "sequence", "map_type": "map", "optional_type": "optional",
                "sparse_tensor_type": "sparse tensor"}


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
        signature = from_onnx(model)
        not_tensors = [t for t in (*signature.inputs, *signature.outputs) if t.dims is None and t.dtype in _NOT_TENSORS]
        if not_tensors:
            raise InputError(f"{path.name}: {not_tensors[0].name!r} is a {_NOT_TENSORS[not_tensors[0].dtype]}, not a "
                             "tensor; edgepack serves tensor inputs and outputs",
                             "export the model without ZipMap or sequence outputs (e.g. skl2onnx options zipmap=False)")
        if not signature.inputs:
            raise InputError(f"{path.name} has no inputs", "export the model with its inputs")
        opset = default_opset(model)
        import onnxruntime as ort

        reference = _session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        quiet = quiet_run()
        return SourceModel(
            framework="onnx", file_format="onnx", path=path, sha256=sha256_file(path),
            estimator=f"ONNX graph {model.graph.name or '(unnamed)'} (opset {opset}, {len(model.graph.node)} nodes)",
            inputs=signature.inputs,
            output_kinds=None,  # an ONNX file says nothing of what its outputs mean: the rule decides
            # The reference is the file as given, run without graph optimizations.
            predict=lambda feed: reference.run(None, feed, quiet),
            native=model, versions={"onnx": onnx.__version__, "onnxruntime": ort.__version__},
            converter="onnx (as given)",
        )

    def convert(self, source: SourceModel, sample: Examples, opsets: dict[str, int]):  # -> onnx.ModelProto
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
