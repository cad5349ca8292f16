"""A benchmark report as one self-contained HTML page: comparison table, latency plots, limits, environment.

The input is what ``python -m edgepack.runtime.bench`` prints, one dict per measured configuration.
The page carries its own CSS and inline SVG and names no URL, so it opens offline, from a CI
artifact or a mail attachment alike. Every text that comes from a report is escaped: variant,
profile and host names are the user's. The same reports give the same bytes.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from edgepack.bench import svg_plot
from edgepack.runtime.files import write_atomic

_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 28px 36px 48px; background: #fff; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 6px; }
p.lead, p.note, .caption { color: var(--muted); margin: 4px 0 10px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table { font-size: 13px; }
th, td { padding: 6px 7px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; vertical-align: bottom; }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; }
td small { display: block; color: var(--muted); font-size: 12px; }
td.label { min-width: 190px; }
.wide { overflow-x: auto; }
tr.best td.p50 { font-weight: 700; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 7px;
  vertical-align: -1px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(480px, 100%), 1fr)); gap: 14px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 20px; margin: 6px 0 0; padding: 0; list-style: none; }
.missing { display: flex; align-items: center; justify-content: center; min-height: 120px; padding: 12px;
  background: var(--soft); border-radius: 6px; color: var(--muted); text-align: center; }
.enforced { color: #1a7f37; font-weight: 600; }
.not-enforced { color: #bc4c00; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
"""

# Environment keys in the order a reader looks for them; others follow alphabetically.
_ENV_ORDER = ("cpu_model", "machine", "cpu_count", "cpu_flags", "system", "python", "numpy", "onnxruntime",
              "providers", "threads")


def render_html(reports: list[dict], title: str) -> str:
    """The whole page for ``reports`` (one benchmark report each), deterministic for the same input."""
    labels = _labels(reports)
    colours = [svg_plot.PALETTE[i % len(svg_plot.PALETTE)] for i in range(len(reports))]
    count = len(reports)
    lead = f"{count} measured configuration{'' if count == 1 else 's'}" if reports else "No measurements given."
    body = [f"<h1>{escape(title)}</h1>", f'<p class="lead">{escape(lead)} · made by edgepack</p>']
    if reports:
        body += _comparison(reports, labels, colours)
        body += _distributions(reports, labels, colours)
        body += _details(reports, labels, colours)
        body += _grouped("Limits", "limits", reports, labels, _limits_table,
                         "what this host enforced of each profile, and what it could not")
        body += _grouped("Environment", "environment", reports, labels, _environment_list,
                         "where each configuration ran")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def write_html_report(path: Path, reports: list[dict], title: str) -> Path:
    """Write the page to ``path`` all at once: a reader never sees half a report."""
    return write_atomic(Path(path), render_html(reports, title).encode("utf-8"))


def report_label(report: dict[str, Any]) -> str:
    """variant · profile · batch · concurrency, from whichever of them the report has (concurrency 1 goes unsaid)."""
    bundle = report.get("bundle") if isinstance(report.get("bundle"), dict) else {}
    parts = [report.get("variant") or bundle.get("variant") or report.get("model") or bundle.get("name") or "model",
             report.get("profile"),
             None if report.get("batch") is None else f"batch {report['batch']}",
             None if report.get("concurrency") in (None, 1) else f"concurrency {report['concurrency']}"]
    return " · ".join(str(part) for part in parts if part not in (None, ""))


def _labels(reports: list[dict]) -> list[str]:
    # Legend and headings must tell reports apart even when two describe the same configuration.
    labels, seen = [], {}
    for report in reports:
        label = report_label(report)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} (#{seen[label]})")
    return labels


def _number(value: Any, digits: int = 4) -> str:
    """``digits`` significant digits without an exponent; "-" for what is missing or not a number."""
    if not _is_number(value):
        return "-" if value is None else escape(str(value))
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def _row(cells: list[str], classes: tuple[str, ...], tag: str = "td", extra: str = "") -> str:
    opened = [f'<{tag} class="{css}">' if css else f"<{tag}>" for css in classes]
    return f"<tr{extra}>" + "".join(f"{o}{cell}</{tag}>" for o, cell in zip(opened, cells)) + "</tr>"


def _comparison(reports: list[dict], labels: list[str], colours: list[str]) -> list[str]:
    p50s = [r.get("p50_ms") for r in reports]
    known = [v for v in p50s if _is_number(v) and v > 0]
    fastest = min(known) if known else None
    # One unit for the whole table, the one its largest figure reads best in: columns stay comparable.
    largest = max([r.get(k) for r in reports for k in ("p50_ms", "p99_ms") if _is_number(r.get(k))], default=1.0)
    unit, factor = svg_plot.time_unit(largest)

    def latency(value: Any) -> str:
        return _number(value * factor) if _is_number(value) else _number(value)

    head = ["configuration", "measured on", f"p50 {unit}", "vs fastest", f"p90 {unit}", f"p95 {unit}",
            f"p99 {unit}", f"max {unit}", "throughput /s", "peak RSS MB", "runs"]
    classes = ("label", "", "num p50") + ("num",) * 8
    rows = []
    for report, label, colour, p50 in zip(reports, labels, colours, p50s):
        interval = report.get("p50_ci95_ms")
        ci = ""
        if isinstance(interval, (list, tuple)) and len(interval) == 2:
            rel = report.get("p50_ci95_rel")
            spread = f" ±{_number(rel * 100, 2)}%" if _is_number(rel) else ""
            ci = f"<small>{latency(interval[0])}–{latency(interval[1])}{spread}</small>"
        ratio = f"{p50 / fastest:.2f}×" if fastest and p50 in known else "-"
        throughput = report.get("throughput_per_s")
        cells = [f"{_swatch(colour)}{escape(label)}", escape(str(report.get("measured_on", "-"))),
                 f"{latency(p50)}{ci}", ratio]
        cells += [latency(report.get(key)) for key in ("p90_ms", "p95_ms", "p99_ms", "max_ms")]
        cells += [f"{throughput:,.0f}" if _is_number(throughput) and throughput >= 1000 else _number(throughput, 3),
                  _number(report.get("peak_rss_mb"), 3), escape(str(report.get("runs", "-")))]
        best = ' class="best"' if fastest is not None and p50 == fastest else ""
        rows.append(_row(cells, classes, extra=best))
    table = (f'<div class="wide"><table class="comparison"><thead>{_row([escape(h) for h in head], classes, "th")}'
             f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    note = "Under each p50, its distribution-free 95% confidence interval; the fastest p50 is in bold."
    return ['<h2 id="comparison">Comparison</h2>', f'<p class="note">{note}</p>', table]


def _distributions(reports: list[dict], labels: list[str], colours: list[str]) -> list[str]:
    quantiles = [svg_plot.usable_quantiles(r.get("latency_quantiles_ms")) for r in reports]
    plotted = [svg_plot.Series(label, q, colour) for label, q, colour in zip(labels, quantiles, colours) if q]
    out = ['<h2 id="distributions">Latency distributions</h2>']
    if plotted:
        legend = "".join(f"<li>{_swatch(s.colour)}{escape(s.label)}</li>" for s in plotted)
        absent = [label for label, q in zip(labels, quantiles) if q is None]
        missing = f" Not drawn, for want of a distribution: {escape('; '.join(absent))}." if absent else ""
        out.append('<div class="card overlay">'
                   '<h3>All configurations: share of runs at or below each latency</h3>'
                   f'{svg_plot.ecdf(plotted)}<ul class="legend">{legend}</ul>'
                   '<p class="caption">Further left is faster; a steeper curve is steadier. Each curve is drawn '
                   f"from its report's percentiles 0–100 and stops where the axis ends.{missing}</p></div>")
    cards = []
    for report, label, colour, q in zip(reports, labels, colours, quantiles):
        if q is None:
            why = ("this report carries no latency distribution (latency_quantiles_ms)"
                   if report.get("latency_quantiles_ms") is None else
                   "this report's latency_quantiles_ms cannot be plotted (too few, negative or not numbers)")
            figure = f'<div class="missing">No plot: {escape(why)}; its summary figures are in the table.</div>'
        else:
            marks = {name: report[key] for name, key in (("p50", "p50_ms"), ("p99", "p99_ms"))
                     if _is_number(report.get(key))}
            runs = report.get("runs") if isinstance(report.get("runs"), int) else None
            figure = svg_plot.histogram(svg_plot.Series(label, q, colour), marks, runs)
        facts = [f"{escape(str(report['runs']))} runs" if "runs" in report else None,
                 escape(str(report.get("measured_on"))) if report.get("measured_on") else None,
                 "the time budget ended before the median's interval reached its target"
                 if report.get("converged") is False else None]
        cards.append(f'<div class="card"><h3>{_swatch(colour)}{escape(label)}</h3>{figure}'
                     f'<p class="caption">{" · ".join(f for f in facts if f)}</p></div>')
    out.append(f'<div class="grid">{"".join(cards)}</div>')
    if plotted:
        out.append('<p class="note">Each histogram is read off its report\'s percentiles 0–100 (1% of runs '
                   "between neighbours); an axis that ends past p99 says where the slowest run lies.</p>")
    return out


def _details(reports: list[dict], labels: list[str], colours: list[str]) -> list[str]:
    head = ["configuration", "batch", "input", "model KiB", "session create ms", "first inference ms",
            "per-process p50 ms", "bundle"]
    classes = ("", "num", "", "num", "num", "num", "num", "")
    rows = []
    for report, label, colour in zip(reports, labels, colours):
        size = report.get("model_bytes")
        bundle = report.get("bundle") if isinstance(report.get("bundle"), dict) else None
        processes = report.get("processes")
        per_process = (", ".join(_number(p.get("p50_ms") if isinstance(p, dict) else p) for p in processes)
                       if isinstance(processes, list) and processes else "-")
        built = (escape(f"{bundle.get('name', '?')} {bundle.get('version', '')} built for "
                        f"{bundle.get('built_for', '?')}") if bundle else "-")
        cells = [f"{_swatch(colour)}{escape(label)}", escape(str(report.get("batch", "-"))),
                 escape(str(report.get("input_source", "-"))),
                 _number(size / 1024, 3) if isinstance(size, (int, float)) else "-",
                 _number(report.get("session_create_ms"), 3), _number(report.get("first_inference_ms"), 3),
                 per_process, built]
        rows.append(_row(cells, classes))
    table = (f'<div class="wide"><table class="details"><thead>{_row([escape(h) for h in head], classes, "th")}'
             f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    return ['<h2 id="details">Cold start and size</h2>', table]


def _grouped(heading: str, key: str, reports: list[dict], labels: list[str], render, note: str) -> list[str]:
    """One block per distinct value of ``report[key]``, naming the reports it belongs to."""
    groups: dict[str, list[int]] = {}
    for i, report in enumerate(reports):
        value = report.get(key) or None  # an empty dict says as little as a missing one
        groups.setdefault(json.dumps(value, sort_keys=True, default=str), []).append(i)
    out = [f'<h2 id="{key}">{escape(heading)}</h2>', f'<p class="note">{escape(note)}</p>']
    for members in groups.values():
        value = reports[members[0]].get(key)
        names = ("every configuration" if len(members) == len(reports) and len(reports) > 1
                 else ", ".join(labels[i] for i in members))
        content = render(value) if isinstance(value, dict) and value else '<p class="note">not recorded</p>'
        out.append(f'<div class="card {key}-group"><h3>{escape(heading)} of {escape(names)}</h3>{content}</div>')
    return out


def _limits_table(limits: dict[str, Any]) -> str:
    rows = []
    for limit, state in limits.items():
        text = str(state)
        verdict, _, why = text.partition(" (")
        css = {"enforced": "enforced", "not enforced": "not-enforced"}.get(verdict)
        shown = (f'<span class="{css}">{escape(verdict)}</span> {escape(why.removesuffix(")"))}' if css
                 else escape(text))
        rows.append(f"<tr><td>{escape(str(limit))}</td><td>{shown}</td></tr>")
    return f'<table class="limits"><tbody>{"".join(rows)}</tbody></table>'


def _environment_list(environment: dict[str, Any]) -> str:
    keys = [k for k in _ENV_ORDER if k in environment] + sorted(k for k in environment if k not in _ENV_ORDER)
    items = []
    for key in keys:
        value = environment[key]
        if isinstance(value, (list, tuple)):
            text = ", ".join(map(str, value)) or "none"
        else:
            text = "default" if value is None and key == "threads" else "-" if value is None else str(value)
        items.append(f"<dt>{escape(str(key))}</dt><dd>{escape(text)}</dd>")
    return f"<dl>{''.join(items)}</dl>"
