"""``edgepack push`` to a real registry on 127.0.0.1 (Debian's docker-registry, the reference
``distribution`` server), checked with skopeo, and the pushed image pulled back as a base.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app
from edgepack.package.wheels import WheelFetchError, cache_root
from edgepack.pipeline import build
from edgepack.spec import BuildSpec
from oci_bases import make_base

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
pytestmark = pytest.mark.skipif(not (Path(REGISTRY).exists() and shutil.which("skopeo")),
                                reason="needs docker-registry and skopeo (apt-get install docker-registry skopeo)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A registry with filesystem storage in a temporary folder, on a free port; its host:port."""
    root = tmp_path_factory.mktemp("registry")
    port = _free_port()
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "wb")
    server = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer:
                assert answer.status == 200
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"docker-registry did not start: {(root / 'registry.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A single-platform and a two-platform image of the digits model."""
    root = tmp_path_factory.mktemp("images")
    built = {}
    for key, arches, platform in (("single", ("amd64",), "linux/amd64"),
                                  ("multi", ("amd64", "arm64"), "linux/amd64,linux/arm64")):
        base = make_base(root / f"base-{key}", architectures=arches)
        spec = BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy",
                         out=root / key, target="cloud", quantize="none", bench_time_s=0.2, base_image=(base,),
                         platform=platform)
        try:
            built[key] = build(spec).image
        except WheelFetchError as err:
            pytest.skip(f"cannot fetch wheels: {err.one_line()}")
    return built


def _skopeo_digest(reference: str, *flags: str) -> str:
    done = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *flags, f"docker://{reference}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["Digest"]


def _push(*args: str):
    return CliRunner().invoke(app, ["push", *args])


def test_push_layout_then_skopeo_sees_the_digest_and_a_second_push_uploads_nothing(registry, images):
    image = images["single"]
    result = _push(str(image.layout), f"{registry}/models/digits:{image.tag}", "--json")
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)
    assert pushed["digest"] == image.digest and pushed["uploaded"] == 5  # 4 layers and the config
    assert _skopeo_digest(f"{registry}/models/digits:{image.tag}") == image.digest
    again = json.loads(_push(str(image.layout), f"{registry}/models/digits:latest", "--json").stdout)
    assert (again["uploaded"], again["skipped"], again["digest"]) == (0, 5, image.digest)
    plain = _push(str(image.layout), f"{registry}/models/digits")  # the tag defaults to the image's
    assert plain.exit_code == 0 and plain.stdout.strip() == image.digest


def test_push_multi_platform_index(registry, images):
    image = images["multi"]
    result = _push(str(image.layout), f"{registry}/models/multi:v1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == image.digest
    assert _skopeo_digest(f"{registry}/models/multi:v1") == image.digest
    done = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--override-arch", "arm64",
                           f"docker://{registry}/models/multi:v1"], capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout)["Architecture"] == "arm64"


def test_push_docker_archive_and_with_skopeo(registry, images):
    image = images["single"]
    result = _push(str(image.archive), f"{registry}/models/fromtar:v1")
    assert result.exit_code == 0, result.output
    assert _skopeo_digest(f"{registry}/models/fromtar:v1") == result.stdout.strip()
    via = _push(str(image.layout), f"{registry}/models/viaskopeo:v1", "--with-skopeo")
    assert via.exit_code == 0, via.output
    assert via.stdout.strip() == image.digest == _skopeo_digest(f"{registry}/models/viaskopeo:v1")


def test_a_pushed_image_is_a_base_pulled_over_the_registry_api(registry, images, tmp_path, monkeypatch):
    image = images["multi"]
    assert _push(str(image.layout), f"{registry}/models/base:v1").exit_code == 0
    # A cache with the wheels and deps layers but no blobs: the base's layers must come from the registry.
    fresh = tmp_path / "cache"
    for folder in ("wheels", "layers"):
        if (cache_root() / folder).is_dir():
            shutil.copytree(cache_root() / folder, fresh / folder, copy_function=os.link)
    monkeypatch.setenv("EDGEPACK_CACHE", str(fresh))
    spec = BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy",
                     out=tmp_path / "dist", target="cloud", quantize="none", bench_time_s=0.2,
                     base_image=(f"{registry}/models/base:v1",), platform="linux/arm64")
    try:
        result = build(spec)
    except WheelFetchError as err:
        pytest.skip(f"cannot fetch wheels: {err.one_line()}")
    assert len(list((fresh / "blobs" / "blobs" / "sha256").iterdir())) >= 5  # pulled: 4 layers and a config
    report = result.image.platforms["linux/arm64"]
    assert report["base"]["digest"] == image.platforms["linux/arm64"]["digest"]
    # The new image's first layers are the pushed image's: base, deps, model, app, then its own three.
    assert [layer["digest"] for layer in report["layers"][:4]] == \
        [layer["digest"] for layer in image.platforms["linux/arm64"]["layers"]]
    assert len(report["layers"]) == 7


def test_push_errors_are_one_line(images, tmp_path):
    image = images["single"]
    free = _free_port()
    assert_one_line_error(_push(str(image.layout), f"127.0.0.1:{free}/models/x:v1", "--timeout", "5"), 8,
                          f"cannot reach the registry 127.0.0.1:{free}")
    assert_one_line_error(_push(str(tmp_path / "nothing.oci"), "127.0.0.1:5000/x:v1"), 3, "no such image")
    assert_one_line_error(_push(str(image.layout), "127.0.0.1:5000/Bad Name:v1"), 3, "is not an image reference")
