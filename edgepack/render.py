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
    """Shows the running stage with a spinner and leaves a ✓ line per finished stage.

    Without a terminal (CI logs, a pipe) there is no spinner to update, so each step of a long
    stage (a variant made, a timing round) is a line of its own: a log never sits silent for a minute.
    """

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task: Any = None
        self.started: dict[str, float] = {}

    def __enter__(self) -> "ProgressReporter":
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def start(self, stage: str, text: str) -> None:
        self.started.setdefault(stage, time.perf_counter())
        if self.live:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(escape(text))
        elif self.enabled:
            self.console.print(f"… {stage:<8} {escape(text)}", soft_wrap=True, highlight=False)

    def step(self, stage: str, text: str) -> None:
        if self.live and self.task is not None:
            self.progress.update(self.task, description=escape(f"{stage}: {text}"))
        elif self.enabled:
            elapsed = time.perf_counter() - self.started.get(stage, time.perf_counter())
            self.console.print(f"  {stage:<8} {escape(text)} [dim]({elapsed:.1f} s)[/]", soft_wrap=True,
                               highlight=False)

    def finish(self, stage: str, text: str) -> None:
        if not self.enabled:
            self.started.pop(stage, None)
            return
        if self.live and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        elapsed = time.perf_counter() - self.started.pop(stage, time.perf_counter())
        self.console.print(f"[green]✓[/] [bold]{stage:<8}[/] {escape(text)} [dim]({elapsed:.1f} s)[/]",
                           soft_wrap=True, highlight=False)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _sig(value: float | None) -> str:
    """Four significant figures: 0.02967 and 12.34 both read well in one column."""
    return "-" if value is None else f"{value:.4g}"


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
    rows = [result.profile.name, *result.not_measured]
    latency.add_column("profile", no_wrap=True, min_width=max(len(name) for name in rows))  # names stay whole
    for column in ("p50 ms", "p99 ms", "throughput/s", "limits here"):
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
    if getattr(result, "image", None) is not None:
        render_image(console, result.image)
    console.print("Next steps:")
    for step in result.next_steps:
        console.print(f"  {step}", soft_wrap=True, markup=False)


def render_image(console: Console, image: Any) -> None:
    """Per platform: each layer's size compressed and unpacked, the base's apart from what edgepack added."""
    for platform, report in image.platforms.items():
        table = Table(title=f"Image {escape(image.ref)} for {platform} (Python {report['python']})",
                      title_justify="left")
        for column in ("layer", "digest", "compressed MB", "unpacked MB"):
            table.add_column(column, justify="right" if column.endswith("MB") else "left")
        for layer in report["layers"]:
            table.add_row(layer["role"], layer["digest"][7:19], f"{layer['size_bytes'] / 2**20:.2f}",
                          f"{layer['uncompressed_bytes'] / 2**20:.2f}", style="dim" if layer["role"] == "base" else "")
        table.add_row("total", "", f"{report['size_bytes'] / 2**20:.2f}", f"{report['uncompressed_bytes'] / 2**20:.2f}",
                      style="bold")
        console.print(table)
    console.print(f"Image: [bold]{escape(str(image.layout))}[/] ({image.digest[:19]}…), "
                  f"{escape(str(image.archive))} ({image.archive_platform}), {escape(str(image.dockerfile))}, "
                  f"SBOM {escape(str(image.sbom))}" + (f"; {image.builder}: {image.engine_image}"
                                                        if image.engine_image else ""), soft_wrap=True)


def render_variants(console: Console, rows: list[Any], profile: str, metric_basis: str) -> None:
    """One row per distinct variant. The name never folds (the column is as wide as the longest);
    the accuracy and the reason fold within the rest, so the table reads at 80 columns."""
    console.print(f"Variants on {escape(profile)}; gated on {escape(metric_basis)}", soft_wrap=True, highlight=False)
    table = Table(title_justify="left", expand=False, pad_edge=False)
    names = ["\n= ".join((row.name, *row.aliases)) for row in rows]  # a twin on a line of its own
    table.add_column("variant", no_wrap=True, min_width=max((len(line) for n in names for line in n.split("\n")),
                                                            default=7))
    table.add_column("KiB", justify="right", no_wrap=True)
    table.add_column("p50 ms", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("accuracy; why", overflow="fold", ratio=1)
    chosen = next((row.name for row in rows if row.verdict.value == "chosen"), "")
    for row, name in zip(rows, names):
        bench = row.bench or {}
        style = "bold green" if row.verdict.value == "chosen" else "dim" if row.verdict.value == "skipped" else ""
        why = row.reason
        if row.speed_text:  # the measured figure says more here than the manifest's stable words
            why = row.speed_text + (f"; {chosen} chosen" if row.verdict.value != "chosen" and
                                    row.speed.value == "faster" else "")
        if row.variant.note:
            why += f"; {row.variant.note}"
        if row.code.value == "inaccurate" and row.gate is not None:  # its figures are in the accuracy part
            why = why.replace("fails the accuracy gate: " + "; ".join(row.gate.failures()),
                              "FAILS the gate on " + ", ".join(row.gate.failed()))
        accuracy = "" if row.accuracy in ("-", "reference") else row.accuracy + "; "
        table.add_row(name, f"{row.size_bytes / 1024:,.0f}" if row.size_bytes else "-", _sig(bench.get("p50_ms")),
                      row.verdict.value, escape(accuracy + why), style=style)
    console.print(table)


def render_bench(console: Console, reports: list[dict[str, Any]], title: str | None = None) -> None:
    """One row per measured configuration (batch, concurrency, where measured), then how well each is known."""
    first = reports[0]
    bundle = first.get("bundle", {})
    if title is None:
        title = (f"[bold]{escape(str(bundle.get('name', first.get('model'))))}[/] {bundle.get('version', '')} "
                 f"({bundle.get('variant', '')}) on [bold]{escape(first['profile'])}[/]")
    console.print(title, soft_wrap=True)
    places = {report["measured_on"] for report in reports}
    table = Table()
    columns = (["measured on"] if len(places) > 1 else []) + [
        "batch", "conc", "runs", "p50 ms", "±95%", "p90 ms", "p99 ms", "per s", "RSS MB"]
    for column in columns:
        table.add_column(column, justify="left" if column == "measured on" else "right")
    for report in reports:
        rss = report.get("peak_rss_mb")
        row = [escape(report["measured_on"])] if len(places) > 1 else []
        table.add_row(*row, str(report["batch"]), str(report.get("concurrency", 1)), str(report["runs"]),
                      _sig(report["p50_ms"]), f"{report.get('p50_ci95_rel', 0):.1%}", _sig(report["p90_ms"]),
                      _sig(report["p99_ms"]), f"{report['throughput_per_s']:.0f}", "-" if rss is None else f"{rss:.0f}")
    console.print(table)
    cold = sorted({(r["session_create_ms"], r["first_inference_ms"]) for r in reports})
    console.print("cold start: " + ", ".join(f"session {s:.1f} ms + first run {f:.2f} ms" for s, f in cold[:3])
                  + (" (median over processes)" if reports[0].get("processes") else ""), soft_wrap=True, markup=False)
    if len(places) == 1:
        console.print(f"Measured on {first['measured_on']}.", soft_wrap=True, markup=False)
    intervals = {report.get("interval", "within one process") for report in reports}
    unsettled = sum(not report.get("converged", True) for report in reports)
    console.print("±95%: half-width of the p50's 95% confidence interval, " + "; ".join(sorted(intervals))
                  + (f"; {unsettled} configuration(s) ended on the time budget before ±2%" if unsettled else ""),
                  soft_wrap=True, markup=False)
    seen: set[str] = set()
    for report in reports:
        env = report["environment"]
        line = (f"{report['measured_on']}: {env['cpu_model']} ({env['machine']}, {env['cpu_count']} CPUs), "
                f"Python {env['python']}, onnxruntime {env['onnxruntime']}; {report['input_source']} input")
        limits = "  limits: " + ", ".join(f"{k}: {v}" for k, v in report["limits"].items())
        for text in (line, limits):
            if text not in seen:
                seen.add(text)
                console.print(text, soft_wrap=True, markup=False)


def render_device_bench(console: Console, comparison: Any) -> None:
    """The device's figures next to the same profile emulated here (or alone for another architecture)."""
    from edgepack.bench.runner import results

    device, emulated = results(comparison.device), results(comparison.emulated) if comparison.emulated else []
    bundle = device[0]["bundle"]
    render_bench(console, device + emulated,
                 title=f"[bold]{escape(bundle['name'])}[/] {bundle['version']} ({bundle['variant']}) with profile "
                       f"[bold]{escape(comparison.profile.name)}[/]: measured on the device"
                       + (" and emulated here" if emulated else ""))
    if not emulated:
        console.print(f"Not emulated here: {comparison.profile.name} is {comparison.profile.arch}; "
                      "the device's figures stand alone.", soft_wrap=True, markup=False)
    for mine, theirs in zip(device, emulated):
        console.print(f"batch {mine['batch']}, concurrency {mine.get('concurrency', 1)}: device/emulated p50 "
                      f"{mine['p50_ms'] / theirs['p50_ms']:.2f}×", soft_wrap=True)
    console.print(f"Verified {bundle['verified']}.", soft_wrap=True, markup=False)


_VERDICT_STYLE = {"regression": "bold red", "improvement": "green", "within noise": "dim", "no interval": "dim"}


def render_comparison(console: Console, comparison: Any) -> None:
    """Per configuration and metric: old, new, change, the noise interval of the change, and the verdict."""
    console.print(f"[bold]{escape(comparison.old)}[/] → [bold]{escape(comparison.new)}[/]", soft_wrap=True)
    for config in comparison.configs:
        table = Table(title=escape(f"{config.profile}: {config.name} "
                                   f"({config.processes[0]} → {config.processes[1]} processes)"), title_justify="left")
        for column in ("metric", "old", "new", "change", "noise ±95%", "verdict"):
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
        for change in config.changes:
            noise = "-" if change.noise_rel is None else f"{change.noise_rel:.1%}"
            style = _VERDICT_STYLE[change.verdict]
            table.add_row(change.label + (" *" if change.gated else ""), f"{change.old:.4g}", f"{change.new:.4g}", f"{change.change:+.1%}", noise,
                          f"[{style}]{change.verdict}[/]")
        console.print(table)
    for text in comparison.unmatched:
        console.print(f"only in one report: {text}", soft_wrap=True, markup=False)
    for text in comparison.warnings:
        console.print(f"[yellow]note[/]: {escape(text)}", soft_wrap=True)
    found = comparison.regressions
    console.print("* gated: a regression there fails the comparison (exit 6); --gate chooses the metrics",
                  soft_wrap=True, markup=False)
    console.print(f"[bold red]{len(found)} regression(s) beyond the noise in gated metrics[/]" if found
                  else "[green]no regression beyond the noise in gated metrics[/]")


def render_profiles(console: Console, profiles: list[Profile]) -> None:
    table = Table()
    for column in ("name", "kind", "arch", "cores", "memory MB", "threads", "onnxruntime", "here"):
        table.add_column(column)
    for p in profiles:
        names = p.name + (f" ({', '.join(p.aliases)})" if p.aliases else "")
        table.add_row(names, p.kind, p.arch, str(p.cpus or "all"), str(p.memory_mb or "-"),
                      str(p.onnxruntime.threads or "all"), p.onnxruntime.version, p.emulation_summary())
    console.print(table)
