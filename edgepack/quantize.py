"""Variant makers: fp32 (graph-optimized) and its int8 and fp16 forms, each written to a file.

A variant that cannot be made is returned with the reason (``skipped``), never raised: one broken
variant must not end a build. Which variant ships is decided elsewhere, on measurements.
"""

from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import onnx

from edgepack.samples import Examples


QuantizeMode = Literal["none", "int8-dynamic", "int8-static", "fp16", "auto"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
Family = Literal["fp32", "int8-dynamic", "int8-static", "fp16"]


@dataclass(frozen=True)
class VariantKind:
    """One entry of the variant registry: what the variant is, and the function that makes it."""

    name: str
    family: Family
    per_channel: bool = False
    maker: Callable[[Path, Path, "QuantizeConfig", tuple[str, ...]], None] | None = field(default=None, repr=False)

    @property
    def int8(self) -> bool:
        return self.family in ("int8-dynamic", "int8-static")

    @property
    def calibrated(self) -> bool:
        return self.family == "int8-static"


_QUANTIZABLE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "LSTM", "GRU"}
_QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
                  "DynamicQuantizeLinear", "QuantizeLinear"}
CALIBRATION_ROWS = 512  # enough for stable ranges; more only slows calibration
# Input values per calibration run. The calibrators run a graph that outputs every activation, so a
# run's memory grows with its rows, and large runs cost more than they save: on a 10 MB OCR CNN,
# 16 rows of 3x48x320 per run took 11 s for 32 rows, 2 rows per run 3.1 s (same ranges).
_CALIBRATION_VALUES = 1 << 17
_MAX_CALIBRATION_BATCH = 64
PER_CHANNEL_QDQ_OPSET = 13  # QuantizeLinear/DequantizeLinear take a per-channel axis from opset 13


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: Examples | None = None  # for static int8; None: no static variants
    calibration_origin: str = "sample"
    method: CalibrationMethod = "minmax"
    # x86 without VNNI multiplies u8 x s8 with a 16-bit intermediate that can saturate; 7-bit
    # weights avoid it (onnxruntime's quantization guide). Decided from the target's CPU.
    reduce_range: bool = False
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant -> nodes kept in float
    # Static variants share one calibration: its tensor ranges are cached here after the first.
    calibration_cache: Path | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path | None  # None when the variant was not made
    skipped: str | None = None  # why it was not made
    not_applicable: bool = False  # skipped because the model has nothing this variant changes
    excluded_nodes: tuple[str, ...] = ()
    note: str = ""  # what was done to make it (an opset upgrade)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path else 0


def needs_reduce_range(arch: str, cpu_flags: list[str]) -> bool:
    """True for x86 targets without VNNI; the host's flags stand in for an emulated x86 profile."""
    return arch == "x86_64" and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags)


def make_variants(fp32: Variant, names: list[str], workdir: Path, config: QuantizeConfig = QuantizeConfig(),
                  made: Callable[[Variant], None] | None = None) -> list[Variant]:
    """fp32 first, then each named variant made from it (``made`` is told of each, for progress)."""
    assert fp32.path is not None
    if config.calibration is not None and config.calibration_cache is None:
        config = replace(config, calibration_cache=workdir / f"calibration.{config.method}.json")
    variants = [fp32]
    for name in names:
        if name == "fp32":
            continue
        variant = make_variant(name, fp32.path, workdir, config)
        variants.append(variant)
        if made is not None:
            made(variant)
    return variants


def make_variant(name: str, fp32_path: Path, workdir: Path, config: QuantizeConfig) -> Variant:
    kind = VARIANTS[name]
    target = workdir / f"model.{name}.onnx"
    if config.calibration is not None:
        fp32_path = typed_graph(fp32_path, config.calibration.bench_feed(1), workdir)
    source = onnx.load(fp32_path, load_external_data=False)
    if kind.int8 and not operators(source.graph) & _QUANTIZABLE_OPS:
        # Trees and linear models become ai.onnx.ml operators, which int8 does not touch.
        return Variant(name, None, "not applicable: no quantizable operators (MatMul, Gemm, Conv) in the model",
                       not_applicable=True)
    if kind.family == "fp16" and not _float_weights(source):
        return Variant(name, None, "not applicable: the model has no float weights to store in fp16",
                       not_applicable=True)
    if kind.calibrated and config.calibration is None:
        return Variant(name, None, "no calibration data")
    note = ""
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 0)
    if kind.calibrated and kind.per_channel and opset < PER_CHANNEL_QDQ_OPSET:
        upgraded, note = _upgraded(fp32_path, source, opset, workdir)
        if upgraded is None:
            return Variant(name, None, note)
        fp32_path = upgraded
    exclude = config.exclude.get(name, ())
    try:
        with _quiet_quantizer():
            assert kind.maker is not None
            kind.maker(fp32_path, target, config, exclude)
    except Exception as err:  # the quantizers fail in many ways on graphs they do not expect
        target.unlink(missing_ok=True)
        return Variant(name, None, f"could not be made: {type(err).__name__}: {cause(err, workdir)}", note=note)
    model = onnx.load(target, load_external_data=False)
    if kind.int8 and not operators(model.graph) & _QUANTIZED_OPS:
        target.unlink()
        # Nothing came out int8: the variant would be fp32 again. Say why where it is known.
        top_level = {node.op_type for node in source.graph.node}
        where = (" (its quantizable operators sit inside If/Loop subgraphs, which it leaves alone)"
                 if not top_level & _QUANTIZABLE_OPS else "")
        return Variant(name, None, f"not applicable: the quantizer left every operator in float{where}",
                       note=note, not_applicable=True)
    canonicalize(model)
    target.write_bytes(model.SerializeToString())
    if reason := _load_error(target, workdir):
        target.unlink()
        return Variant(name, None, f"onnxruntime cannot load it: {reason}", note=note)
    return Variant(name, target, excluded_nodes=exclude, note=note)


def operators(graph: onnx.GraphProto) -> set[str]:
    """Every operator type in the graph and its subgraphs (an If or Loop holds whole graphs)."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                found |= operators(sub)
    return found


def _float_weights(model: onnx.ModelProto) -> bool:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)

    def any_in(graph: onnx.GraphProto) -> bool:
        if any(t.data_type in floats and len(t.dims) and int(np.prod(t.dims)) > 1 for t in graph.initializer):
            return True
        return any(node.op_type == "Constant" or any(
            any_in(sub) for attribute in node.attribute
            for sub in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs)))
            for node in graph.node)

    return any_in(model.graph)


def _upgraded(fp32_path: Path, model: onnx.ModelProto, opset: int, workdir: Path) -> tuple[Path | None, str]:
    """The fp32 graph at opset 13, which per-channel QDQ needs: (path, note), or (None, why not)."""
    from onnx import version_converter

    target = workdir / f"{fp32_path.stem}.opset{PER_CHANNEL_QDQ_OPSET}.onnx"
    if not target.exists():
        try:
            upgraded = version_converter.convert_version(model, PER_CHANNEL_QDQ_OPSET)
            onnx.checker.check_model(upgraded)
        except Exception as err:  # the version converter lacks adapters for some operators
            return None, (f"could not be made: per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET}, and upgrading "
                               f"the model from opset {opset} failed: {cause(err, workdir)}")
        onnx.save(upgraded, target)
    return target, f"made at opset {PER_CHANNEL_QDQ_OPSET} (upgraded from {opset}: per-channel QDQ needs it)"


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


def typed_graph(source: Path, feed: dict[str, np.ndarray], workdir: Path) -> Path:
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
        values = session.run(missing, feed)
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


def sensitive_nodes(fp32_path: Path, quantized_path: Path, examples: Examples, workdir: Path,
                    top: int = 3) -> list[tuple[str, float]]:
    """The float nodes whose quantized outputs are furthest from fp32: (node, SQNR in dB), worst first.

    Uses onnxruntime's qdq_loss_debug: both models are made to output every activation, run on
    the calibration rows, and each activation is compared by signal-to-quantization-noise ratio.
    """
    from onnxruntime.quantization import qdq_loss_debug as debug

    # The debugger matches activations by the float graph's tensor types, like the quantizers.
    fp32_path = typed_graph(fp32_path, examples.bench_feed(1), workdir)
    float_aug, quant_aug = workdir / "debug.float.onnx", workdir / "debug.quant.onnx"
    with _quiet_quantizer(), np.errstate(divide="ignore", invalid="ignore"):
        debug.modify_model_output_intermediate_tensors(str(fp32_path), str(float_aug))
        debug.modify_model_output_intermediate_tensors(str(quantized_path), str(quant_aug))
        float_acts = debug.collect_activations(str(float_aug), FeedsReader(examples))
        quant_acts = debug.collect_activations(str(quant_aug), FeedsReader(examples))
        errors = debug.compute_activation_error(debug.create_activation_matching(quant_acts, float_acts))
    producers = {out: node.name for node in onnx.load(fp32_path, load_external_data=False).graph.node
                 for out in node.output}
    ranked = sorted((err["xmodel_err"], producers[tensor]) for tensor, err in errors.items()
                    if "xmodel_err" in err and tensor in producers and np.isfinite(err["xmodel_err"]))
    return [(node, float(sqnr)) for sqnr, node in ranked[:top]]


class FeedsReader:
    """Feeds calibration examples to onnxruntime in small runs (its CalibrationDataReader protocol)."""

    def __init__(self, examples: Examples) -> None:
        per_row = sum(array.size for array in examples.arrays.values()) / max(examples.count, 1)
        size = int(min(max(_CALIBRATION_VALUES // max(per_row, 1), 1), _MAX_CALIBRATION_BATCH))
        # Equal runs: the histogram calibrators (entropy, percentile) stack them into one array.
        self._feeds = examples.chunks(size, equal=True)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

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
        cache = {}
        if config.calibration_cache is not None and "calibration_cache_path" in _parameters(quantize_static):
            cache = {"calibration_cache_path": str(config.calibration_cache)}  # the second static variant reuses it
        quantize_static(source, target, FeedsReader(config.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=config.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=list(exclude), **cache)

    return make


def _fp16(source: Path, target: Path, config: QuantizeConfig, exclude: tuple[str, ...]) -> None:
    import warnings

    # onnxruntime's own converter: onnxconverter-common's leaves Cast nodes typed float while their
    # outputs become float16, which onnxruntime refuses to load (seen on a YOLOv8 detector, a
    # jax2tf file-type classifier and a voice-activity model).
    from onnxruntime.transformers import float16

    # keep_io_types: callers keep sending float32; the casts sit inside the graph.
    with warnings.catch_warnings():  # it warns once per weight it clips to the fp16 range
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(onnx.load(source), keep_io_types=True,
                                                     node_block_list=list(exclude) or None)
    onnx.save(converted, target)


def _parameters(function: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


def _registry(*kinds: VariantKind) -> dict[str, VariantKind]:
    registry: dict[str, VariantKind] = {}
    for kind in kinds:
        if kind.name in registry:
            raise ValueError(f"variant {kind.name!r} is registered twice")
        registry[kind.name] = kind
    return registry


# In order of preference: when two variants are equally fast within the noise, the earlier ships.
VARIANTS = _registry(
    VariantKind("fp32", "fp32"),
    VariantKind("int8-dynamic", "int8-dynamic", maker=_int8_dynamic(per_channel=False)),
    VariantKind("int8-dynamic-per-channel", "int8-dynamic", per_channel=True, maker=_int8_dynamic(per_channel=True)),
    VariantKind("int8-static", "int8-static", maker=_int8_static(per_channel=False)),
    VariantKind("int8-static-per-channel", "int8-static", per_channel=True, maker=_int8_static(per_channel=True)),
    VariantKind("fp16", "fp16", maker=_fp16),
)
VARIANTS_FOR_MODE: dict[str, tuple[str, ...]] = {
    "none": ("fp32",),
    "int8-dynamic": ("fp32", "int8-dynamic"),
    "int8-static": ("fp32", "int8-static"),
    "fp16": ("fp32", "fp16"),
    "auto": tuple(VARIANTS),
}


def _load_error(path: Path, workdir: Path) -> str | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # any load failure disqualifies the variant
        return cause(err, workdir)
    return None


def cause(err: BaseException, workdir: Path) -> str:
    """An error's whole text on one line, never cut: the reason a variant was not made.

    Reasons go into the manifest, so temporary paths are taken out (two builds would differ).
    """
    text = str(err).strip().replace(f"{workdir}/", "").replace(str(workdir), "")
    text = re.sub(r"/tmp/[^\s:'\"]*?/(?=[^/\s]+\b)", "", text)  # the quantizer's own temporary folders
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


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
