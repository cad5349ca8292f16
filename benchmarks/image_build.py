"""How long the cloud image of examples/digits_mlp.skops takes to build, how large it is, and whether
it is reproducible.

The bundle is built once (conversion and benchmarks are not what is measured here); then the image
stage (read the base, make or reuse the dependency layer, write the layout, docker-archive tar,
Dockerfile, context and SBOM) is timed with an empty cache (cold: wheels from PyPI, pip install,
layer compression) and with the cache that left (warm). Prints per-layer sizes next to the base,
whether the cold and warm images have the same digest, and which layers a model change touches
(examples/digits_mlp3x1024.skops instead), against the targets: app + model layers within the model
size + 1 MB, only model and app layers changed, warm rebuild within 5 s.

    python benchmarks/image_build.py [--base-image oci:PATH:TAG] [--platform linux/amd64] [--runs 3]

Without --base-image, a stand-in base (one layer with /usr/bin/python3.11) is made as in the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "tests"))

from edgepack.bench.profiles import resolve_profile  # noqa: E402
from edgepack.package.base_image import parse_platforms  # noqa: E402
from edgepack.package.image import ImageBuild, ImageRequest, ImageResult, bundle_files  # noqa: E402
from edgepack.pipeline import build  # noqa: E402
from edgepack.spec import BuildSpec  # noqa: E402


def _bundle(model: Path, out: Path) -> tuple[dict[str, bytes], object]:
    result = build(BuildSpec(model=model, sample=EXAMPLES / "digits_sample.npy", out=out, target="cloud",
                             image=False, quantize="none", bench_time_s=0.2))
    return bundle_files(result.bundle.read_bytes()), result.manifest


def _image(request: ImageRequest, files: dict[str, bytes], manifest, out: Path, cache: Path) -> tuple[float, ImageResult]:
    os.environ["EDGEPACK_CACHE"] = str(cache)
    start = time.perf_counter()
    image = ImageBuild(request, out)
    image.prepare()
    image.assemble(files, manifest.name, manifest.version, "benchmark")
    result = image.publish()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-image", help="oci:PATH[:TAG], docker-archive:PATH or REGISTRY/REPO:TAG")
    parser.add_argument("--platform", default="linux/amd64")
    parser.add_argument("--runs", type=int, default=3, help="warm rebuilds (the median is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepack-image-bench-") as temp:
        work = Path(temp)
        base = args.base_image
        if base is None:
            from oci_bases import make_base

            base = make_base(work / "base", architectures=tuple(p.architecture for p in parse_platforms(args.platform)))
        profile = resolve_profile("cloud")
        request = ImageRequest(bases=(base,), platforms=parse_platforms(args.platform),
                               onnxruntime=profile.onnxruntime.version)
        files, manifest = _bundle(EXAMPLES / "digits_mlp.skops", work / "bundle")
        model_mb = len(files["model.onnx"]) / 2**20
        cache = work / "cache"
        cold_s, cold = _image(request, files, manifest, work / "cold", cache)
        warm = [_image(request, files, manifest, work / f"warm{i}", cache) for i in range(args.runs)]
        warm_s = statistics.median(seconds for seconds, _ in warm)
        print(f"image build: cold {cold_s:.1f} s (empty cache: wheels from PyPI, pip install, layer), "
              f"warm {warm_s:.2f} s (median of {args.runs}: {', '.join(f'{s:.2f}' for s, _ in warm)})")
        same = all(result.digest == cold.digest for _, result in warm)
        print(f"digest: cold {cold.digest[:19]}…, warm {'the same' if same else 'DIFFERENT'} in all {args.runs} runs")
        for platform, report in cold.platforms.items():
            base_bytes = sum(layer["size_bytes"] for layer in report["layers"] if layer["role"] == "base")
            print(f"\n{platform}: {report['size_bytes'] / 2**20:.2f} MB compressed, "
                  f"{report['uncompressed_bytes'] / 2**20:.2f} MB unpacked; base {base_bytes / 2**20:.2f} MB, "
                  f"added {report['added_bytes'] / 2**20:.2f} MB")
            print(f"  {'layer':<6} {'digest':<14} {'compressed MB':>14} {'unpacked MB':>12}")
            for layer in report["layers"]:
                print(f"  {layer['role']:<6} {layer['digest'][7:19]:<14} {layer['size_bytes'] / 2**20:>14.2f} "
                      f"{layer['uncompressed_bytes'] / 2**20:>12.2f}")
        files2, manifest2 = _bundle(EXAMPLES / "digits_mlp3x1024.skops", work / "bundle2")
        changed_s, changed = _image(request, files2, manifest2, work / "changed", cache)
        first_platform = next(iter(cold.platforms))
        old, new = (r.platforms[first_platform]["layers"] for r in (cold, changed))
        touched = [a["role"] for a, b in zip(old, new) if a["digest"] != b["digest"]]
        print(f"\nmodel change (digits_mlp3x1024): rebuilt in {changed_s:.2f} s; layers changed: {', '.join(touched)}")
        app_model_mb = sum(layer["size_bytes"] for layer in old if layer["role"] in ("model", "app")) / 2**20
        checks = [
            (f"app + model layers {app_model_mb:.2f} MB <= model {model_mb:.2f} MB + 1 MB", app_model_mb <= model_mb + 1),
            (f"a model change touches only model and app layers ({', '.join(touched)})",
             set(touched) <= {"model", "app"}),
            (f"warm rebuild {warm_s:.2f} s <= 5 s", warm_s <= 5),
            ("cold and warm builds have the same digest", same),
        ]
        print()
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
