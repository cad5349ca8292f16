"""Every variant of every example model against fp32, on each profile, in one run.

For each model: convert, make the variants (``--quantize auto``), then time all variants in
alternating rounds on each profile with edgepack's loop (child process, profile limits applied).
Prints per variant: size ratio, p50 ratio to fp32 per profile (median of per-round ratios, each
pair measured back to back), and the metric on the labelled validation set with its delta to fp32.

    python benchmarks/quantization.py [--rounds 5] [--seconds 0.5] [--profiles edge-1core,cloud-cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, bench_onnx, median_round, paired_ratio
from edgepack.convert.base import LoadOptions
from edgepack.convert.opsets import support_for
from edgepack.convert.registry import converter_for
from edgepack.quantize import canonicalize, make_variants
from edgepack.runtime.session import create_session
from edgepack.sample_data import SampleData

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class Example:
    name: str
    model: Path
    validation: Path  # .npz with X and y


EXAMPLE_MODELS = [
    Example("digits 2x512 MLP", EXAMPLES / "digits_mlp.skops", EXAMPLES / "digits_validation.npz"),
]


def accuracy(model: Path, features: np.ndarray, labels: np.ndarray) -> float:
    session, _ = create_session(model, threads=1)
    predicted = session.run(None, {session.get_inputs()[0].name: features})[0]
    return float((predicted.reshape(-1) == labels.reshape(-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per variant per round")
    parser.add_argument("--profiles", default="edge-1core,cloud-cpu")
    args = parser.parse_args()
    profiles = [resolve_profile(name) for name in args.profiles.split(",")]
    settings = BenchSettings.timed(args.seconds)

    header = f"{'model':<18} {'variant':<13} {'size':>6} " + " ".join(f"{'p50 ' + p.name:>17}" for p in profiles)
    print(f"{args.rounds} alternating rounds of {args.seconds:g} s per variant; ratios are to fp32 (lower is faster)")
    print(header + f" {'accuracy':>9} {'delta':>7}")
    for example in EXAMPLE_MODELS:
        with np.load(example.validation) as data:
            features, labels = data["X"].astype(np.float32), data["y"]
        converter = converter_for(example.model)
        source = converter.load(example.model, LoadOptions())
        opset, ml_opset, _ = support_for(profiles[0].onnxruntime.version)
        proto = converter.convert(source, SampleData(features, (), example.validation.name),
                                  {"": opset, "ai.onnx.ml": ml_opset})
        canonicalize(proto)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "model.fp32.onnx"
            fp32.write_bytes(proto.SerializeToString())
            variants = [v for v in make_variants(fp32, "auto", Path(tmp)) if v.path is not None]
            sample = {"X": features[:16]}
            ratios: dict[tuple[str, str], float] = {}
            absolute: dict[tuple[str, str], float] = {}
            for profile in profiles:
                rounds: dict[str, list] = {v.name: [] for v in variants}
                for _ in range(args.rounds):
                    for variant in variants:
                        rounds[variant.name].append(bench_onnx(variant.path, sample, profile, settings))
                merged = {name: median_round(reports) for name, reports in rounds.items()}
                for variant in variants:
                    ratios[variant.name, profile.name] = paired_ratio(merged[variant.name], merged["fp32"])
                    absolute[variant.name, profile.name] = merged[variant.name]["p50_ms"]
            base_accuracy = accuracy(fp32, features, labels)
            for variant in variants:
                acc = accuracy(variant.path, features, labels)
                cells = " ".join(
                    f"{ratios[variant.name, p.name]:>6.3f} ({absolute[variant.name, p.name] * 1000:>6.1f}us)"
                    for p in profiles)
                print(f"{example.name:<18} {variant.name:<13} {variant.size_bytes / fp32.stat().st_size:>6.3f} "
                      f"{cells} {acc:>9.4f} {(acc - base_accuracy) * 100:>+6.2f}pt")


if __name__ == "__main__":
    main()
