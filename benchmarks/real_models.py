"""The real `edgepack build` on real models: how long it takes and what it decides.

For each model, runs `python -m edgepack build MODEL ... --json` in a child process with the
defaults (`--target edge`, `--quantize auto`, the default gates and bench time) and reports the
build's wall time (child process start to exit, imports included), its stage times (from the
progress lines), the model file's size, the bundle's size, the chosen variant, and for every
variant the build's verdict (reason code), its speed against fp32 (geometric mean of the per-round
p50 ratios with the 95% interval) and the gated figures as the build reports them.

Models: PP-OCRv4 det and rec and the PP-OCR v2 direction classifier (rapidocr-onnxruntime's wheel),
Silero VAD (silero-vad), Magika (magika), NudeNet's YOLOv8n 320 detector (nudenet), taken out of
their PyPI wheels (`pip download`, cached), and the repository's examples: the tiny detector (with
its recall metric), MobileNetV3-Small (seeded random weights), the digits MLP and the digits CNN.
Their samples are made here: text rendered with Pillow for OCR, sine and noise for the VAD, byte
tokens of files on this machine for Magika, scikit-learn's two sample photos for NudeNet.
A build that fails shows its error's first line, and the run goes on.

    python benchmarks/real_models.py [--models rec,vad] [--cache ~/.cache/edgepack-bench]
        [--out DIR] [--json results.json] [--timeout 900]

Needs network access to PyPI on the first run (the wheels are cached), and the torch and dev
extras (Pillow, scikit-learn).

Last run (2026-12-07, this 2-core host, quiet; onnxruntime 1.32.0, target edge-1core). Wall time
of the whole build, the variant shipped, and why the others did not:

    PP-OCRv4 rec (10.9 MB, dynamic width)   30.7 s  fp32  int8 46% argmax agreement; fp16 1.00x (0.98-1.03)
    PP-OCRv4 det                            19.5 s  fp32  int8 ch.err 0.38-0.42; fp16 0.99x (0.98-1.01)
    PP-OCR cls                              11.4 s  fp32  int8-dynamic 13.2x, int8-static 1.62x slower
    Silero VAD (3 inputs, If subgraphs)      5.7 s  fp32  int8 not applicable; fp16 1.37x slower
    Magika (int32 tokens)                   14.4 s  fp32  int8-dynamic 6.0x slower; int8-static 0% agree
    NudeNet 320n (YOLOv8, [1, 4+C, 2100])   12.9 s  fp16  faster 0.93x (0.90-0.95), ch.err 0.018; int8 ch.err 1.1-1.3
    tiny detector (--metric recall@IoU)     14.3 s  fp32  int8-static -3.75 pt recall; int8-dynamic 8.4x slower
    MobileNetV3-Small (10.3 MB)             21.3 s  fp32  int8 ch.err 1.4-2.0; fp16 1.04x (0.99-1.09)
    digits MLP                              13.3 s  int8-dynamic  faster 0.58x (0.55-0.62), accuracy +0.00
    digits CNN                              12.5 s  fp32  int8-dynamic 4.5x, int8-static 1.28x slower

(MobileNetV3-Small from a second run, after its weights took BatchNorm statistics from photos.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WIDTH = 80

# -- the models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships an ONNX file."""

    package: str
    version: str
    member: str  # the ONNX file's path inside the wheel


RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
OCR_DET = Wheel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")
OCR_REC = Wheel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
OCR_CLS = Wheel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
SILERO = Wheel("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx")
MAGIKA = Wheel("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
MAGIKA_CONFIG = Wheel("magika", "1.0.3", "magika/models/standard_v3_3/config.min.json")
NUDENET = Wheel("nudenet", "3.4.2", "nudenet/320n.onnx")


@dataclass(frozen=True)
class Build:
    """What to pass to `edgepack build`, and the file whose size is the model's."""

    model: str
    flags: tuple[str, ...]
    model_file: Path


@dataclass(frozen=True)
class Case:
    name: str
    prepare: Callable[[Path], Build]  # makes the model and sample files (in the cache) and says how to build


def onnx_from_wheel(wheel: Wheel, cache: Path) -> Path:
    """The wheel's file, downloaded once with pip and taken out of the zip once."""
    target = cache / "models" / f"{wheel.package}-{wheel.version}" / Path(wheel.member).name
    if target.exists():
        return target
    wheels = cache / "wheels"
    pattern = f"{wheel.package.replace('-', '_')}-{wheel.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        f"{wheel.package}=={wheel.version}", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(pattern))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as archive:
        target.write_bytes(archive.read(wheel.member))
    return target


def _saved(path: Path, make: Callable[[], Any]) -> Path:
    """``path``, made once: an array saved with np.save, or a dict of arrays with np.savez."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        made = make()
        with path.open("wb") as file:  # np.save and np.savez would add a suffix to a str path
            if isinstance(made, dict):
                np.savez(file, **made)
            else:
                np.save(file, made)
    return path


# -- samples -------------------------------------------------------------------------------------------

WORDS = ("invoice", "total", "amount", "date", "2024-03-17", "edge", "model", "quantize", "OCR", "receipt",
         "No.", "42", "3.14", "Paris", "Berlin", "shipping", "tax", "VAT", "order", "#1093", "item", "price",
         "USD", "12:45", "thank you", "customer", "ACME Ltd", "page", "summary", "qty")


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def _text_line_image(text: str, size: int, rng: np.random.Generator):
    """One line of dark text on a light background, cropped close to the text (a PIL RGB image)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad = size // 4
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), background)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=ink)
    return image


def paddle_text_lines(count: int, height: int, width: int, seed: int = 0, flip_every: int = 0) -> np.ndarray:
    """Rendered text lines as PaddleOCR's recognizer and classifier take them: resized to ``height``
    keeping the aspect, (x / 255 - 0.5) / 0.5, padded with zeros to ``width``; [N, 3, height, width].
    ``flip_every``: every so many lines turned upside down (what the direction classifier detects)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = np.zeros((count, 3, height, width), dtype=np.float32)
    for index in range(count):
        image = _text_line_image(_text(rng, int(rng.integers(1, 6))), int(rng.integers(18, 34)), rng)
        if flip_every and index % flip_every == 0:
            image = image.rotate(180)
        scaled = min(width, max(1, round(image.width * height / image.height)))
        array = np.asarray(image.resize((scaled, height), Image.BILINEAR), dtype=np.float32)
        lines[index, :, :, :scaled] = (array / 255 - 0.5).transpose(2, 0, 1) / 0.5
    return lines


def rendered_pages(count: int, size: int = 320, seed: int = 0) -> np.ndarray:
    """Pages of a few text lines at random places, ImageNet-normalized as PaddleOCR's detector takes
    them: [N, 3, size, size] (size a multiple of 32)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pages = np.zeros((count, 3, size, size), dtype=np.float32)
    for index in range(count):
        page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 256, 3)))
        for _ in range(int(rng.integers(3, 8))):
            line = _text_line_image(_text(rng, int(rng.integers(1, 4))), int(rng.integers(14, 30)), rng)
            page.paste(line, (int(rng.integers(0, size * 2 // 3)), int(rng.integers(0, size - line.height))))
        array = np.asarray(page, dtype=np.float32) / 255
        pages[index] = ((array - mean) / std).transpose(2, 0, 1)
    return pages


def vad_feeds(count: int = 16, samples: int = 512, rate: int = 16000, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for Silero VAD stacked on a leading axis: 512-sample windows of voiced sound (a pitch
    with harmonics) or of noise alone, a zero state, the sample rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    windows = []
    for index in range(count):
        pitch = rng.uniform(90, 260)
        voiced = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, np.pi)) / k for k in range(1, 6))
        level = rng.uniform(0.05, 0.4) if index % 2 == 0 else 0.0
        windows.append(level * voiced + rng.normal(0, 0.01, samples))
    return {"input": np.stack(windows).astype(np.float32)[:, None, :],
            "state": np.zeros((count, 2, 1, 128), dtype=np.float32),
            "sr": np.full(count, rate, dtype=np.int64)}


def magika_tokens(files: list[Path], config: dict[str, Any]) -> np.ndarray:
    """Magika's features of each file: the first ``beg_size`` bytes after leading whitespace, padded
    at the end, then the last ``end_size`` bytes before trailing whitespace, padded at the start
    (padding ``padding_token``); int32 [N, beg_size + end_size], values 0..256."""
    block, begin, end, pad = config["block_size"], config["beg_size"], config["end_size"], config["padding_token"]
    rows = []
    for path in files:
        content = path.read_bytes()
        head = list(content[:block].lstrip()[:begin])
        tail = list(content[-block:].rstrip()[-end:]) if end else []
        rows.append(head + [pad] * (begin - len(head)) + [pad] * (end - len(tail)) + tail)
    return np.array(rows, dtype=np.int32)


def files_of_many_types() -> list[Path]:
    """A few files of each kind in this checkout and its Python: source, text, data, archives."""
    import email
    import json as json_module

    picks: list[Path] = []
    for pattern, count in (("edgepack/*.py", 6), ("tests/*.py", 3), ("*.md", 1), ("*.toml", 1), ("targets/*.toml", 2),
                           ("examples/*.npy", 2), ("examples/*.npz", 2), ("examples/*.pt", 2), ("examples/*.txt", 1),
                           ("examples/*.skops", 1)):
        picks += sorted(ROOT.glob(pattern))[:count]
    library = Path(json_module.__file__).parent.parent
    picks += sorted(library.glob("*.py"))[:2] + [Path(email.__file__)]
    for pattern in ("lib-dynload/*.so", "../../bin/python3*", "ensurepip/_bundled/*.whl"):
        picks += sorted(library.glob(pattern))[:2]
    return [path for path in picks if path.is_file() and path.stat().st_size > 0]


def sample_photos(size: int = 320) -> np.ndarray:
    """scikit-learn's two sample photos (china.jpg, flower.jpg) and their mirror images, resized to
    size x size: float32 [4, 3, size, size] in 0..1."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = []
    for array in load_sample_images().images:
        image = Image.fromarray(array).resize((size, size), Image.BILINEAR)
        for variant in (image, image.transpose(Image.FLIP_LEFT_RIGHT)):
            photos.append(np.asarray(variant, dtype=np.float32).transpose(2, 0, 1) / 255)
    return np.stack(photos)


# -- how each model is built ---------------------------------------------------------------------------

def ocr_rec(cache: Path) -> Build:
    model = onnx_from_wheel(OCR_REC, cache)
    sample = _saved(cache / "samples" / "ocr_rec_lines.npy", lambda: paddle_text_lines(32, 48, 320))
    return Build(str(model), ("--sample", str(sample)), model)


def ocr_det(cache: Path) -> Build:
    model = onnx_from_wheel(OCR_DET, cache)
    sample = _saved(cache / "samples" / "ocr_det_pages.npy", lambda: rendered_pages(8, 320))
    return Build(str(model), ("--sample", str(sample)), model)


def ocr_cls(cache: Path) -> Build:
    model = onnx_from_wheel(OCR_CLS, cache)
    sample = _saved(cache / "samples" / "ocr_cls_lines.npy", lambda: paddle_text_lines(32, 48, 192, seed=1,
                                                                                        flip_every=2))
    return Build(str(model), ("--sample", str(sample)), model)


def silero_vad(cache: Path) -> Build:
    model = onnx_from_wheel(SILERO, cache)
    sample = _saved(cache / "samples" / "silero_vad_feeds.npz", vad_feeds)
    return Build(str(model), ("--sample", str(sample)), model)


def magika(cache: Path) -> Build:
    model = onnx_from_wheel(MAGIKA, cache)
    config = json.loads(onnx_from_wheel(MAGIKA_CONFIG, cache).read_text())
    sample = _saved(cache / "samples" / "magika_tokens.npy", lambda: magika_tokens(files_of_many_types(), config))
    return Build(str(model), ("--sample", str(sample)), model)


def nudenet(cache: Path) -> Build:
    model = onnx_from_wheel(NUDENET, cache)
    sample = _saved(cache / "samples" / "nudenet_photos.npy", sample_photos)
    return Build(str(model), ("--sample", str(sample)), model)


def tiny_detector(cache: Path) -> Build:
    folder = cache / "samples" / "tiny_detector"
    if not (folder / "detector_validation.npz").exists():
        sys.path.insert(0, str(EXAMPLES))
        from shapes import write_data

        write_data(folder)
    weights = EXAMPLES / "tiny_detector.pt"
    return Build(f"{EXAMPLES / 'tiny_detector.py'}:make_model",
                 ("--weights", str(weights), "--sample", str(folder / "detector_sample.npy"),
                  "--validation", str(folder / "detector_validation.npz"),
                  "--metric", f"{EXAMPLES / 'detector_metric.py'}:recall_at_iou"), weights)


def mobilenet_v3_small(cache: Path) -> Build:
    """Seeded weights with BatchNorm statistics from real photos, and 16 photo crops as the sample,
    as the example's script writes them (cached by the script's own digest: a changed script
    writes them again)."""
    script = EXAMPLES / "mobilenet_v3_small.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    weights = cache / "models" / f"mobilenet_v3_small-{digest}.pt"
    photos = cache / "samples" / f"mobilenet_photos-{digest}.npy"
    if not (weights.exists() and photos.exists()):
        weights.parent.mkdir(parents=True, exist_ok=True)
        photos.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(script), str(weights), str(photos)], check=True)
    return Build(f"{script}:make_model", ("--weights", str(weights), "--sample", str(photos)), weights)


def digits_mlp(cache: Path) -> Build:
    model = EXAMPLES / "digits_mlp.skops"
    return Build(str(model), ("--sample", str(EXAMPLES / "digits_sample.npy"),
                              "--validation", str(EXAMPLES / "digits_validation.npz")), model)


def digits_cnn(cache: Path) -> Build:
    weights = EXAMPLES / "digits_cnn.pt"
    return Build(f"{EXAMPLES / 'digits_cnn.py'}:make_model",
                 ("--weights", str(weights), "--sample", str(EXAMPLES / "digits_images.npy"),
                  "--validation", str(EXAMPLES / "digits_images_validation.npz")), weights)


CASES = (
    Case("PP-OCRv4 rec", ocr_rec),
    Case("PP-OCRv4 det", ocr_det),
    Case("PP-OCR cls", ocr_cls),
    Case("Silero VAD", silero_vad),
    Case("Magika", magika),
    Case("NudeNet 320n", nudenet),
    Case("tiny detector", tiny_detector),
    Case("MobileNetV3-Small", mobilenet_v3_small),
    Case("digits MLP", digits_mlp),
    Case("digits CNN", digits_cnn),
)

# -- running a build -----------------------------------------------------------------------------------

_FINISHED = re.compile(r"^✓ (\w+)\s.*\((\d+(?:\.\d+)?) s\)\s*$")


def run_build(case: Case, cache: Path, out: Path, timeout_s: float) -> dict[str, Any]:
    """One `edgepack build` in a child process: its wall time, stage times and --json result, or its error."""
    try:
        build = case.prepare(cache)
    except Exception as err:  # a download or a sample that cannot be made: said in the table
        return {"name": case.name, "error": f"preparing failed: {type(err).__name__}: {err}".splitlines()[0]}
    folder = out / re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "edgepack", "build", build.model, *build.flags,
               "--out", str(folder), "--json", "--no-lock"]
    started = time.perf_counter()
    try:  # in the output folder: no edgepack.toml or lock file of the checkout applies
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=folder, check=False)
    except subprocess.TimeoutExpired:
        return {"name": case.name, "model_bytes": build.model_file.stat().st_size, "command": command,
                "error": f"did not finish in {timeout_s:g} s"}
    wall = time.perf_counter() - started
    (folder / "build.log").write_text(done.stderr)
    stages: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if match := _FINISHED.match(line.strip()):
            stages[match.group(1)] = stages.get(match.group(1), 0.0) + float(match.group(2))
    row = {"name": case.name, "wall_s": round(wall, 2), "stages_s": stages,
           "model_bytes": build.model_file.stat().st_size, "command": command, "exit_code": done.returncode}
    if done.returncode != 0:
        said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        first = next((line for line in said if line.startswith(("error:", "internal error:"))),
                     said[-1] if said else f"exit code {done.returncode}")
        return {**row, "error": first}
    result = json.loads(done.stdout)
    return {**row, "variant": result["variant"], "profile": result["profile"], "bundle_bytes": result["bundle_bytes"],
            "metric_basis": result["metric_basis"], "outputs": result["outputs"],
            "variants": [{key: variant[key] for key in ("name", "aliases", "verdict", "code", "reason", "speed",
                                                         "ratio", "accuracy", "size_bytes", "p50_ms", "note")}
                         for variant in result["variants"]]}


# -- the table -----------------------------------------------------------------------------------------

def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _speed(variant: dict[str, Any]) -> str:
    ratio = variant.get("ratio")
    if not ratio:
        return ""
    return f"{variant['speed']} {ratio['ratio']:.2f} ({ratio['low']:.2f}-{ratio['high']:.2f})"


def render(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        wall = f"{row['wall_s']:.1f} s" if "wall_s" in row else "-"
        head = f"{row['name']:<18} {wall:>8}  model {_mb(row.get('model_bytes')):>8}"
        if "error" in row:
            lines.append(head)
            lines += textwrap.wrap(f"FAILED: {row['error']}", WIDTH, initial_indent="  ", subsequent_indent="    ")
            continue
        lines.append(f"{head}  bundle {_mb(row['bundle_bytes']):>8}  -> {row['variant']}")
        stages = "  ".join(f"{stage} {seconds:.1f}" for stage, seconds in row["stages_s"].items())
        lines += textwrap.wrap(f"stages (s): {stages}", WIDTH, initial_indent="  ", subsequent_indent="    ")
        outputs = ", ".join(f"{output['name']} ({output['kind']})" for output in row["outputs"])
        lines += textwrap.wrap(f"outputs: {outputs}", WIDTH, initial_indent="  ", subsequent_indent="    ")
        for variant in row["variants"]:
            label = " = ".join([variant["name"], *variant["aliases"]])
            mark = "*" if variant["verdict"] == "chosen" else " "
            if len(label) > 26:  # byte-identical variants: their names on a line of their own
                lines.append(f" {mark}{label}")
                label, mark = "", " "
            lines.append(f" {mark}{label:<26} {variant['code']:<17} {_speed(variant)}".rstrip())
            said = variant["reason"] if variant["verdict"] == "skipped" else variant["accuracy"]
            if said not in ("-", "reference", ""):
                lines += textwrap.wrap(said, WIDTH, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated substrings of model names (case-insensitive)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgepack-bench",
                        help="wheels, extracted models and samples (default: ~/.cache/edgepack-bench)")
    parser.add_argument("--out", type=Path, help="keep each build's bundle and log here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the results to this JSON file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one build may take")
    args = parser.parse_args()
    wanted = [part.strip().lower() for part in (args.models or "").split(",") if part.strip()]
    cases = [case for case in CASES if not wanted or any(part in case.name.lower() for part in wanted)]
    if not cases:
        parser.error(f"--models {args.models!r} matches none of: {', '.join(case.name for case in CASES)}")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="edgepack-real-") as temporary:
        out = (args.out or Path(temporary)).resolve()
        rows = []
        for case in cases:
            print(f"building {case.name} ...", file=sys.stderr, flush=True)
            rows.append(run_build(case, args.cache.expanduser().resolve(), out, args.timeout))
    import onnxruntime

    print(f"edgepack build with its defaults, {stamp}, onnxruntime {onnxruntime.__version__}")
    print("wall: child process start to exit. * chosen. speed: verdict, geometric mean")
    print("of the per-round p50 ratios to fp32 (95% interval). Then the gated figures.")
    print(render(rows))
    if args.json_path:
        args.json_path.write_text(json.dumps({"date": stamp, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
