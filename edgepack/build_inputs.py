"""What a build runs the model on: the sample, calibration and validation examples, and their checks.

Before conversion they are checked against what the model file records; after it, against the ONNX
graph's own signature (a PyTorch model's input shapes are only known then).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
from pathlib import Path

import edgepack
from edgepack.bench.profiles import Profile
from edgepack.convert.base import SourceModel
from edgepack.errors import InputError
from edgepack.gates import GateSettings, label_metric, user_metric
from edgepack.output_kinds import ResolvedKind, parse_output_kinds, resolve_kinds
from edgepack.quantize import CALIBRATION_ROWS, QuantizeConfig, needs_reduce_range
from edgepack.runtime.bench import cpu_info
from edgepack.samples import Examples, Generated, Validation, conform, generate, read_sample, read_validation
from edgepack.select import Evaluation, SelectOptions
from edgepack.signature import Signature, TensorInfo
from edgepack.spec import BuildSpec

PARITY_CHUNK = 64  # rows per run of the original and of fp32 during parity


@dataclass(frozen=True)
class Inputs:
    sample: Examples
    validation: Validation | None


def read_inputs(spec: BuildSpec, source: SourceModel) -> Inputs:
    """The sample (``--sample``, generated from ``--input-shape``/``--input-range``, or the one the
    model carries) and the validation data, checked against the model's inputs as far as they are known."""
    asked = Generated.parse(spec.input_shape, spec.input_range)
    if spec.sample is not None:
        if asked.given:
            raise InputError("--sample and --input-shape both give the inputs", "give one of them")
        sample = read_sample(spec.sample, source.inputs)
    elif asked.given or asked.ranges or source.default_sample is None:
        sample = generate(source.inputs, asked, spec.input_dtype)
    else:
        sample = read_sample(source.default_sample, source.inputs, "input example")
    validation = None
    if spec.validation is not None:
        validation = read_validation(spec.validation, source.inputs, spec.label_column,
                                     labels_required=spec.metric is None)
    return Inputs(sample, validation)


def conformed(inputs: Inputs, signature: Signature) -> Inputs:
    """The examples checked again against the converted graph, and cast to its input dtypes."""
    def again(examples: Examples) -> Examples:
        arrays = examples.arrays
        if examples.stacked and not _stacks(signature.inputs, arrays):
            arrays = {name: array[0] for name, array in arrays.items()}  # one feed, wrapped before the dims were known
        return conform(arrays, signature.inputs, examples.origin, examples.feature_names)

    validation = inputs.validation
    if validation is not None:
        validation = replace(validation, examples=again(validation.examples))
        if validation.labels is not None and len(validation.labels) != validation.examples.count:
            raise InputError(f"{validation.origin}: {validation.examples.count} examples but {len(validation.labels)} "
                             "labels", "give one label per example")
    return Inputs(again(inputs.sample), validation)


def _stacks(inputs: tuple[TensorInfo, ...], arrays: dict[str, np.ndarray]) -> bool:
    return all(t.dims is None or arrays[t.name].ndim == len(t.dims) + 1 for t in inputs)


def calibration_for(spec: BuildSpec, signature: Signature, sample: Examples, profile: Profile) -> QuantizeConfig:
    """Calibration examples (--calibration, else the sample) and the CPU-dependent choices."""
    if spec.calibration is not None:
        calibration = read_sample(spec.calibration, signature.inputs, "calibration data")
        origin = calibration.origin
    else:
        calibration, origin = sample, f"{sample.origin} (the sample)"
    _, flags = cpu_info()
    return QuantizeConfig(calibration=calibration.head(CALIBRATION_ROWS), calibration_origin=origin,
                          method=spec.calibration_method, reduce_range=needs_reduce_range(profile.arch, flags))


def output_kinds(spec: BuildSpec, signature: Signature, source: SourceModel,
                 reference: list[list[np.ndarray]]) -> tuple[ResolvedKind, ...]:
    user = parse_output_kinds(spec.output_kind, signature.output_names)
    by_output = [[run[index] for run in reference] for index in range(len(signature.outputs))]
    return resolve_kinds(signature, source.output_kinds, user, by_output)


def evaluation_for(spec: BuildSpec, inputs: Inputs, names: list[str], kinds: tuple[str, ...],
                   first: list[np.ndarray]) -> Evaluation:
    """The evaluation data (validation, else the sample) and the task metric that judges it, if any."""
    validation = inputs.validation
    if validation is None:
        return Evaluation(inputs.sample)
    if spec.metric is not None:
        targets = dict(validation.targets)
        if validation.labels is not None:
            targets["y"] = validation.labels
        metric = user_metric(spec.metric, names, targets)
    else:
        assert validation.labels is not None  # read_validation requires labels without --metric
        metric = label_metric(names, kinds, validation.labels, first)  # type: ignore[arg-type]
    return Evaluation(validation.examples, validation.labels, metric)


def select_options(spec: BuildSpec, time_chosen: bool = True) -> SelectOptions:
    return SelectOptions(mode=spec.quantize, variant=spec.variant,
                         gates=GateSettings(spec.min_agreement, spec.max_channel_error, spec.max_accuracy_drop),
                         batch=spec.batch, bench_time_s=spec.bench_time_s, time_chosen=time_chosen)


def fingerprint(spec: BuildSpec, source: SourceModel, profile: Profile, config: QuantizeConfig,
                evaluation: Evaluation, kinds: tuple[ResolvedKind, ...], opset: int) -> dict[str, str]:
    """Everything a variant decision depends on, each as a short string a lock file compares."""
    import onnxruntime

    labels = "" if evaluation.labels is None else hashlib.sha256(np.ascontiguousarray(
        evaluation.labels).tobytes()).hexdigest()
    return {
        "edgepack": edgepack.__version__, "onnxruntime": onnxruntime.__version__,
        "model": source.sha256, "converter": source.converter,
        "versions": json.dumps(source.versions, sort_keys=True),
        "profile": profile.name, "opset": str(opset), "quantize": spec.quantize,
        "calibration": "" if config.calibration is None else f"{config.method} {config.calibration.digest()}",
        "evaluation": hashlib.sha256(f"{evaluation.examples.digest()} {labels}".encode()).hexdigest(),
        "gates": f"min_agreement={spec.min_agreement:g} max_channel_error={spec.max_channel_error:g} "
                 f"max_accuracy_drop={spec.max_accuracy_drop:g} metric={spec.metric or ''}",
        "metric_code": _metric_digest(spec.metric),
        "output_kinds": ",".join(k.kind for k in kinds), "batch": str(spec.batch),
    }


def _metric_digest(metric: str | None) -> str:
    """The --metric module's bytes: an edited metric may judge the variants otherwise."""
    if metric is None:
        return ""
    path = Path(metric.rpartition(":")[0])
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def describe_inputs(examples: Examples) -> str:
    """``300 rows: X float32 [300, 6]``, for the load line."""
    shapes = ", ".join(f"{name} {array.dtype.name if array.dtype.kind != 'U' else 'string'} {list(array.shape)}"
                       for name, array in examples.arrays.items())
    return f"{examples.describe()}: {shapes}"

