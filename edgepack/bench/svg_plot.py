"""Latency plots as inline SVG strings: a histogram per run and an ECDF of several runs on one axis.

Both read a run's latency quantiles (percentiles 0..100, as ``summarize`` keeps them), not its
samples: between two neighbouring percentiles lies 1% of the runs, which is all a histogram needs.
Output is plain text with coordinates rounded to 0.1 px, so the same numbers give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

# Okabe-Ito: told apart by readers with any common colour blindness; the yellow is darkened for white paper.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#b39200", "#555555")
_INK, _GRID, _MUTED = "#222", "#e3e6ea", "#666"
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"'


@dataclass(frozen=True)
class Series:
    label: str
    quantiles_ms: tuple[float, ...]  # evenly spaced percentiles from 0 to 100, non-decreasing
    colour: str


def usable_quantiles(values: object) -> tuple[float, ...] | None:
    """The quantiles as floats, or None when they cannot be plotted (missing, too few, not finite)."""
    if not isinstance(values, (list, tuple)) or len(values) < 2:
        return None
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        return None
    # Percentiles are non-decreasing; a report edited by hand may not be, and sorting is what it meant.
    return tuple(float(v) for v in np.sort(array))


def time_unit(upper_ms: float) -> tuple[str, float]:
    """The unit an axis reaching ``upper_ms`` reads best in, and the factor from milliseconds."""
    if upper_ms < 1.0:
        return "µs", 1000.0
    if upper_ms >= 10_000.0:
        return "s", 0.001
    return "ms", 1.0


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) inside [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks inside [low, high] on a log axis (low > 0)."""
    ticks = []
    for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks += [m * 10.0**power for m in (1, 2, 5) if low <= m * 10.0**power <= high]
    return ticks


def tick_label(value: float) -> str:
    return f"{value:.6g}"


def short(value: float, digits: int = 4) -> str:
    """A measured value to ``digits`` significant digits, never in exponent form."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


def bin_count(quantiles: Sequence[float], low: float, high: float, runs: int | None) -> int:
    """Freedman-Diaconis bins (width 2 IQR / cube root of runs) over [low, high], kept within 20..100.

    A fixed count would put a tight body into two bins whenever the tail is long, which is the
    usual shape of latencies.
    """
    iqr = _at(quantiles, 75) - _at(quantiles, 25)
    if iqr <= 0 or high <= low:
        return 20
    width = 2 * iqr / max(runs or 1000, 8) ** (1 / 3)
    return int(min(max((high - low) / width, 20), 100))


def plot_span(quantiles: Sequence[float]) -> tuple[float, float]:
    """The latency range worth drawing: all of it, unless the slowest 1% would squash the rest.

    A single stall (a page fault, a preempted thread) can sit ten times past p99; the axis then
    ends a little past p99 and the caller says where the maximum lies.
    """
    low, p99, high = quantiles[0], _at(quantiles, 99), quantiles[-1]
    if p99 - low <= 1e-9 * max(abs(low), 1.0):  # nearly every run read the same (a coarse clock): a band
        pad = max(abs(low) * 0.05, 1e-6)
        return low - pad, low + pad
    reach = p99 - low
    return low, high if high <= p99 + 0.5 * reach else p99 + 0.15 * reach


def bin_shares(quantiles: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    """Share of runs in each bin between ``edges``, reading the distribution off its quantiles.

    The cumulative share rises linearly between neighbouring quantiles (density 1% over their
    gap); tied quantiles are a step. Bins of equal width then show density without dividing by
    a gap that may be zero.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    shares = np.linspace(0.0, 1.0, len(q))
    # For ties keep the highest share, so the CDF steps up at the tied value.
    keep = np.append(q[1:] != q[:-1], True)
    cdf = np.interp(np.asarray(edges, dtype=np.float64), q[keep], shares[keep], left=0.0, right=1.0)
    return np.diff(cdf)


def _at(quantiles: Sequence[float], percent: float) -> float:
    return float(np.interp(percent, np.linspace(0, 100, len(quantiles)), quantiles))


def _f(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class _Frame:
    width: int
    height: int
    left: int = 62
    right: int = 18
    top: int = 30
    bottom: int = 46

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:  # bottom of the plot area (SVG y grows downwards)
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top


def histogram(series: Series, marks: dict[str, float], runs: int | None = None,
              width: int = 540, height: int = 260) -> str:
    """A histogram of one run's latency with p50 and p99 (or any ``marks``) as labelled lines.

    ``runs`` (how many samples the quantiles summarize) only sets the bin width.
    """
    q = series.quantiles_ms
    low, high = plot_span(q)
    bins = bin_count(q, low, high, runs)
    unit, factor = time_unit(high)
    frame = _Frame(width, height, top=44)
    edges = np.linspace(low, high, bins + 1)
    shares = bin_shares(q, edges) * 100
    top_share = max(float(shares.max()), 1e-9)
    y_ticks = nice_ticks(0, top_share * 1.08, 4)
    y_top = max(y_ticks[-1], top_share * 1.08)

    start = low - (high - low) * 0.02  # the first bar clear of the y axis

    def x(ms: float) -> float:
        return frame.x0 + (ms - start) / (high - start) * (frame.x1 - frame.x0)

    def y(share: float) -> float:
        return frame.y0 - share / y_top * (frame.y0 - frame.y1)

    parts = [_open(frame, f"Latency histogram of {series.label}")]
    parts += _y_axis(frame, y_ticks, y, "% of runs per bin")
    # One filled outline of steps, not a rect per bin: as many bins as needed for a few hundred bytes.
    steps = [f"M{_f(x(low))},{_f(frame.y0)}"]
    for left, right, share in zip(edges[:-1], edges[1:], shares):
        steps.append(f"L{_f(x(left))},{_f(y(float(share)))}L{_f(x(right))},{_f(y(float(share)))}")
    steps.append(f"L{_f(frame.x1)},{_f(frame.y0)}Z")
    parts.append(f'<path d="{"".join(steps)}" fill="{series.colour}" stroke="{series.colour}" '
                 'stroke-linejoin="round"/>')
    parts += _x_axis(frame, [t / factor for t in nice_ticks(start * factor, high * factor)], x, factor,
                     f"latency ({unit}), bins of {short((high - low) / bins * factor, 2)} {unit}")
    labels = []
    for n, (name, value) in enumerate(sorted(marks.items(), key=lambda item: item[1])):
        if not low <= value <= high:
            continue
        dash = "" if n == 0 else ' stroke-dasharray="5 3"'
        parts.append(f'<line x1="{_f(x(value))}" x2="{_f(x(value))}" y1="{frame.y1 - 14 + 13 * (n % 2)}" '
                     f'y2="{_f(frame.y0)}" stroke="{_INK}" stroke-width="1.5"{dash}/>')
        # Labels grow away from the middle so that one near either edge stays inside the frame.
        anchor, shift = ("end", -4) if x(value) > (frame.x0 + frame.x1) / 2 else ("start", 4)
        labels.append(f'<text x="{_f(x(value) + shift)}" y="{frame.y1 - 18 + 13 * (n % 2)}" '
                      f'text-anchor="{anchor}">{escape(name)} {short(value * factor)} {unit}</text>')
    if q[-1] > high:
        max_unit, max_factor = time_unit(q[-1])
        labels.append(f'<text x="{_f(frame.x1)}" y="{_f(frame.y0 - 6)}" text-anchor="end" fill="{_MUTED}">'
                      f"max {short(q[-1] * max_factor)} {max_unit} →</text>")
    # A white outline under each label keeps it readable where it crosses a bar or a line.
    parts.append(f'<g font-size="12" fill="{_INK}" stroke="#fff" stroke-width="3" paint-order="stroke">'
                 f'{"".join(labels)}</g>')
    parts.append("</svg>")
    return "".join(parts)


def ecdf(series: Sequence[Series], width: int = 1040, height: int = 380) -> str:
    """Every run's cumulative distribution on one latency axis; log-scaled when they differ tenfold."""
    spans = [plot_span(s.quantiles_ms) for s in series]
    low, high = min(span[0] for span in spans), max(span[1] for span in spans)
    log = low > 0 and high / low > 10
    unit, factor = time_unit(high)
    frame = _Frame(width, height, top=16)
    if log:
        low, high = low / 1.05, high * 1.05
    else:
        pad = (high - low) * 0.03
        low, high = max(low - pad, 0.0), high + pad

    def x(ms: float) -> float:
        if log:
            return frame.x0 + math.log(ms / low) / math.log(high / low) * (frame.x1 - frame.x0)
        return frame.x0 + (ms - low) / (high - low) * (frame.x1 - frame.x0)

    def y(percent: float) -> float:
        return frame.y0 - percent / 100 * (frame.y0 - frame.y1)

    parts = [_open(frame, "Cumulative latency distribution of every report")]
    parts += _y_axis(frame, [0, 25, 50, 75, 100], y, "% of runs at or below")
    for percent, name in ((50, "p50"), (99, "p99")):
        parts.append(f'<line x1="{frame.x0}" x2="{_f(frame.x1)}" y1="{_f(y(percent))}" y2="{_f(y(percent))}" '
                     f'stroke="{_MUTED}" stroke-dasharray="4 4"/><text x="{_f(frame.x1 - 4)}" '
                     f'y="{_f(y(percent) - 4)}" font-size="11" text-anchor="end" fill="{_MUTED}">{name}</text>')
    ticks = log_ticks(low * factor, high * factor) if log else nice_ticks(low * factor, high * factor)
    scale = "log scale" if log else "linear"
    parts += _x_axis(frame, [t / factor for t in ticks], x, factor, f"latency ({unit}, {scale})")
    for s in series:
        points = _clipped(s.quantiles_ms, high)
        path = " ".join(f"{_f(x(ms))},{_f(y(percent))}" for ms, percent in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" stroke-width="2.5" '
                     f'stroke-linejoin="round"><title>{escape(s.label)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def _clipped(quantiles: Sequence[float], high: float) -> list[tuple[float, float]]:
    """(latency, percent) points up to ``high``; the line stops where it leaves the axis."""
    percents = np.linspace(0, 100, len(quantiles))
    points = []
    for i, (ms, percent) in enumerate(zip(quantiles, percents)):
        if ms > high:
            before, share = quantiles[i - 1], percents[i - 1]
            points.append((high, float(share + (percent - share) * (high - before) / (ms - before))))
            break
        points.append((ms, float(percent)))
    return points


def _open(frame: _Frame, title: str) -> str:
    return (f'<svg viewBox="0 0 {frame.width} {frame.height}" width="100%" role="img" {_FONT} '
            f'aria-label="{escape(title)}"><title>{escape(title)}</title>')


def _y_axis(frame: _Frame, ticks: Sequence[float], y, label: str) -> list[str]:
    parts = []
    for tick in ticks:
        parts.append(f'<line x1="{frame.x0}" x2="{_f(frame.x1)}" y1="{_f(y(tick))}" y2="{_f(y(tick))}" '
                     f'stroke="{_GRID}"/><text x="{frame.x0 - 6}" y="{_f(y(tick) + 4)}" font-size="11" '
                     f'text-anchor="end" fill="{_MUTED}">{tick_label(tick)}</text>')
    middle = (frame.y0 + frame.y1) / 2
    parts.append(f'<text transform="translate(14 {_f(middle)}) rotate(-90)" font-size="12" text-anchor="middle" '
                 f'fill="{_INK}">{escape(label)}</text>')
    return parts


def _x_axis(frame: _Frame, ticks_ms: Sequence[float], x, factor: float, label: str) -> list[str]:
    parts = [f'<line x1="{frame.x0}" x2="{_f(frame.x1)}" y1="{_f(frame.y0)}" y2="{_f(frame.y0)}" stroke="{_INK}"/>']
    for tick in ticks_ms:
        at = x(tick)
        if frame.x0 - 0.5 <= at <= frame.x1 + 0.5:
            parts.append(f'<line x1="{_f(at)}" x2="{_f(at)}" y1="{_f(frame.y0)}" y2="{_f(frame.y0 + 5)}" '
                         f'stroke="{_INK}"/><text x="{_f(at)}" y="{_f(frame.y0 + 18)}" font-size="11" '
                         f'text-anchor="middle" fill="{_MUTED}">{tick_label(tick * factor)}</text>')
    parts.append(f'<text x="{_f((frame.x0 + frame.x1) / 2)}" y="{_f(frame.y0 + 38)}" font-size="12" '
                 f'text-anchor="middle" fill="{_INK}">{escape(label)}</text>')
    return parts
