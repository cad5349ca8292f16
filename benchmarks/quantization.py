"""Every variant of every example model against fp32, on each profile, in one run.

For each example model: convert and graph-optimize it as a build does, make every variant
(``edgepack.quantize.VARIANTS``, calibrated on the labelled validation rows), then time all made
variants in one child process per profile (profile threads, pinning and limits applied) in
alternating rounds with edgepack's loop. Prints per variant: size ratio to fp32; per profile the
p50 ratio to fp32 as the median of per-round ratios (each pair measured back to back), the
geometric mean with its 95% interval from ``edgepack.speed`` (what a build judges), and the
absolute p50; and the task metric (accuracy or RMSE) on the validation set with its change
against fp32, as the build's gate computes it. Needs the torch and boosting extras.

    python benchmarks/quantization.py [--rounds 5] [--seconds 1] [--batch 1] [--models CNN,LightGBM]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgepack.bench.profiles import Profile, resolve_profile
from edgepack.bench.runner import BenchSettings, compare_onnx
from edgepack.build_inputs import Inputs, conformed
from edgepack.convert.base import LoadOptions, SourceModel
from edgepack.convert.opsets import clamp_ir_version, support_for
from edgepack.convert.registry import converter_for
from edgepack.gates import TaskMetric, join_runs, judge_metric, label_metric
from edgepack.output_kinds import resolve_kinds
from edgepack.quantize import CALIBRATION_ROWS, VARIANTS, QuantizeConfig, Variant, canonicalize, make_variants, \
    needs_reduce_range, optimize_fp32
from edgepack.runtime.bench import cpu_info
from edgepack.samples import Validation, read_validation
from edgepack.select import run_model
from edgepack.signature import Signature, from_onnx
from edgepack.speed import RatioInterval, judge, paired_interval

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BENCH_ROWS = 16  # rows of the timed feed, as a build's bundle keeps


@dataclass(frozen=True)
class Example:
    name: str
    model: Path
    validation: Path  # .npz with X and y
    weights: Path | None = None
    trust: tuple[str, ...] = ()


EXAMPLE_MODELS = [
    Example("digits 2x512 MLP", EXAMPLES / "digits_mlp.skops", EXAMPLES / "digits_validation.npz"),
    Example("digits 3x1024 MLP", EXAMPLES / "digits_mlp3x1024.skops", EXAMPLES / "digits_validation.npz"),
    Example("digits CNN", Path(f"{EXAMPLES / 'digits_cnn.py'}:make_model"), EXAMPLES / "digits_images_validation.npz",
            weights=EXAMPLES / "digits_cnn.pt"),
    Example("tabular LightGBM", EXAMPLES / "tabular_lgbm.txt", EXAMPLES / "tabular_validation.npz"),
]


@dataclass(frozen=True)
class Converted:
    """An example as a build has it before the variant stage: fp32, its signature, its labelled rows."""

    fp32: Variant
    signature: Signature
    validation: Validation
    kinds: tuple[str, ...]


def convert_example(example: Example, profile: Profile, workdir: Path) -> Converted:
    """Load, convert at the profile's opset and graph-optimize, as ``edgepack build`` does (no parity check)."""
    converter = converter_for(example.model)
    source = converter.load(example.model, LoadOptions(trust=example.trust, weights=example.weights))
    validation = read_validation(example.validation, source.inputs)
    opset, ml_opset, ir_version = support_for(profile.onnxruntime.version)
    proto = converter.convert(source, validation.examples,
                              {"": min(opset, onnx.defs.onnx_opset_version()), "ai.onnx.ml": ml_opset})
    clamp_ir_version(proto, ir_version)
    canonicalize(proto)
    converted = workdir / "model.converted.onnx"
    converted.write_bytes(proto.SerializeToString())
    fp32 = optimize_fp32(converted, workdir / "model.fp32.onnx")
    assert fp32.path is not None
    signature = from_onnx(onnx.shape_inference.infer_shapes(onnx.load(fp32.path)))
    validation = conformed(Inputs(validation.examples, validation), signature).validation
    assert validation is not None
    return Converted(fp32, signature, validation, _kinds(source, signature, fp32.path, validation))


def _kinds(source: SourceModel, signature: Signature, fp32: Path, validation: Validation) -> tuple[str, ...]:
    runs = run_model(fp32, validation.examples)
    by_output = [[run[index] for run in runs] for index in range(len(signature.outputs))]
    return tuple(kind.kind for kind in resolve_kinds(signature, source.output_kinds, {}, by_output))


def task_metric(model: Converted) -> TaskMetric | None:
    """The metric a build judges these labels with (accuracy, or RMSE for a regressor)."""
    first = run_model(model.fp32.path, model.validation.examples)[0]  # type: ignore[arg-type]
    assert model.validation.labels is not None
    return label_metric(model.signature.output_names, model.kinds, model.validation.labels, first)  # type: ignore[arg-type]


def score(metric: TaskMetric, path: Path, model: Converted) -> float:
    examples = model.validation.examples
    runs = run_model(path, examples)
    return metric.score({name: join_runs([run[index] for run in runs], examples.stacked)
                         for index, name in enumerate(model.signature.output_names)})


def round_p50s(variants: list[Variant], feed: dict[str, np.ndarray], profile: Profile, settings: BenchSettings,
               rounds: int) -> dict[str, list[float]]:
    """Each variant's p50 per alternating round, all timed in one child process under ``profile``."""
    report = compare_onnx({v.name: v.path for v in variants}, feed, profile, settings, rounds=rounds)  # type: ignore[misc]
    return {name: timed["rounds_p50_ms"] for name, timed in report["models"].items()}


def median_ratio(candidate: list[float], baseline: list[float]) -> float:
    """Median over rounds of candidate p50 / baseline p50, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(candidate, baseline))


def speed_cell(ratios: tuple[float, RatioInterval] | None, p50_ms: float) -> str:
    """``median gmean [low-high] verdict p50``; fp32 (``ratios`` None) has its p50 alone."""
    if ratios is None:
        return f"{'':27} {p50_ms * 1000:>9.1f}us"
    median, interval = ratios
    span = f"[{interval.low:.2f}-{interval.high:.2f}]"
    return f"{median:>6.3f} {interval.ratio:>5.2f} {span:<11} {judge(interval).value[:3]} {p50_ms * 1000:>9.1f}us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant (over all rounds)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--profiles", default="edge-1core,cloud-cpu")
    parser.add_argument("--models", help="comma-separated substrings of example names to run")
    args = parser.parse_args()
    profiles = [resolve_profile(name) for name in args.profiles.split(",")]
    settings = BenchSettings.timed(args.seconds, batch=args.batch)
    examples = [e for e in EXAMPLE_MODELS if not args.models or any(m in e.name for m in args.models.split(","))]

    print(f"batch {args.batch}; {args.rounds} alternating rounds, {args.seconds:g} s per variant in all. Per profile: "
          "p50 ratio to fp32 as the median of per-round ratios, the geometric mean [95% interval] and the build's "
          "verdict on it (fas/not/inc), then the absolute p50; metric change against fp32")
    print(f"{'model':<18} {'variant':<25} {'size':>6} " + " ".join(f"{'p50 ' + p.name:>40}" for p in profiles)
          + f" {'metric':>16} {'change':>9}")
    for example in examples:
        with tempfile.TemporaryDirectory() as tmp:
            model = convert_example(example, profiles[0], Path(tmp))
            config = QuantizeConfig(calibration=model.validation.examples.head(CALIBRATION_ROWS),
                                    reduce_range=needs_reduce_range(profiles[0].arch, cpu_info()[1]))
            made = make_variants(model.fp32, list(VARIANTS), Path(tmp), config)
            timed = [v for v in made if v.path is not None]
            feed = model.validation.examples.bench_feed(BENCH_ROWS)
            ratios: dict[tuple[str, str], tuple[float, RatioInterval]] = {}
            absolute: dict[tuple[str, str], float] = {}
            for profile in profiles:
                p50s = round_p50s(timed, feed, profile, settings, args.rounds)
                for variant in timed:
                    if variant.name != "fp32":
                        ratios[variant.name, profile.name] = (median_ratio(p50s[variant.name], p50s["fp32"]),
                                                              paired_interval(p50s[variant.name], p50s["fp32"]))
                    absolute[variant.name, profile.name] = statistics.median(p50s[variant.name])
            metric = task_metric(model)
            reference = score(metric, model.fp32.path, model) if metric else None  # type: ignore[arg-type]
            for variant in made:
                if variant.path is None:
                    print(f"{example.name:<18} {variant.name:<25} skipped: {variant.skipped}")
                    continue
                cells = " ".join(speed_cell(ratios.get((variant.name, p.name)), absolute[variant.name, p.name])
                                 for p in profiles)
                figure = change = "-"
                if metric is not None and reference is not None:
                    judged = judge_metric(metric, score(metric, variant.path, model), reference, 1.0,
                                          model.validation.origin)
                    figure, change = f"{judged.name} {judged.value:.4f}", judged.change
                print(f"{example.name:<18} {variant.name:<25} {variant.size_bytes / model.fp32.size_bytes:>6.3f} "
                      f"{cells} {figure:>16} {change:>9}")


if __name__ == "__main__":
    main()
