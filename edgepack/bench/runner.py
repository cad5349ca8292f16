"""Runs the runtime's timing loop in a fresh child process, with a profile's limits applied there.

A child process gives clean memory figures (no torch or skl2onnx in its RSS) and lets CPU pinning
apply to the model alone; it runs inside cgroups holding the profile's CPU quota and memory limit
where this host allows (``edgepack.bench.isolation``), and a child the memory limit kills is a
budget verdict (exit 6), not a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgepack.bench.isolation import CgroupLimits, isolate
from edgepack.bench.profiles import Profile
from edgepack.errors import BudgetExceeded, EdgepackError, IntegrityError
from edgepack.runtime.timing import LoopConfig

_SLACK_S = 120  # start-up and cold start on top of the loop's own time budget


@dataclass(frozen=True)
class BenchSettings:
    loop: LoopConfig = LoopConfig()
    # Sweeps and repeats for `edgepack bench`; a build's variant timing uses one of each.
    batches: tuple[int, ...] = (1,)
    concurrency: tuple[int, ...] = (1,)
    processes: int = 1  # fresh processes per configuration; the p50 interval is taken between them

    @classmethod
    def timed(cls, seconds: float, batch: int = 1, batches: tuple[int, ...] = (), concurrency: tuple[int, ...] = (1,),
              processes: int = 1) -> "BenchSettings":
        return cls(loop=replace(LoopConfig(), min_time_s=seconds), batches=batches or (batch,),
                   concurrency=concurrency, processes=processes)

    @property
    def batch(self) -> int:
        """The batch of single-configuration timings (a build's variants)."""
        return self.batches[0]

    @property
    def configurations(self) -> int:
        return len(self.batches) * len(self.concurrency)

    def timeout_s(self) -> float:
        """How long the whole benchmark may take: every process starts, warms up and runs its share."""
        per_process = self.loop.max_time_s / self.processes + self.loop.max_warmup_s + 15
        return self.configurations * self.processes * per_process + _SLACK_S


def bench_onnx(model: Path, sample: dict[str, np.ndarray] | None, profile: Profile,
               settings: BenchSettings) -> dict[str, Any]:
    """Benchmark a loose ONNX file (a candidate variant during a build)."""
    profile.require_runnable_here()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        args = ["--model", str(model)]
        if sample is not None:
            inputs = Path(tmp) / "input.npz"
            np.savez(inputs, **sample)
            args += ["--input", str(inputs)]
        return _run(args, profile, settings)


def median_round(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median p50, carrying every round's p50 so the spread stays visible."""
    ordered = sorted(reports, key=lambda report: report["p50_ms"])
    middle = ordered[(len(ordered) - 1) // 2]
    return {**middle, "rounds_p50_ms": [report["p50_ms"] for report in reports]}


def compare_onnx(models: dict[str, Path], sample: dict[str, np.ndarray] | None, profile: Profile,
                 settings: BenchSettings, rounds: int = 5,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time several ONNX files against each other in one child process, in alternating rounds;
    ``progress`` is called after each round with its medians."""
    profile.require_runnable_here()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        args = [arg for name, path in models.items() for arg in ("--compare", f"{name}={path}")]
        args += ["--rounds", str(rounds)] + (["--progress"] if progress else [])
        if sample is not None:
            inputs = Path(tmp) / "input.npz"
            np.savez(inputs, **sample)
            args += ["--input", str(inputs)]
        return _run(args, profile, replace(settings, batches=(settings.batch,), concurrency=(1,), processes=1),
                    timeout_s=len(models) * settings.loop.max_time_s + _SLACK_S, progress=progress)


def bench_bundle_dir(root: Path, profile: Profile, settings: BenchSettings) -> dict[str, Any]:
    """Benchmark an unpacked bundle; the child verifies every checksum before loading the model."""
    profile.require_runnable_here()
    return _run(["--bundle", str(root)], profile, settings)


def bench_args(profile: Profile, settings: BenchSettings) -> list[str]:
    """``runtime.bench`` flags for a profile's limits and the loop: the same here and on a device."""
    batches = ",".join(map(str, settings.batches))
    args = ["--threads", str(profile.onnxruntime.threads), "--cpus", str(profile.cpus),
            "--batch", batches, "--concurrency", ",".join(map(str, settings.concurrency)),
            "--processes", str(settings.processes), "--warmup-runs", str(settings.loop.warmup_runs),
            "--min-time", str(settings.loop.min_time_s), "--min-runs", str(settings.loop.min_runs),
            "--max-time", str(settings.loop.max_time_s), "--max-warmup", str(settings.loop.max_warmup_s),
            "--target-ci", str(settings.loop.target_ci or 0)]
    return args + (["--memory-mb", str(profile.memory_mb)] if profile.memory_mb else [])


def _run(args: list[str], profile: Profile, settings: BenchSettings, timeout_s: float | None = None,
         progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "edgepack.runtime.bench", *args, *bench_args(profile, settings)]
    if profile.quota_cores():
        command += ["--cpu-quota", f"{profile.quota_cores():g}"]
    with isolate(CgroupLimits(cpu_quota=profile.quota_cores(), memory_mb=profile.memory_mb)) as cage:
        try:
            done = _child(cage.wrap(command + cage.flags()), timeout_s or settings.timeout_s(), progress)
        except subprocess.TimeoutExpired:
            raise EdgepackError(f"the benchmark on {profile.name} did not finish in time",
                                "lower --bench-time or check the model") from None
        if cage.out_of_memory(done.returncode):
            raise BudgetExceeded(
                f"the model needs more than {profile.memory_mb} MB: out of memory under "
                f"{profile.name}'s {profile.memory_mb} MB limit",
                "choose a profile with more memory_mb, or a smaller variant (--quantize int8-dynamic)")
    if done.returncode != 0:
        raise _child_error(done.stderr, done.returncode, profile.name)
    return label(json.loads(done.stdout), profile=profile.name, measured_on=f"this host, emulating {profile.name}")


def _child(command: list[str], timeout_s: float,
           progress: Callable[[dict[str, Any]], None] | None) -> subprocess.CompletedProcess[str]:
    """Run the benchmark child; its progress lines on stderr go to ``progress`` as they come."""
    if progress is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(child.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        expired = threading.Event()

        def expire() -> None:  # a child that hangs silently is killed all the same
            expired.set()
            child.kill()

        watchdog = threading.Timer(timeout_s, expire)
        watchdog.start()
        kept = []
        try:
            for line in child.stderr:  # type: ignore[union-attr]
                try:
                    said = json.loads(line)
                except ValueError:
                    said = None
                if isinstance(said, dict) and "progress" in said:
                    progress(said["progress"])
                else:
                    kept.append(line)
            code = child.wait()
        finally:
            watchdog.cancel()
        reader.join()
        if expired.is_set():
            raise subprocess.TimeoutExpired(command, timeout_s)
    return subprocess.CompletedProcess(command, code, "".join(stdout), "".join(kept))


def results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The configurations of a bench report: one, or a sweep's ``results``."""
    return report["results"] if "results" in report else [report]


def label(report: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Set ``fields`` on every configuration of ``report``."""
    for one in results(report):
        one.update(fields)
    return report


def _child_error(stderr: str, code: int, profile: str) -> EdgepackError:
    try:
        detail = json.loads(stderr.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
        return EdgepackError(f"the benchmark on {profile} failed: {tail}", "run with --debug for details")
    if detail.get("exit_code") == int(IntegrityError.exit_code):
        return IntegrityError(detail["error"])
    return EdgepackError(f"the benchmark on {profile} failed: {detail.get('error')}")


def bench_bundle(archive: Path, profile: Profile, settings: BenchSettings) -> dict[str, Any]:
    """Verify a bundle archive, unpack it to a temporary folder and benchmark it on ``profile``."""
    from edgepack.manifest import parse_manifest
    from edgepack.runtime.bundle import extract_archive

    profile.require_runnable_here()
    with tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as tmp:
        root = extract_archive(archive, Path(tmp))
        manifest = parse_manifest(json.loads((root / "manifest.json").read_text()), str(archive))
        report = bench_bundle_dir(root, profile, settings)
    return label(report, bundle={"name": manifest.name, "version": manifest.version, "variant": manifest.variant,
                                 "built_for": manifest.target.profile})
