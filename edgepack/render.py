"""How results look in a terminal: progress on stderr, summaries on stdout."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepack.bench.profiles import Profile


class ProgressReporter:
    """Shows the running stage with a spinner and leaves a ✓ line per finished stage."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task: Any = None
        self.started: dict[str, float] = {}

    def __enter__(self) -> "ProgressReporter":
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def start(self, stage: str, text: str) -> None:
        self.started.setdefault(stage, time.perf_counter())
        if self.enabled:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(escape(text))

    def finish(self, stage: str, text: str) -> None:
        if self.enabled:
            if self.task is not None:
                self.progress.remove_task(self.task)
                self.task = None
            elapsed = time.perf_counter() - self.started.pop(stage, time.perf_counter())
            self.progress.console.print(f"[green]✓[/] [bold]{stage:<8}[/] {escape(text)} [dim]({elapsed:.1f} s)[/]",
                                        soft_wrap=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_build(console: Console, result: Any) -> None:
    manifest = result.manifest
    console.print()
    console.print(f"[bold]edgepack build[/]: {escape(manifest.source.file)} → {result.profile.name} "
                  f"([bold]{manifest.variant}[/] chosen)")
    parity = result.parity
    console.print(f"Parity ({parity.samples} rows, atol {parity.tolerance.atol:g}, rtol {parity.tolerance.rtol:g}): "
                  + ("[green]passed[/]" if parity.passed else "[red]failed[/]") + " — "
                  + escape("; ".join(d.describe() for d in parity.outputs)), soft_wrap=True)
    render_variants(console, result.variants, result.profile.name, result.metric_basis)
    latency = Table(title="Chosen variant per profile", title_justify="left")
    for column in ("profile", "p50 ms", "p99 ms", "throughput/s", "limits here"):
        latency.add_column(column)
    if result.bench:
        limits = ", ".join(f"{k}: {v.split(' (')[0]}" for k, v in result.bench["limits"].items())
        latency.add_row(result.profile.name, _ms(result.bench["p50_ms"]), _ms(result.bench["p99_ms"]),
                        f"{result.bench['throughput_per_s']:.0f}", limits)
    else:
        latency.add_row(result.profile.name, "-", "-", "-", "not measured: another architecture")
    for name, why in result.not_measured.items():
        if name != result.profile.name:
            latency.add_row(name, "-", "-", "-", escape(f"not measured: {why}"))
    console.print(latency)
    console.print(f"Bundle: [bold]{escape(str(result.bundle))}[/] ({result.bundle_bytes / 1024:.0f} KiB, "
                  f"sha256 {result.bundle_sha256[:16]}…); timings in {escape(str(result.report))}", soft_wrap=True)
    console.print("Next steps:")
    for step in result.next_steps:
        console.print(f"  {step}", soft_wrap=True, markup=False)


def render_variants(console: Console, rows: list[Any], profile: str, metric_basis: str) -> None:
    table = Table(title=f"Variants on {profile} (accuracy: {escape(metric_basis)})", title_justify="left")
    for column in ("variant", "size KiB", "accuracy", "p50 ms", "p99 ms", "verdict", "why"):
        table.add_column(column, justify="right" if column in ("size KiB", "p50 ms", "p99 ms") else "left")
    for row in rows:
        bench = row.bench or {}
        style = "bold green" if row.verdict == "chosen" else "dim" if row.verdict == "skipped" else ""
        why = f"{row.reason} ({row.speed})" if row.speed else row.reason
        table.add_row(row.name, f"{row.size_bytes / 1024:.0f}" if row.size_bytes else "-", escape(row.accuracy),
                      _ms(bench.get("p50_ms")), _ms(bench.get("p99_ms")), row.verdict, escape(why), style=style)
    console.print(table)


def render_bench(console: Console, report: dict[str, Any]) -> None:
    bundle = report.get("bundle", {})
    console.print(f"[bold]{escape(str(bundle.get('name', report.get('model'))))}[/] {bundle.get('version', '')} "
                  f"({bundle.get('variant', '')}) on [bold]{report['profile']}[/] — {escape(report['measured_on'])}")
    table = Table()
    for column in ("runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput/s", "session ms",
                   "first run ms", "peak RSS MB"):
        table.add_column(column, justify="right")
    table.add_row(str(report["runs"]), _ms(report["p50_ms"]), _ms(report["p90_ms"]), _ms(report["p99_ms"]),
                  _ms(report["mean_ms"]), f"{report['throughput_per_s']:.0f}", f"{report['session_create_ms']:.1f}",
                  f"{report['first_inference_ms']:.2f}", f"{report['peak_rss_mb']:.0f}")
    console.print(table)
    if "p50_ci95_ms" in report:
        low, high = report["p50_ci95_ms"]
        console.print(f"p50 95% interval {low:.4f}–{high:.4f} ms (±{report['p50_ci95_rel']:.2%}) after "
                      f"{report['runs']} runs, {report.get('warmup_runs', '?')} warm-up"
                      + ("" if report.get("converged", True) else "; the time budget ended before ±2%"))
    console.print(f"batch {report['batch']}, {report['input_source']} input; "
                  f"{escape(report['environment']['cpu_model'])}, onnxruntime {report['environment']['onnxruntime']}")
    for limit, state in report["limits"].items():
        console.print(f"  {limit}: {state}", markup=False)


def render_device_bench(console: Console, comparison: Any) -> None:
    """The device's figures next to the same profile emulated here (or alone for another architecture)."""
    device, emulated = comparison.device, comparison.emulated
    bundle = device["bundle"]
    console.print(f"[bold]{escape(bundle['name'])}[/] {bundle['version']} ({bundle['variant']}) with profile "
                  f"[bold]{escape(comparison.profile.name)}[/]: measured on the device"
                  + (" and emulated here" if emulated else ""), soft_wrap=True)
    table = Table()
    for column in ("measured on", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput/s", "session ms",
                   "first run ms", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "measured on" else "right")
    reports = [device] + ([emulated] if emulated else [])
    for report in reports:
        rss = report.get("peak_rss_mb")
        table.add_row(escape(report["measured_on"]), str(report["runs"]), _ms(report["p50_ms"]), _ms(report["p90_ms"]),
                      _ms(report["p99_ms"]), _ms(report["mean_ms"]), f"{report['throughput_per_s']:.0f}",
                      f"{report['session_create_ms']:.1f}", f"{report['first_inference_ms']:.2f}",
                      "-" if rss is None else f"{rss:.0f}")
    console.print(table)
    if emulated is None:
        console.print(f"Not emulated here: {comparison.profile.name} is {comparison.profile.arch}; "
                      "the device's figures stand alone.", soft_wrap=True, markup=False)
    else:
        console.print(f"device/emulated p50: {device['p50_ms'] / emulated['p50_ms']:.2f}×", soft_wrap=True)
    for report in reports:
        env = report["environment"]
        console.print(f"{report['measured_on']}: {env['cpu_model']} ({env['machine']}, {env['cpu_count']} CPUs), "
                      f"Python {env['python']}, onnxruntime {env['onnxruntime']}", soft_wrap=True, markup=False)
        limits = ", ".join(f"{k}: {v}" for k, v in report["limits"].items())
        console.print(f"  limits: {limits}", soft_wrap=True, markup=False)
    console.print(f"Verified {bundle['verified']}.", soft_wrap=True, markup=False)


def render_profiles(console: Console, profiles: list[Profile]) -> None:
    table = Table()
    for column in ("name", "kind", "arch", "cores", "memory MB", "threads", "onnxruntime", "here"):
        table.add_column(column)
    for p in profiles:
        names = p.name + (f" ({', '.join(p.aliases)})" if p.aliases else "")
        table.add_row(names, p.kind, p.arch, str(p.cpus or "all"), str(p.memory_mb or "-"),
                      str(p.onnxruntime.threads or "all"), p.onnxruntime.version, p.emulation_summary())
    console.print(table)
