"""Variant makers: fp32 (graph-optimized) and its int8 and fp16 forms, each written to a file.

A variant that cannot be made is returned with the reason (``skipped``), never raised: one broken
variant must not end a build. Which variant ships is decided elsewhere, on measurements.
"""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import onnx


QuantizeMode = Literal["none", "int8-dynamic", "int8-static", "fp16", "auto"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
VARIANTS_FOR_MODE: dict[str, tuple[str, ...]] = {
    "none": ("fp32",),
    "int8-dynamic": ("fp32", "int8-dynamic"),
    "int8-static": ("fp32", "int8-static"),
    "fp16": ("fp32", "fp16"),
    "auto": ("fp32", "int8-dynamic", "int8-dynamic-per-channel", "int8-static", "int8-static-per-channel", "fp16"),
}
_QUANTIZABLE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "LSTM", "GRU"}
_QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
                  "DynamicQuantizeLinear", "QuantizeLinear"}
CALIBRATION_ROWS = 512  # enough for stable ranges; more only slows calibration
_CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: np.ndarray | None = None  # rows (batch first) for static int8; None: no static variants
    calibration_origin: str = "sample"
    method: CalibrationMethod = "minmax"
    # x86 without VNNI multiplies u8 x s8 with a 16-bit intermediate that can saturate; 7-bit
    # weights avoid it (onnxruntime's quantization guide). Decided from the target's CPU.
    reduce_range: bool = False
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant -> nodes kept in float


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path | None  # None when the variant could not be made
    skipped: str | None = None  # why it was not made
    excluded_nodes: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path else 0


def needs_reduce_range(arch: str, cpu_flags: list[str]) -> bool:
    """True for x86 targets without VNNI; the host's flags stand in for an emulated x86 profile."""
    return arch == "x86_64" and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags)


def make_variants(fp32_path: Path, mode: QuantizeMode, workdir: Path,
                  config: QuantizeConfig = QuantizeConfig()) -> list[Variant]:
    """fp32 first (graph-optimized when onnxruntime can), then the mode's other variants made from it."""
    fp32 = optimize_fp32(fp32_path, workdir / "model.fp32-optimized.onnx")
    assert fp32.path is not None  # optimize_fp32 falls back to its input
    return [fp32] + [make_variant(name, fp32.path, workdir, config) for name in VARIANTS_FOR_MODE[mode][1:]]


def make_variant(name: str, fp32_path: Path, workdir: Path, config: QuantizeConfig) -> Variant:  # type: ignore[arg-type]
    target = workdir / f"model.{name}.onnx"
    if config.calibration is not None:
        fp32_path = typed_graph(fp32_path, config.calibration[:1], workdir)
    ops = {node.op_type for node in onnx.load(fp32_path, load_external_data=False).graph.node}
    if name.startswith("int8") and not ops & _QUANTIZABLE_OPS:
        # Trees and linear models become ai.onnx.ml operators, which int8 does not touch.
        return Variant(name, None, "no quantizable operators (MatMul, Gemm, Conv) in the model")
    if name.startswith("int8-static") and config.calibration is None:
        return Variant(name, None, "no calibration data")
    exclude = config.exclude.get(name, ())
    try:
        with _quiet_quantizer():
            _MAKERS[name](fp32_path, target, config, exclude)
    except Exception as err:  # the quantizers fail in many ways on graphs they do not expect
        target.unlink(missing_ok=True)
        return Variant(name, None, f"could not be made: {type(err).__name__}: {_first_line(err, workdir)}")
    model = onnx.load(target, load_external_data=False)
    if name.startswith("int8") and not {n.op_type for n in model.graph.node} & _QUANTIZED_OPS:
        target.unlink()
        return Variant(name, None, "the quantizer left every operator in float")
    canonicalize(model)
    target.write_bytes(model.SerializeToString())
    if reason := _load_error(target, workdir):
        target.unlink()
        return Variant(name, None, f"onnxruntime cannot load it: {reason}")
    return Variant(name, target, excluded_nodes=exclude)


def optimize_fp32(source: Path, target: Path) -> Variant:
    """onnxruntime's basic graph optimizations (constant folding, redundant nodes), saved offline.

    Only the basic level: it is exact and portable; extended and layout levels fuse into
    kernels of the build host's onnxruntime and CPU, which the target may not have.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        model = onnx.load(target)
        strip_unused_imports(model)
        onnx.checker.check_model(model)
    except Exception:  # an optimizer problem must not block the model: ship it unoptimized
        target.unlink(missing_ok=True)
        return Variant("fp32", source)
    canonicalize(model)
    target.write_bytes(model.SerializeToString())
    return Variant("fp32", target)


def typed_graph(source: Path, rows: np.ndarray, workdir: Path) -> Path:
    """The graph with a type for every intermediate tensor, which the quantizers need.

    ONNX shape inference cannot type the outputs of some ai.onnx.ml operators (Scaler, for one),
    and graphs saved by onnxruntime carry no value_info: the quantizers then fail on the tensors
    that follow. Running the graph once with every intermediate exposed gives the real types.
    """
    from onnx import helper, shape_inference

    target = workdir / f"{source.stem}.typed.onnx"
    if target.exists():
        return target
    model = shape_inference.infer_shapes(onnx.load(source))
    graph = model.graph
    known = {v.name for v in [*graph.value_info, *graph.input, *graph.output]} | {i.name for i in graph.initializer}
    missing = [out for node in graph.node for out in node.output if out and out not in known]
    if not missing:
        return source
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in missing)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(missing, {session.get_inputs()[0].name: rows})
    except Exception:  # leave the graph as it is; the quantizer will say what it cannot do
        return source
    for name, value in zip(missing, values):
        value = np.asarray(value)
        shape = ["batch" if axis == 0 and value.ndim > 0 else size for axis, size in enumerate(value.shape)]
        graph.value_info.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), shape))
    onnx.save(model, target)
    return target


def strip_unused_imports(model: onnx.ModelProto) -> None:
    """Keep only the operator domains the graph uses: onnxruntime's saved graphs import every domain it
    knows (com.microsoft.nchwc, org.pytorch.aten, ...), which an older runtime on a device may refuse."""
    used = {node.domain for node in model.graph.node} | {""}
    imports = [entry for entry in model.opset_import if entry.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(imports)


def canonicalize(model: onnx.ModelProto) -> None:
    """Order what tools write in set order, so the same inputs give the same bytes in any process.

    onnxruntime's quantizer sometimes writes ``opset_import`` in another order.
    """
    imports = sorted(model.opset_import, key=lambda entry: entry.domain)
    del model.opset_import[:]
    model.opset_import.extend(imports)


def sensitive_nodes(fp32_path: Path, quantized_path: Path, rows: np.ndarray, workdir: Path,
                    top: int = 3) -> list[tuple[str, float]]:
    """The float nodes whose quantized outputs are furthest from fp32: (node, SQNR in dB), worst first.

    Uses onnxruntime's qdq_loss_debug: both models are made to output every activation, run on
    the calibration rows, and each activation is compared by signal-to-quantization-noise ratio.
    """
    from onnxruntime.quantization import qdq_loss_debug as debug

    # The debugger matches activations by the float graph's tensor types, like the quantizers.
    fp32_path = typed_graph(fp32_path, rows[:1], workdir)
    float_aug, quant_aug = workdir / "debug.float.onnx", workdir / "debug.quant.onnx"
    with _quiet_quantizer():
        debug.modify_model_output_intermediate_tensors(str(fp32_path), str(float_aug))
        debug.modify_model_output_intermediate_tensors(str(quantized_path), str(quant_aug))
        name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name
        float_acts = debug.collect_activations(str(float_aug), _RowsReader(name, rows))
        quant_acts = debug.collect_activations(str(quant_aug), _RowsReader(name, rows))
        errors = debug.compute_activation_error(debug.create_activation_matching(quant_acts, float_acts))
    producers = {out: node.name for node in onnx.load(fp32_path, load_external_data=False).graph.node
                 for out in node.output}
    ranked = sorted((err["xmodel_err"], producers[tensor]) for tensor, err in errors.items()
                    if "xmodel_err" in err and tensor in producers and np.isfinite(err["xmodel_err"]))
    return [(node, float(sqnr)) for sqnr, node in ranked[:top]]


class _RowsReader:
    """Feeds calibration rows to onnxruntime in small batches (its CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, rows: np.ndarray) -> None:
        # Equal batches: the histogram calibrators (entropy, percentile) stack them into one array.
        size = min(_CALIBRATION_BATCH, len(rows))
        usable = len(rows) - len(rows) % size
        self._batches = iter([{input_name: rows[i:i + size]} for i in range(0, usable, size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self):  # qdq_loss_debug iterates readers
        return iter(self.get_next, None)


def _int8_dynamic(per_channel: bool) -> Callable[[Path, Path, QuantizeConfig, tuple[str, ...]], None]:
    def make(source: Path, target: Path, config: QuantizeConfig, exclude: tuple[str, ...]) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=config.reduce_range, nodes_to_exclude=list(exclude))

    return make


def _int8_static(per_channel: bool) -> Callable[[Path, Path, QuantizeConfig, tuple[str, ...]], None]:
    def make(source: Path, target: Path, config: QuantizeConfig, exclude: tuple[str, ...]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        assert config.calibration is not None  # checked by make_variant
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[config.method]
        name = onnx.load(source, load_external_data=False).graph.input[0].name
        quantize_static(source, target, _RowsReader(name, config.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=config.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=list(exclude))

    return make


def _fp16(source: Path, target: Path, config: QuantizeConfig, exclude: tuple[str, ...]) -> None:
    import warnings

    from onnxconverter_common import float16

    # keep_io_types: callers keep sending float32; the casts sit inside the graph.
    with warnings.catch_warnings():  # it warns once per weight it clips to the fp16 range
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(onnx.load(source), keep_io_types=True,
                                                     node_block_list=list(exclude) or None)
    if not any(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer):
        raise ValueError("no float weights to convert")
    onnx.save(converted, target)


_MAKERS: dict[str, Callable[[Path, Path, QuantizeConfig, tuple[str, ...]], None]] = {
    "int8-dynamic": _int8_dynamic(per_channel=False),
    "int8-dynamic-per-channel": _int8_dynamic(per_channel=True),
    "int8-static": _int8_static(per_channel=False),
    "int8-static-per-channel": _int8_static(per_channel=True),
    "fp16": _fp16,
}


def _load_error(path: Path, workdir: Path) -> str | None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # any load failure disqualifies the variant
        return _first_line(err, workdir)
    return None


def _first_line(err: Exception, workdir: Path) -> str:
    # Reasons go into the manifest: no temporary paths, or two builds would differ.
    text = str(err).strip().replace(f"{workdir}/", "").replace(str(workdir), "")
    return text.splitlines()[0][:200] if text else type(err).__name__


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # onnxruntime.quantization logs advice ("consider pre-processing") on the root logger, and its
    # calibrators print progress to stdout, where `--json` output must stay clean.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
