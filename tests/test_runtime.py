"""The shipped runtime: standalone imports, the timing loop, and the on-device benchmark."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgepack.runtime
from edgepack.runtime.timing import LoopConfig, median_ci, summarize, time_runs
from edgepack.runtime.bundle import extract_archive
from edgepack.runtime.requirements import SERVE

RUNTIME = Path(edgepack.runtime.__file__).parent
# The HTTP stack is allowed as runtime/requirements.py names it for images: nothing beyond that list.
ALLOWED_TOP_LEVEL = {"numpy", "onnxruntime", "resource"} | {re.split(r"[<>=!~\[ ;]", need)[0] for need in SERVE}


def test_runtime_sources_import_nothing_from_the_build_side():
    stdlib = set(sys.stdlib_module_names)
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in ALLOWED_TOP_LEVEL or top == "__future__", f"{path.name} imports {name}"


def test_runtime_runs_alone_from_an_unpacked_bundle(built_bundle, tmp_path):
    """What a device does: only the bundle folder on the path, no edgepack installed there."""
    root = extract_archive(built_bundle, tmp_path)
    # Every module of the runtime, the server's and the shadow's included: a new one is covered without a probe of its own.
    modules = ", ".join(f"runtime.{path.stem}" for path in sorted(RUNTIME.glob("*.py")) if path.stem != "__init__")
    probe = (f"import sys, json, {modules};"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('edgepack','skl2onnx','sklearn','onnx','typer','rich','pydantic','skops'))))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); {probe}"],
                          cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []

    bench = subprocess.run([sys.executable, "-m", "runtime.bench", "--min-time", "0.2"], cwd=root,
                           capture_output=True, text=True, env=env, timeout=120)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert report["model"] == "classifier" and report["input_source"] == "sample"
    assert report["runs"] >= 100 and 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["limits"]["threads"] == "enforced (onnxruntime intra-op threads = 1)"

    # A newer edgepack's flags are reported as ignored, not fatal: bundles outlive their builder.
    newer = subprocess.run([sys.executable, "-m", "runtime.bench", "--min-time", "0.1", "--from-the-future", "3"],
                           cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert newer.returncode == 0, newer.stderr
    assert json.loads(newer.stdout)["ignored_flags"] == ["--from-the-future", "3"]

    launcher = subprocess.run(["./run", "verify"], cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert launcher.returncode == 0 and "files verified" in launcher.stdout

    (root / "model.onnx").write_bytes(b"tampered")
    refused = subprocess.run([sys.executable, "-m", "runtime.bench"], cwd=root, capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode == 7
    assert "checksum mismatch for model.onnx" in json.loads(refused.stderr)["error"]


def test_time_runs_honours_minimums():
    calls = []
    timed = time_runs(lambda: calls.append(1), LoopConfig(warmup_runs=5, warmup_s=0.0, min_runs=50,
                                                          min_time_s=0.01, max_time_s=5))
    samples = timed.samples
    assert len(samples) >= 50 and len(calls) == len(samples) + timed.warmup_runs  # warm-up runs are not timed
    assert timed.warmup_runs >= 5 and timed.converged
    assert all(isinstance(s, int) and s >= 0 for s in samples)


def test_time_runs_goes_on_until_the_median_is_known():
    # A bimodal run time (0 or ~2 ms, irregular) needs many runs before the median's interval is
    # within 2%; with no target the loop stops at its minimums.
    import random
    import time

    rng = random.Random(0)

    def jittery() -> None:
        if rng.random() < 0.3:
            time.sleep(0.0005)

    loose = time_runs(jittery, LoopConfig(warmup_runs=5, warmup_s=0.0, min_runs=20, min_time_s=0.0,
                                          max_time_s=5, target_ci=None))
    tight = time_runs(jittery, LoopConfig(warmup_runs=5, warmup_s=0.0, min_runs=20, min_time_s=0.0,
                                          max_time_s=5, target_ci=0.02))
    assert len(loose.samples) == 20
    assert len(tight.samples) > len(loose.samples)
    assert tight.converged == (median_ci(tight.samples)[2] <= 0.02)


def test_median_ci_brackets_the_median():
    values = np.random.default_rng(1).lognormal(size=2001)
    low, high, relative = median_ci(values)
    assert low < np.median(values) < high
    assert relative == pytest.approx((high - low) / 2 / np.median(values))
    # More samples, narrower interval.
    assert median_ci(np.random.default_rng(1).lognormal(size=20001))[2] < relative


def test_time_runs_stops_at_the_time_budget():
    import time

    timed = time_runs(lambda: time.sleep(0.01), LoopConfig(warmup_runs=1, warmup_s=0.0, max_warmup_s=0.1,
                                                           min_runs=10_000, min_time_s=0.0, max_time_s=0.2))
    assert 5 <= len(timed.samples) < 100


def test_summarize_matches_numpy():
    samples = [int(x) for x in np.random.default_rng(0).integers(1_000, 2_000_000, size=1001)]
    stats = summarize(samples, batch=4)
    ms = np.array(samples) / 1e6
    assert stats["runs"] == 1001
    assert stats["p50_ms"] == pytest.approx(np.median(ms))
    assert stats["p99_ms"] == pytest.approx(np.percentile(ms, 99))
    assert stats["throughput_per_s"] == pytest.approx(4000 / ms.mean())


def test_median_round():
    from edgepack.bench.runner import median_round

    base = median_round([{"p50_ms": p, "tag": i} for i, p in enumerate([10.0, 30.0, 11.0])])
    assert base["tag"] == 2 and base["rounds_p50_ms"] == [10.0, 30.0, 11.0]
