"""The HTML benchmark report: real timings of a tiny model, rendered, parsed, and drawn by headless Chromium."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bench import svg_plot
from edgepack.bench.report_html import render_html, report_label, write_html_report
from edgepack.quantize import QuantizeConfig, make_variant
from edgepack.runtime.bench import Limits, bench_model
from edgepack.runtime.timing import LoopConfig

LOOP = LoopConfig(warmup_runs=10, warmup_s=0.05, max_warmup_s=0.5, min_runs=50, min_time_s=0.1, max_time_s=0.5,
                  target_ci=None)


def tiny_mlp(path: Path) -> Path:
    """4 features -> 64 -> 3, ReLU between: MatMuls that int8 quantization has something to do with."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
               for name, shape in (("w1", (4, 64)), ("w2", (64, 3)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Four measured configurations: fp32 and int8-dynamic, each at batch 1 and 32."""
    root = tmp_path_factory.mktemp("report")
    fp32 = tiny_mlp(root / "model.onnx")
    int8 = make_variant("int8-dynamic", fp32, root, QuantizeConfig())
    assert int8.path is not None, int8.skipped
    measured = []
    for variant, model in (("fp32", fp32), ("int8-dynamic", int8.path)):
        for batch in (1, 32):
            report = bench_model(model, None, Limits(threads=1), LOOP, batch=batch)
            measured.append({**report, "variant": variant, "profile": "host-1thread",
                             "measured_on": "this host, one thread"})
    return measured


class _Page(HTMLParser):
    """What a reader sees: the tags, the comparison table's rows, the text of each element kind."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.rows: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        if tag == "table":
            self._table = dict(attrs).get("class")
        elif tag == "tr" and self._table == "comparison":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.rows.append(" ".join(self._row))
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None:
            self._row.append(data)


def test_page_has_a_row_and_a_histogram_per_report_and_one_overlay(reports):
    page = _Page(render_html(reports, "tiny MLP on this host"))
    labels = [report_label(r) for r in reports]
    assert labels[0] == "fp32 · host-1thread · batch 1" and labels[3] == "int8-dynamic · host-1thread · batch 32"
    assert page.tags["svg"] == len(reports) + 1
    body_rows = page.rows[1:]  # the first is the header
    assert len(body_rows) == len(reports)
    for row, label, report in zip(body_rows, labels, reports):
        assert row.startswith(label) and "this host, one thread" in row and str(report["runs"]) in row
    text = " ".join(page.text)
    assert "p50" in text and "p99" in text and "% of runs at or below" in text
    assert "threads" in text and "enforced" in text and "onnxruntime" in text


def test_every_plotted_report_has_its_own_colour_in_both_plots(reports):
    page = render_html(reports, "colours")
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.DOTALL)
    overlay, histograms = svgs[0], svgs[1:]
    for colour, histogram in zip(svg_plot.PALETTE, histograms):
        assert f'fill="{colour}"' in histogram and f'stroke="{colour}"' in overlay
    assert len(set(svg_plot.PALETTE[: len(reports)])) == len(reports)


def test_page_is_self_contained_and_small(reports):
    page = render_html(reports, "offline")
    assert not re.search(r"\b(src|href)\s*=", page, flags=re.IGNORECASE)
    for needle in ("url(", "://", "<script", "<link", "@import"):
        assert needle not in page.lower(), needle
    assert len(page.encode()) < 80_000  # four reports with plots: tens of KB


def test_text_from_reports_is_escaped(reports):
    hostile = copy.deepcopy(reports[:2])
    hostile[0]["variant"] = "<script>x</script>"
    hostile[0]["measured_on"] = "lab & <b>rack 3</b>"
    hostile[1]["environment"]["cpu_model"] = 'ACME "Fast" <CPU>'
    hostile[1]["limits"]["<i>memory</i>"] = "not enforced (<none>)"
    page = render_html(hostile, "<title> & co")
    parsed = _Page(page)
    assert parsed.tags["script"] == 0 and parsed.tags["b"] == 0 and parsed.tags["i"] == 0
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "lab &amp; &lt;b&gt;rack 3&lt;/b&gt;" in page
    assert "ACME &quot;Fast&quot; &lt;CPU&gt;" in page and "&lt;title&gt; &amp; co" in page
    text = " ".join(parsed.text)
    assert "<script>x</script> · host-1thread · batch 1" in text and "<none>" in text


def test_a_report_without_quantiles_renders_with_a_note(reports):
    without = {key: value for key, value in reports[0].items() if key != "latency_quantiles_ms"}
    broken = {**reports[1], "latency_quantiles_ms": ["fast", "slow"]}
    # The least a report can be: optional keys (RSS, limits, environment, concurrency…) all missing.
    bare = {"p50_ms": 1.5, "p99_ms": 2.5, "runs": 10, "batch": 4, "concurrency": 2}
    page = render_html([without, broken, bare, reports[2]], "partial")
    parsed = _Page(page)
    assert parsed.tags["svg"] == 2  # the overlay and the one report with a distribution
    text = " ".join(parsed.text)
    assert "this report carries no latency distribution (latency_quantiles_ms)" in text
    assert "latency_quantiles_ms cannot be plotted" in text
    assert "model · batch 4 · concurrency 2" in text and text.count("not recorded") == 2
    assert len(parsed.rows) == 5

    nothing_plottable = _Page(render_html([without], "none"))
    assert nothing_plottable.tags["svg"] == 0 and len(nothing_plottable.rows) == 2


def test_identical_environments_and_limits_are_shown_once(reports):
    page = render_html(reports, "dedup")
    assert page.count('class="card environment-group"') == 1 and page.count('class="card limits-group"') == 1
    assert "Environment of every configuration" in page
    moved = copy.deepcopy(reports)
    moved[3]["environment"]["cpu_model"] = "another CPU"
    page = render_html(moved, "dedup")
    assert page.count('class="card environment-group"') == 2
    assert f"Environment of {report_label(moved[3])}</h3>" in page


def test_same_reports_give_the_same_bytes_written_atomically(reports, tmp_path):
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    target.write_text("an older report")
    assert write_html_report(target, reports, "again") == target
    assert target.read_bytes() == render_html(reports, "again").encode() == render_html(reports, "again").encode()
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temporary file left behind


def test_histogram_shares_are_read_off_the_quantiles():
    uniform = np.linspace(1.0, 2.0, 101)
    shares = svg_plot.bin_shares(uniform, np.linspace(1.0, 2.0, 11))
    assert np.allclose(shares, 0.1)
    # Half the runs at exactly 1 ms (tied percentiles): a step, not a division by zero.
    tied = np.concatenate([np.full(51, 1.0), np.linspace(1.0, 2.0, 51)[1:]])
    shares = svg_plot.bin_shares(tied, np.array([0.9, 1.1, 1.5, 2.0]))
    assert np.isclose(shares.sum(), 1.0) and 0.5 < shares[0] < 0.6
    assert "latency (µs" in svg_plot.histogram(svg_plot.Series("sub-ms", tuple(uniform / 10), "#000"), {})
    assert "latency (ms" in svg_plot.histogram(svg_plot.Series("ms", tuple(uniform * 3), "#000"), {})
    same = svg_plot.histogram(svg_plot.Series("one value", (0.5,) * 101, "#000"), {"p50": 0.5})
    assert "p50 500.0 µs" in same
    stall = tuple(np.append(np.linspace(1.0, 2.0, 100), 40.0))  # one stall far past p99
    assert "max 40.00 ms →" in svg_plot.histogram(svg_plot.Series("stall", stall, "#000"), {})


def _chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


def test_headless_chromium_draws_the_page(reports, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (.ci/run installs Debian's chromium)")
    Image = pytest.importorskip("PIL.Image", reason="Pillow decodes the screenshot: pip install -e '.[dev]'")
    without = {key: value for key, value in reports[1].items() if key != "latency_quantiles_ms"}
    page = write_html_report(tmp_path / "report.html", [*reports, without], "edgepack bench: tiny MLP")
    shot = tmp_path / "screenshot.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    pixels = {tuple(int(c) for c in colour): int(count) for colour, count in zip(colours, counts)}
    background = max(pixels, key=pixels.__getitem__)
    assert background == (255, 255, 255)
    assert len(pixels) > 500, "too few colours for text, tables and plots"
    drawn = 1 - pixels[background] / len(rgb)
    assert drawn > 0.05, f"only {drawn:.1%} of the screenshot is not background"
    for colour in svg_plot.PALETTE[: len(reports)]:  # the plotted reports, in the overlay and histograms
        wanted = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert pixels.get(wanted, 0) > 300, f"plot colour {colour} drawn on only {pixels.get(wanted, 0)} pixels"
