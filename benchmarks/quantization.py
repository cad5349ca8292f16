"""Every variant of every example model against fp32, on each profile, in one run.

For each example model: convert, make every variant (``--quantize auto``), then time all variants
in one child process per profile (profile threads and pinning applied) in alternating rounds with
edgepack's loop. Prints per variant: size ratio, p50 ratio to fp32 per profile (median of
per-round ratios, each pair measured back to back) and absolute p50, and the task metric on the
labelled validation set with its delta to fp32. Needs the torch and boosting extras.

    python benchmarks/quantization.py [--rounds 5] [--seconds 1] [--batch 1] [--models CNN,LightGBM]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, compare_onnx, paired_ratio
from edgepack.convert.base import LoadOptions
from edgepack.convert.opsets import support_for
from edgepack.convert.registry import converter_for
from edgepack.quantize import CALIBRATION_ROWS, QuantizeConfig, canonicalize, make_variants, needs_reduce_range
from edgepack.runtime.bench import cpu_info
from edgepack.runtime.session import create_session
from edgepack.sample_data import SampleData
from edgepack.validate import task_metric

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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

    print(f"batch {args.batch}; {args.rounds} alternating rounds, {args.seconds:g} s per variant in all; "
          "p50 ratios are to fp32 (median of per-round ratios; lower is faster); metric delta against fp32")
    print(f"{'model':<18} {'variant':<25} {'size':>6} " + " ".join(f"{'p50 ' + p.name:>22}" for p in profiles)
          + f" {'metric':>16} {'delta':>9}")
    for example in examples:
        with np.load(example.validation) as data:
            features, labels = data["X"].astype(np.float32), data["y"]
        sample = SampleData(features, (), example.validation.name)
        converter = converter_for(example.model)
        source = converter.load(example.model, LoadOptions(weights=example.weights, trust=example.trust))
        opset, ml_opset, _ = support_for(profiles[0].onnxruntime.version)
        proto = converter.convert(source, sample, {"": opset, "ai.onnx.ml": ml_opset})
        canonicalize(proto)
        with tempfile.TemporaryDirectory() as tmp:
            converted = Path(tmp) / "model.onnx"
            converted.write_bytes(proto.SerializeToString())
            config = QuantizeConfig(calibration=features[:CALIBRATION_ROWS],
                                    reduce_range=needs_reduce_range(profiles[0].arch, cpu_info()[1]))
            made = make_variants(converted, "auto", Path(tmp), config)
            variants = [v for v in made if v.path is not None]
            ratios: dict[tuple[str, str], float] = {}
            absolute: dict[tuple[str, str], float] = {}
            for profile in profiles:
                report = compare_onnx({v.name: v.path for v in variants}, {_input_name(converted): features[:16]},
                                      profile, settings, rounds=args.rounds)
                timed = report["models"]
                for variant in variants:
                    ratios[variant.name, profile.name] = paired_ratio(timed[variant.name], timed["fp32"])
                    absolute[variant.name, profile.name] = timed[variant.name]["p50_ms"]
            base_name, base = metric(variants[0].path, features, labels, source.output_kinds)
            fp32_size = variants[0].size_bytes
            for variant in made:
                if variant.path is None:
                    print(f"{example.name:<18} {variant.name:<25} skipped: {variant.skipped}")
                    continue
                name, value = metric(variant.path, features, labels, source.output_kinds)
                delta = (value - base) * 100 if name == "accuracy" else (value - base) / base * 100
                cells = " ".join(
                    f"{ratios[variant.name, p.name]:>7.3f} ({absolute[variant.name, p.name] * 1000:>8.1f}us)"
                    for p in profiles)
                print(f"{example.name:<18} {variant.name:<25} {variant.size_bytes / fp32_size:>6.3f} {cells} "
                      f"{name + f' {value:.4f}':>16} {delta:>+7.2f}{'pt' if name == 'accuracy' else '%'}")


def _input_name(model: Path) -> str:
    import onnx

    return onnx.load(model, load_external_data=False).graph.input[0].name


def metric(model: Path, features: np.ndarray, labels: np.ndarray, kinds) -> tuple[str, float]:
    session, _ = create_session(model, threads=1)
    return task_metric(session.run(None, {session.get_inputs()[0].name: features}), kinds, labels)


if __name__ == "__main__":
    main()
