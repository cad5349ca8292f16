"""How much does edgepack's benchmark harness add over a bare onnxruntime loop?

On the same model, threads and CPU pinning, compare the median latency reported by
``edgepack bench`` (one fresh process per round, verified bundle, the runtime's timing loop) with a
minimal ``InferenceSession.run`` loop, also in a fresh process per round (a process's memory layout
alone moves a median by a few percent, so both sides get new ones). Rounds alternate between the
two so drift on a noisy host hits both; the median of the per-round ratios is printed per profile.
Target: <= 1.02.

    python benchmarks/harness_overhead.py [--rounds 9] [--seconds 2] [--model examples/digits_mlp.skops]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, bench_bundle
from edgepack.pipeline import build
from edgepack.runtime.bundle import extract_archive
from edgepack.spec import BuildSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


RAW_LOOP = """
import os, sys, time
import numpy as np, onnxruntime as ort
model, sample, threads, cpus, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.load(sample).astype(np.float32)[:1]}
for _ in range(200):
    session.run(None, feed)
samples, deadline = [], time.perf_counter() + seconds
while time.perf_counter() < deadline or len(samples) < 100:
    t0 = time.perf_counter_ns()
    session.run(None, feed)
    samples.append(time.perf_counter_ns() - t0)
print(float(np.median(samples)) / 1e6)
"""


def raw_loop_p50(model: Path, sample: Path, threads: int, cpus: int, seconds: float) -> float:
    """The baseline: a bare session and loop in a fresh process, pinned like the profile; median in ms."""
    done = subprocess.run([sys.executable, "-c", RAW_LOOP, str(model), str(sample), str(threads), str(cpus),
                           str(seconds)], capture_output=True, text=True, check=True, timeout=seconds + 120)
    return float(done.stdout)


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
        print(f"model: {args.model.name} (fp32, {model.stat().st_size / 1024:.0f} KiB), batch 1, "
              f"{args.rounds} alternating rounds of {args.seconds:g} s each, host cores: {os.cpu_count()}")
        print(f"{'profile':<12} {'edgepack p50 ms':>16} {'raw ort p50 ms':>15} {'ratio':>7}   per-round ratios "
              "(ratio: their median)")
        for name in args.profiles.split(","):
            profile = resolve_profile(name)
            ours, raw = [], []
            for _ in range(args.rounds):
                report = bench_bundle(result.bundle, profile, BenchSettings.timed(args.seconds, processes=1))
                ours.append(report["p50_ms"])
                raw.append(raw_loop_p50(model, args.sample, profile.onnxruntime.threads, profile.cpus, args.seconds))
            ratio = statistics.median(a / b for a, b in zip(ours, raw))
            per_round = " ".join(f"{a / b:.3f}" for a, b in zip(ours, raw))
            print(f"{name:<12} {statistics.median(ours):>16.4f} {statistics.median(raw):>15.4f} {ratio:>7.3f}   {per_round}")


if __name__ == "__main__":
    main()
