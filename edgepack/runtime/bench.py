"""Benchmarks of a model or bundle: limits applied, cold start, the timing loop, memory, environment.

``python -m runtime.bench`` on a device and ``edgepack bench`` here run this same code (the loop
itself is in ``timing``), so numbers from both are comparable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgepackError, InputError
from .repeat import Config, run_repeated
from .timing import LoopConfig, summarize, time_concurrent, time_runs, warm_up

if TYPE_CHECKING:
    import numpy as np

DEFAULT_PROCESSES = 5
ROUND_MIN_RUNS = 5  # timed runs per model and round of a comparison, at the least


@dataclass(frozen=True)
class Limits:
    """What a device profile asks of the process that runs the model."""

    threads: int | None = None  # None or 0: one per core
    cpus: int | None = None  # cores to pin to; None or 0: no pinning
    memory_mb: int | None = None
    cpu_quota: float | None = None  # cores' worth of CPU time (0.5 = half a core); None: no quota
    # What the launcher did outside this process (cgroups), as (limit, "enforced (how)" | "not enforced (why)").
    outside: tuple[tuple[str, str], ...] = ()


_SET_OUTSIDE = ("memory", "cpu_quota")  # limits only a launcher can set: a cgroup must exist before the process


@dataclass
class Enforcement:
    applied: dict[str, str] = field(default_factory=dict)

    def enforced(self, limit: str, how: str) -> None:
        self.applied[limit] = f"enforced ({how})"

    def not_enforced(self, limit: str, why: str) -> None:
        self.applied[limit] = f"not enforced ({why})"


def apply_limits(limits: Limits) -> Enforcement:
    """Apply what can be applied to this process before any session exists (threads inherit)."""
    report = Enforcement()
    if limits.threads:
        report.enforced("threads", f"onnxruntime intra-op threads = {limits.threads}")
    else:
        report.enforced("threads", "onnxruntime default: one per core")
    if not limits.cpus:
        report.not_enforced("cpu_affinity", "the profile uses every core")
    elif not hasattr(os, "sched_setaffinity"):
        report.not_enforced("cpu_affinity", f"{platform.system()} has no sched_setaffinity")
    else:
        allowed = sorted(os.sched_getaffinity(0))
        if limits.cpus > len(allowed):
            report.not_enforced("cpu_affinity", f"the profile wants {limits.cpus} cores, this host allows {len(allowed)}")
        else:
            chosen = allowed[: limits.cpus]
            os.sched_setaffinity(0, chosen)
            report.enforced("cpu_affinity", f"pinned to CPU {','.join(map(str, chosen))}")
    wanted = {"memory": None if limits.memory_mb is None else f"{limits.memory_mb} MB",
              "cpu_quota": None if limits.cpu_quota is None else f"{limits.cpu_quota:g} core(s)"}
    for limit in _SET_OUTSIDE:
        if wanted[limit] is None:
            report.not_enforced(limit, f"the profile sets no {'memory limit' if limit == 'memory' else 'CPU quota'}")
        else:
            report.not_enforced(limit, f"{wanted[limit]} is recorded, not applied: runtime.bench sets no cgroup "
                                       "of its own; `edgepack bench` or a container limit does")
    report.applied.update(dict(limits.outside))  # the launcher's word wins: it made the cgroups
    return report


def environment(threads: int | None) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    cpu_model, flags = cpu_info()
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


def bench_model(
    model: Path, sample: dict[str, np.ndarray] | None, limits: Limits, config: LoopConfig,
    batch: int = 1, providers: list[str] | None = None, concurrency: int = 1,
) -> dict[str, Any]:
    """Cold start, then the loop; a JSON-ready report. Call in a fresh process for clean memory figures.

    With ``concurrency`` above 1, that many threads share the session, as a server's requests would.
    """
    from .session import create_session, make_feed, peak_rss_mb

    enforcement = apply_limits(limits)
    rss_before = peak_rss_mb()
    session, create_s = create_session(model, limits.threads, providers=providers)
    feed, source = make_feed(session, sample, batch)
    run = session.run
    started = time.perf_counter()
    run(None, feed)
    first_s = time.perf_counter() - started
    # partial is a C call: nothing but session.run sits between the two clock reads.
    call = functools.partial(run, None, feed)
    if concurrency > 1:
        together = time_concurrent(call, config, concurrency)
        stats = summarize(together.samples, batch)
        stats["throughput_per_s"] = len(together.samples) * batch / (together.wall_ns / 1e9)
        loop_state = {"warmup_runs": together.warmup_runs, "warmup_settled": together.warmup_settled,
                      "converged": True}
    else:
        timed = time_runs(call, config)
        stats = summarize(timed.samples, batch)
        loop_state = {"warmup_runs": timed.warmup_runs, "warmup_settled": timed.warmup_settled,
                      "converged": timed.converged}
    peak = peak_rss_mb()
    return {
        **stats,
        **loop_state,
        "batch": batch,
        "concurrency": concurrency,
        "input_source": source,
        "input_seed": None if source == "sample" else 0,  # random inputs are seeded: runs see the same data
        "input_shapes": {name: list(array.shape) for name, array in feed.items()},
        "session_create_ms": create_s * 1000,
        "first_inference_ms": first_s * 1000,
        "peak_rss_mb": peak,
        "session_rss_mb": None if peak is None or rss_before is None else peak - rss_before,
        "model_bytes": model.stat().st_size,
        "model_sha256": _sha256(model),
        "limits": enforcement.applied,
        "loop": asdict(config),
        "environment": environment(limits.threads),
        "measured_on": "this host",
    }


def compare_models(
    models: dict[str, Path], sample: dict[str, np.ndarray] | None, limits: Limits, config: LoopConfig,
    rounds: int = 5, batch: int = 1, providers: list[str] | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Time several models in one process, in alternating rounds, so they share every burst of load.

    Each round runs every model's loop for ``config.min_time_s / rounds``; the per-round medians
    let the caller compare models pair by pair. Each round starts with the next model (round 1 with
    the first, round 2 with the second...), so none always runs first, right after another's
    allocations. With ``progress``, a JSON line per round goes to stderr. Memory is shared here, so
    it is not reported per model.
    """
    from .session import create_session, make_feed

    enforcement = apply_limits(limits)
    sessions, per_model = {}, {}
    for name, path in models.items():
        session, create_s = create_session(path, limits.threads, providers=providers)
        feed, source = make_feed(session, sample, batch)
        started = time.perf_counter()
        session.run(None, feed)
        sessions[name] = functools.partial(session.run, None, feed)
        per_model[name] = {"session_create_ms": create_s * 1000,
                           "first_inference_ms": (time.perf_counter() - started) * 1000,
                           "model_bytes": path.stat().st_size, "input_source": source}
    # Each model warms up once, here; a round only re-touches its memory with one untimed run (a
    # 30 ms model warming up each round spent most of a build's timing there).
    for run in sessions.values():
        warm_up(run, config)
    # Rounds, not a confidence target, give the comparison its precision: each round's time share
    # is fixed, with a few runs at least (the spread between rounds is what the interval measures).
    share = LoopConfig(warmup_runs=0, warmup_s=0.0, max_warmup_s=0.0, min_runs=ROUND_MIN_RUNS,
                       min_time_s=config.min_time_s / rounds, max_time_s=config.max_time_s / rounds, target_ci=None)
    samples: dict[str, list[list[int]]] = {name: [] for name in models}
    order = list(sessions)
    for number in range(rounds):
        for name in order[number % len(order):] + order[:number % len(order)]:
            sessions[name]()
            samples[name].append(time_runs(sessions[name], share, warm=False).samples)
        if progress:
            medians = {name: summarize(by_round[-1], batch)["p50_ms"] for name, by_round in samples.items()}
            print(json.dumps({"progress": {"round": number + 1, "rounds": rounds, "p50_ms": medians}}),
                  file=sys.stderr, flush=True)
    results = {}
    for name, by_round in samples.items():
        flat = [value for chunk in by_round for value in chunk]
        results[name] = {**summarize(flat, batch), **per_model[name], "batch": batch,
                         "rounds_p50_ms": [summarize(chunk, batch)["p50_ms"] for chunk in by_round]}
    return {"models": results, "rounds": rounds, "limits": enforcement.applied, "loop": asdict(config),
            "environment": environment(limits.threads), "measured_on": "this host"}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and the instruction-set flags that decide which kernels run."""
    interesting = {"avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "fma", "f16c",
                   "asimd", "asimddp", "asimdhp", "sve", "i8mm"}
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= interesting & set(value.split())
    return model, sorted(flags)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.bench",
        description="Benchmark a bundle's model with edgepack's timing loop; prints a JSON report.",
    )
    parser.add_argument("--bundle", type=Path, help="unpacked bundle folder (default: the one holding this runtime)")
    parser.add_argument("--model", type=Path, help="benchmark this ONNX file instead of a bundle (no checksums)")
    parser.add_argument("--input", type=Path, help=".npz of sample inputs for --model or --compare")
    parser.add_argument("--compare", action="append", metavar="NAME=PATH",
                        help="time several ONNX files against each other in alternating rounds (repeat)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for --compare")
    parser.add_argument("--progress", action="store_true", help="with --compare: a JSON line per round on stderr")
    parser.add_argument("--threads", type=int, help="intra-op threads, 0 = one per core (default: the bundle's target)")
    parser.add_argument("--cpus", type=int, help="pin to this many cores, 0 = no pinning (default: the bundle's target)")
    parser.add_argument("--memory-mb", type=int, help="the profile's memory limit, for the report")
    parser.add_argument("--cpu-quota", type=float, help="the profile's CPU quota in cores, for the report")
    parser.add_argument("--enforced", action="append", default=[], metavar="LIMIT=HOW",
                        help="a limit the launcher enforced on this process, and how (repeat)")
    parser.add_argument("--not-enforced", action="append", default=[], metavar="LIMIT=WHY",
                        help="a limit the launcher could not enforce, and why (repeat)")
    parser.add_argument("--batch", default="1", help="batch size, or several to sweep: 1,8,32")
    parser.add_argument("--concurrency", default="1",
                        help="threads sending requests to one session at once, or several to sweep: 1,4")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES,
                        help="fresh processes per configuration; the p50 interval is taken between them "
                             "(1: one process, interval from its own runs); --min-time is split among them")
    parser.add_argument("--min-runs", type=int, default=LoopConfig.min_runs)
    parser.add_argument("--min-time", type=float, default=LoopConfig.min_time_s)
    parser.add_argument("--max-time", type=float, default=LoopConfig.max_time_s)
    parser.add_argument("--warmup-runs", type=int, default=LoopConfig.warmup_runs)
    parser.add_argument("--max-warmup", type=float, default=LoopConfig.max_warmup_s,
                        help="seconds of warm-up at most, when the median keeps moving")
    parser.add_argument("--target-ci", type=float, default=LoopConfig.target_ci,
                        help="stop once the median's 95%% confidence interval is within this share (0: time only)")
    parser.add_argument("--random-input", action="store_true", help="ignore the sample data")
    return parser


def _loop(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(warmup_runs=args.warmup_runs, max_warmup_s=args.max_warmup, min_runs=args.min_runs,
                      min_time_s=args.min_time, max_time_s=args.max_time, target_ci=args.target_ci or None)


def _outside(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    said = [(item, "enforced") for item in args.enforced] + [(item, "not enforced") for item in args.not_enforced]
    outside = []
    for item, verdict in said:
        limit, sep, text = item.partition("=")
        if not sep or limit not in _SET_OUTSIDE or not text:
            raise InputError(f"--{verdict.replace(' ', '-')} {item!r}: expected LIMIT=TEXT with LIMIT one of "
                             f"{', '.join(_SET_OUTSIDE)}", "see python -m runtime.bench --help")
        outside.append((limit, f"{verdict} ({text})"))
    return tuple(outside)


def parse_sizes(text: str, flag: str) -> list[int]:
    """``1`` or ``1,8,32``: positive whole numbers, duplicates dropped, order kept."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise InputError(f"{flag} {text!r}: expected positive whole numbers, e.g. 1 or 1,8,32", "fix the flag")
    return list(dict.fromkeys(values))


def _child_command(args: argparse.Namespace) -> list[str]:
    """The command of one benchmark process: these flags, its share of the time, one configuration."""
    share = args.processes
    command = [sys.executable, "-m", __package__ or "runtime", "bench", "--processes", "1",
               "--min-time", str(args.min_time / share), "--max-time", str(args.max_time / share),
               "--min-runs", str(max(args.min_runs // share, 20)), "--warmup-runs", str(args.warmup_runs),
               "--max-warmup", str(args.max_warmup), "--target-ci", str(args.target_ci or 0)]
    for flag in ("bundle", "model", "input", "threads", "cpus", "memory_mb", "cpu_quota"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    command += [arg for item in args.enforced for arg in ("--enforced", item)]
    command += [arg for item in args.not_enforced for arg in ("--not-enforced", item)]
    return command + (["--random-input"] if args.random_input else [])


def main(argv: list[str] | None = None) -> int:
    from .bundle import verify_dir

    parser = _parser()
    # Flags from a newer edgepack are reported, not fatal: a bundle outlives the edgepack that built it.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not unknown[0].startswith("--"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ignored = {"ignored_flags": unknown} if unknown else {}
    try:
        outside = _outside(args)
        batches, concurrency = parse_sizes(args.batch, "--batch"), parse_sizes(args.concurrency, "--concurrency")
        if args.processes < 1:
            raise InputError(f"--processes {args.processes}: expected 1 or more", "fix the flag")
        if args.compare:
            result = _compare(args, outside, batches)
        elif args.processes > 1 or len(batches) * len(concurrency) > 1:
            if args.model is None:
                verify_dir(args.bundle or Path(__file__).resolve().parent.parent)  # fail once, before any process
            configs = [Config(b, c) for b in batches for c in concurrency]
            per_process_s = args.max_time / args.processes + args.max_warmup + 120
            reports = run_repeated(_child_command(args), configs, args.processes, per_process_s)
            reports = [{**report, **ignored} for report in reports]
            result = reports[0] if len(reports) == 1 else {"results": reports}
        else:
            result = _one_process(args, outside, batches[0], concurrency[0])
    except EdgepackError as err:
        print(json.dumps({"error": err.one_line(), "exit_code": int(err.exit_code)}), file=sys.stderr)
        return int(err.exit_code)
    print(json.dumps({**result, **ignored}, indent=2))
    return 0


def _compare(args: argparse.Namespace, outside: tuple[tuple[str, str], ...], batches: list[int]) -> dict[str, Any]:
    from .session import load_inputs

    models = dict(item.split("=", 1) for item in args.compare)
    missing = [path for path in models.values() if not Path(path).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no such model file", "check the path")
    if len(batches) > 1:
        raise InputError("--compare times one batch size", "give one --batch")
    sample = None if args.random_input or args.input is None else load_inputs(args.input)
    return compare_models({name: Path(path) for name, path in models.items()}, sample,
                          Limits(args.threads, args.cpus, args.memory_mb, args.cpu_quota, outside),
                          _loop(args), rounds=args.rounds, batch=batches[0], progress=args.progress)


def _one_process(args: argparse.Namespace, outside: tuple[tuple[str, str], ...], batch: int,
                 concurrency: int) -> dict[str, Any]:
    from .bundle import verify_dir
    from .session import load_inputs

    target: dict[str, Any] = {}
    if args.model is not None:
        if not args.model.is_file():
            raise InputError(f"{args.model}: no such model file", "check the path")
        model, sample_path, name = args.model, args.input, args.model.stem
    else:
        root = args.bundle or Path(__file__).resolve().parent.parent
        manifest = verify_dir(root).manifest
        model, name = root / manifest["model"], manifest["name"]
        sample_path = root / manifest["bench_input"] if manifest.get("bench_input") else None
        target = manifest.get("target", {})
    sample = None if args.random_input or sample_path is None else load_inputs(sample_path)
    limits = Limits(
        threads=args.threads if args.threads is not None else target.get("threads"),
        cpus=args.cpus if args.cpus is not None else target.get("cpus"),
        memory_mb=args.memory_mb if args.memory_mb is not None else target.get("memory_mb"),
        cpu_quota=args.cpu_quota if args.cpu_quota is not None else target.get("cpu_quota"),
        outside=outside,
    )
    report = bench_model(model, sample, limits, _loop(args), batch=batch, providers=target.get("providers"),
                         concurrency=concurrency)
    report["model"] = name
    return report


if __name__ == "__main__":
    sys.exit(main())
