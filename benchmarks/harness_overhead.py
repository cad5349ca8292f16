"""How much does edgepack's benchmark harness add over a bare onnxruntime loop?

On the same model, threads and CPU pinning, compare the median latency reported by
``edgepack bench`` (child process, verified bundle, the runtime's timing loop) with a minimal
``InferenceSession.run`` loop in this process. Rounds alternate between the two so drift on a noisy
host hits both; the ratio of medians is printed per profile. Target: <= 1.03.

    python benchmarks/harness_overhead.py [--rounds 9] [--seconds 2] [--model examples/digits_mlp.skops]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, bench_bundle
from edgepack.pipeline import build
from edgepack.runtime.bundle import extract_archive
from edgepack.spec import BuildSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def raw_loop_p50(model: Path, rows: np.ndarray, threads: int, cpus: int, seconds: float) -> float:
    """The baseline: a bare session and loop, pinned like the profile; median in ms."""
    saved = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, sorted(saved)[:cpus])
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: rows[:1]}
        for _ in range(20):
            session.run(None, feed)
        samples, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(samples) < 100:
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            samples.append(time.perf_counter_ns() - t0)
        return float(np.median(samples)) / 1e6
    finally:
        os.sched_setaffinity(0, saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=EXAMPLES / "digits_mlp.skops")
    parser.add_argument("--sample", type=Path, default=EXAMPLES / "digits_sample.npy")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--profiles", default="edge-1core,cloud-cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        result = build(BuildSpec(model=args.model, sample=args.sample, out=Path(tmp), quantize="none",
                                 bench_time_s=0.2))
        model = extract_archive(result.bundle, Path(tmp) / "unpacked") / "model.onnx"
        rows = np.load(args.sample).astype(np.float32)
        print(f"model: {args.model.name} (fp32, {model.stat().st_size / 1024:.0f} KiB), batch 1, "
              f"{args.rounds} alternating rounds of {args.seconds:g} s each, host cores: {os.cpu_count()}")
        print(f"{'profile':<12} {'edgepack p50 ms':>16} {'raw ort p50 ms':>15} {'ratio':>7}   per-round ratios")
        for name in args.profiles.split(","):
            profile = resolve_profile(name)
            ours, raw = [], []
            for _ in range(args.rounds):
                report = bench_bundle(result.bundle, profile, BenchSettings.timed(args.seconds))
                ours.append(report["p50_ms"])
                raw.append(raw_loop_p50(model, rows, profile.onnxruntime.threads, profile.cpus, args.seconds))
            ratio = statistics.median(ours) / statistics.median(raw)
            per_round = " ".join(f"{a / b:.3f}" for a, b in zip(ours, raw))
            print(f"{name:<12} {statistics.median(ours):>16.4f} {statistics.median(raw):>15.4f} {ratio:>7.3f}   {per_round}")


if __name__ == "__main__":
    main()
