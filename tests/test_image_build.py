"""Cloud images: multi-platform indexes, reproducible digests, and one-line errors for bad inputs.

Checked with skopeo and umoci; the bases are tiny layouts made here (tests/oci_bases.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app
from edgepack.errors import UnsupportedHere
from edgepack.package.builders import PodmanBuilder
from edgepack.package.wheels import WheelFetchError, cache_root
from edgepack.pipeline import build
from edgepack.spec import BuildSpec
from oci_bases import make_base

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EM_X86_64, EM_AARCH64 = 62, 183
MODEL, SAMPLE = EXAMPLES / "digits_mlp.skops", EXAMPLES / "digits_sample.npy"
pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="needs skopeo and umoci (apt-get install skopeo umoci)")


def _run(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stderr)
    return done


def _build(out: Path, *bases: str, model: Path = MODEL, sample: Path = SAMPLE, **fields):
    spec = BuildSpec(model=model, sample=sample, out=out, target="cloud", quantize="none", bench_time_s=0.2,
                     base_image=bases, **fields)
    try:
        return build(spec)
    except WheelFetchError as err:
        pytest.skip(f"cannot fetch wheels: {err.one_line()}")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {"amd64": make_base(root / "amd64"), "arm64": make_base(root / "arm64", architectures=("arm64",)),
            "both": make_base(root / "both", architectures=("amd64", "arm64")),
            "nopython": make_base(root / "nopython", python=None), "py312": make_base(root / "py312", python="3.12")}


def _elf_machines(folder: Path) -> set[int]:
    machines = set()
    for path in folder.rglob("*.so"):
        header = path.read_bytes()[:20]
        if header[:4] == b"\x7fELF":
            machines.add(struct.unpack("<H", header[18:20])[0])
    return machines


def test_multi_platform_index_has_one_manifest_per_platform_with_its_own_wheels(bases, tmp_path):
    out = tmp_path / "dist"
    runner = CliRunner()
    result = runner.invoke(app, ["build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud", "--quantize", "none",
                                 "--bench-time", "0.2", "--base-image", bases["both"], "--platform",
                                 "linux/amd64,linux/arm64", "--out", str(out), "--json", "--quiet"])
    if result.exit_code != 0 and "wheels" in result.stderr:
        pytest.skip(f"cannot fetch wheels: {result.stderr}")
    assert result.exit_code == 0, result.output
    image = json.loads(result.stdout)["image"]
    assert image["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert set(image["platforms"]) == {"linux/amd64", "linux/arm64"} and image["archive_platform"] == "linux/amd64"
    layout, tag = image["layout"], image["tag"]
    raw = json.loads(_run("skopeo", "inspect", "--raw", f"oci:{layout}:{tag}").stdout)
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
    for arch, machine in (("amd64", EM_X86_64), ("arm64", EM_AARCH64)):
        inspected = json.loads(_run("skopeo", "inspect", "--override-arch", arch, f"oci:{layout}:{tag}").stdout)
        assert inspected["Architecture"] == arch and len(inspected["Layers"]) == 4
        assert inspected["Digest"] == image["digest"]  # skopeo names the index it was given
        # One platform's image on its own, unpacked by umoci: its deps are that architecture's.
        single = tmp_path / f"single-{arch}"
        _run("skopeo", "copy", "--override-arch", arch, f"oci:{layout}:{tag}", f"oci:{single}:{arch}")
        _run("umoci", "unpack", "--image", f"{single}:{arch}", str(tmp_path / f"unpack-{arch}"))
        deps = tmp_path / f"unpack-{arch}/rootfs/opt/edgepack/deps"
        assert _elf_machines(deps / "onnxruntime") == {machine}
    amd, arm = (image["platforms"][p]["layers"] for p in ("linux/amd64", "linux/arm64"))
    assert amd[1]["digest"] != arm[1]["digest"]  # deps differ by architecture
    assert amd[2:] == arm[2:]  # the model and app layers are the same bytes
    archived = json.loads(_run("skopeo", "inspect", f"docker-archive:{image['archive']}").stdout)
    assert archived["Architecture"] == "amd64"


def test_one_base_per_platform_makes_an_index_too(bases, tmp_path):
    result = _build(tmp_path / "dist", bases["amd64"], bases["arm64"], platform="linux/arm64,linux/amd64")
    assert set(result.image.platforms) == {"linux/amd64", "linux/arm64"}
    arm = json.loads(_run("skopeo", "inspect", "--override-arch", "arm64",
                          f"oci:{result.image.layout}:{result.image.tag}").stdout)
    assert arm["Architecture"] == "arm64"


def test_same_inputs_same_digest_and_a_new_model_changes_only_model_and_app(bases, data_dir, tmp_path, monkeypatch):
    first = _build(tmp_path / "one", bases["amd64"])
    # The second build makes its dependency layer afresh (an empty layer cache, the same locked wheels):
    # pip install --target and the layer writer must give the same bytes again, even with this Python found at
    # another path, which pip writes into the console scripts' shebangs.
    fresh = tmp_path / "cache"
    shutil.copytree(cache_root() / "wheels", fresh / "wheels", copy_function=os.link)
    monkeypatch.setenv("EDGEPACK_CACHE", str(fresh))
    elsewhere = tmp_path / "elsewhere" / "bin" / "python3"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(elsewhere))
    second = _build(tmp_path / "two", bases["amd64"])
    assert list((fresh / "layers").glob("deps-*.tar.gz")), "the second build did not make its own deps layer"
    assert second.image.digest == first.image.digest
    assert (tmp_path / "one" / first.image.archive.name).read_bytes() == second.image.archive.read_bytes()
    assert first.image.sbom.read_bytes() == second.image.sbom.read_bytes()
    other = _build(tmp_path / "three", bases["amd64"], model=data_dir / "classifier.skops",
                   sample=data_dir / "sample.npy")
    old, new = (r.image.platforms["linux/amd64"]["layers"] for r in (first, other))
    assert [layer["role"] for layer in new] == ["base", "deps", "model", "app"]
    assert old[0]["digest"] == new[0]["digest"] and old[1]["digest"] == new[1]["digest"]
    assert old[2]["digest"] != new[2]["digest"] and old[3]["digest"] != new[3]["digest"]
    assert other.image.digest != first.image.digest


_DEPS_LAYER = """
import sys
from edgepack.bench.profiles import resolve_profile
from edgepack.package.image_deps import deps_layer
from edgepack.package.wheels import WheelRequest

request = WheelRequest(arch="x86_64", python="3.11", onnxruntime=resolve_profile("cloud").onnxruntime.version,
                       serve=True)
print(deps_layer(request)[1].digest)
"""


def test_the_deps_layer_is_the_same_whichever_python_name_starts_edgepack(tmp_path):
    # pip writes console scripts whose shebang names the Python running it (python, python3, a venv's);
    # their lines in RECORD once made the layer's bytes depend on it.
    link = tmp_path / "bin" / "python-by-another-name"
    link.parent.mkdir()
    link.symlink_to(sys.executable)
    digests = []
    for python in (sys.executable, str(link)):
        cache = tmp_path / f"cache-{len(digests)}"
        shutil.copytree(cache_root() / "wheels", cache / "wheels", copy_function=os.link)
        done = subprocess.run([python, "-c", _DEPS_LAYER], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "EDGEPACK_CACHE": str(cache),
                                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        if done.returncode != 0 and "WheelFetchError" in done.stderr:
            pytest.skip(f"cannot fetch wheels: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1] and digests[0].startswith("sha256:")


def test_max_image_mb_fails_before_anything_is_written(bases, tmp_path):
    out = tmp_path / "dist"
    result = CliRunner().invoke(app, ["build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud", "--quantize",
                                      "none", "--bench-time", "0.2", "--base-image", bases["amd64"], "--max-image-mb",
                                      "5", "--out", str(out), "--quiet"])
    assert_one_line_error(result, 6, "exceeds the budget of 5 MB")
    assert "deps layer" in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("case, code, message", [
    ("missing", 3, "is not an OCI image layout"),
    ("nopython", 3, "has no python3.X in /usr/bin or /usr/local/bin"),
    ("py312", 3, "has Python 3.12, not 3.11"),
    ("platform", 3, "'linux/s390x' is not a platform"),
    ("no-arm64", 3, "provides linux/amd64, not linux/arm64"),
    ("registry", 8, "cannot reach the registry 127.0.0.1:9"),
    ("docker", 8, "--builder docker cannot run here"),
    ("no-image", 3, "--no-image is given"),
    ("edge", 3, "describe a container image, and this build writes none (target edge-1core, kind edge)"),
])
def test_bad_image_inputs_are_one_line_errors(bases, tmp_path, case, code, message):
    args = {
        "missing": ["--base-image", f"oci:{tmp_path}/nothing:tag"],
        "nopython": ["--base-image", bases["nopython"]],
        "py312": ["--base-image", bases["py312"], "--python-version", "3.11"],
        "platform": ["--base-image", bases["amd64"], "--platform", "linux/s390x"],
        "no-arm64": ["--base-image", bases["amd64"], "--platform", "linux/amd64,linux/arm64"],
        "registry": ["--base-image", "127.0.0.1:9/library/python:3.11-slim"],
        "docker": ["--base-image", bases["amd64"], "--builder", "docker"],
        "no-image": ["--base-image", bases["amd64"], "--no-image"],
        "edge": ["--base-image", bases["amd64"], "--target", "edge-1core"],
    }[case]
    if case == "docker" and os.path.exists("/var/run/docker.sock"):
        pytest.skip("a Docker engine is reachable here")
    result = CliRunner().invoke(app, ["build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud",
                                      "--out", str(tmp_path / "dist"), "--quiet", *args])
    assert_one_line_error(result, code, message, case)
    if case == "registry":
        assert "--base-image oci:PATH" in result.stderr


def test_podman_builder_says_whether_it_can_run_here():
    try:
        PodmanBuilder().check([])
    except UnsupportedHere as err:
        assert err.message.startswith("--builder podman cannot run here")
        assert "--builder native" in (err.hint or "")
    else:
        assert shutil.which("podman")  # it can: podman is installed and `podman info` answers
