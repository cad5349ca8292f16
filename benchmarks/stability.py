"""Do repeated benchmarks agree within the interval they report?

Builds the digits example, then runs ``edgepack bench`` on it N times per profile (each run made
of --processes fresh child processes with the profile's limits; the interval is taken between
them) and prints every run's p50 with its 95% interval, the spread of the p50s (max/min - 1), how
many p50s fall inside the median run's interval, and how many pairs of runs `bench --compare`
would call equal (no change beyond the combined noise). Target: the spread stays within the
reported interval, so comparing a run with itself raises no false alarm.

    python benchmarks/stability.py [--runs 5] [--seconds 2] [--processes 5] [--profiles edge-1core,cloud-cpu]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from edgepack.bench.compare import compare_reports
from edgepack.bench.profiles import resolve_profile
from edgepack.bench.runner import BenchSettings, bench_bundle
from edgepack.pipeline import build
from edgepack.spec import BuildSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run, split among its processes")
    parser.add_argument("--processes", type=int, default=5, help="processes per run (1: the old within-process interval)")
    parser.add_argument("--profiles", default="edge-1core,cloud-cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build(BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy",
                                 out=Path(tmp), quantize="none", bench_time_s=0.2)).bundle
        print(f"{bundle.name}: {args.runs} runs per profile, {args.seconds:g} s each over {args.processes} process(es)")
        for name in args.profiles.split(","):
            reports = [bench_bundle(bundle, resolve_profile(name), BenchSettings.timed(args.seconds, processes=args.processes))
                       for _ in range(args.runs)]
            p50s = [r["p50_ms"] for r in reports]
            for r in reports:
                low, high = r["p50_ci95_ms"]
                print(f"  {name:<11} p50 {r['p50_ms'] * 1000:8.2f} us  95% interval {low * 1000:8.2f}-{high * 1000:8.2f} us"
                      f"  (±{r['p50_ci95_rel']:.2%}, {r['runs']} runs, converged {r['converged']})")
            middle = sorted(reports, key=lambda r: r["p50_ms"])[len(reports) // 2]
            inside = sum(middle["p50_ci95_ms"][0] <= p <= middle["p50_ci95_ms"][1] for p in p50s)
            half_widths = [r["p50_ci95_rel"] for r in reports]
            pairs = list(itertools.combinations(reports, 2))
            equal = sum(compare_reports([a], [b], min_change=0.0).configs[0].changes[0].verdict == "within noise"
                        for a, b in pairs)
            print(f"  {name:<11} spread of p50 {max(p50s) / min(p50s) - 1:.2%} (median {statistics.median(p50s) * 1000:.2f} us);"
                  f" reported half-width median {statistics.median(half_widths):.2%};"
                  f" {inside}/{len(p50s)} p50s inside the median run's interval;"
                  f" {equal}/{len(pairs)} pairs equal within the noise (bench --compare, no --min-change)")


if __name__ == "__main__":
    main()
