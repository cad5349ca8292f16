"""The arm64 cloud image, end to end on this x86_64 host: built by edgepack on a real arm64 Python base, run by
podman under qemu-user, asked over HTTP; it must answer KServe v2 infer requests like onnxruntime here.

binfmt_misc is not mounted on this host (and registering an interpreter there is host-wide state a test must not
touch), so the kernel cannot start an aarch64 binary by itself. The test runs a copy of edgepack's image with one
layer more: the host's static ``qemu-aarch64-static`` at /usr/bin, made the entrypoint in front of the image's own
``python3 -m runtime serve``; user, environment and working folder stay the image's. qemu then emulates exactly
one process: anything the server started (a subprocess, a shell) would be an aarch64 binary that nothing can run,
so the test also checks that the container holds that one process. Timings under emulation mean nothing and are
not looked at.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from arm64_base import arm64_python_layout
from containers import http_get, podman, podman_run_detached, podman_setup, skopeo
from edgepack.cli import app
from edgepack.package.image_config import ENTRYPOINT as IMAGE_ENTRYPOINT
from edgepack.package.oci import OCI_MANIFEST, REF_NAME, Blob, BlobStore, LayerEntries, write_layer, write_layout
from v2_checks import assert_infer_like_onnxruntime

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QEMU_IN_IMAGE = "/usr/bin/qemu-aarch64-static"
# The image's entrypoint is `python3 ...`, found on PATH; qemu-user opens its program by path, so it gets the
# interpreter's full path.
ENTRYPOINT = [QEMU_IN_IMAGE, "/usr/bin/python3", *IMAGE_ENTRYPOINT[1:]]
# Under emulation every instruction is translated: checking the bundle, starting the server, loading numpy and
# onnxruntime and warming the model up take about 15 s on this 2-core machine; the bound leaves room for a busy,
# shared one.
READY_TIMEOUT_S = 600
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qemu() -> Path:
    found = shutil.which("qemu-aarch64-static")
    if not found:
        pytest.skip("qemu-aarch64-static not installed (apt-get install qemu-user-static)")
    return Path(found)


@pytest.fixture(scope="module")
def arm64_build(qemu, tmp_path_factory) -> dict:
    podman_setup()  # skips before the build when podman cannot run here
    layout, tag = arm64_python_layout()
    out = tmp_path_factory.mktemp("cloud-arm64")
    result = CliRunner().invoke(app, [
        "build", str(EXAMPLES / "digits_mlp.skops"), "--sample", str(EXAMPLES / "digits_sample.npy"),
        "--target", "cloud", "--platform", "linux/arm64", "--base-image", f"oci:{layout}:{tag}", "--out", str(out),
        "--bench-time", "0.2", "--quiet", "--json"])
    if result.exit_code != 0 and "package index" in result.stderr:  # no network and no cached aarch64 wheels
        pytest.skip(f"cannot fetch wheels: {result.stderr.strip()}")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _with_qemu_entrypoint(layout: Path, tag: str, qemu: Path, out: Path) -> Path:
    """A copy of the image tagged ``tag`` in ``layout`` with qemu added and put in front of its entrypoint."""
    source = BlobStore(layout, create=False)
    top = next(d for d in json.loads((layout / "index.json").read_text())["manifests"]
               if d.get("annotations", {}).get(REF_NAME) == tag)
    assert top["mediaType"] == OCI_MANIFEST, "one platform was asked for: one manifest, not an index"
    manifest = source.read_json(top["digest"])
    config = copy.deepcopy(source.read_json(manifest["config"]["digest"]))
    assert config["config"]["Entrypoint"] == IMAGE_ENTRYPOINT, config["config"]["Entrypoint"]

    target = BlobStore(out)
    for descriptor in manifest["layers"]:
        target.put_file(source.path(descriptor["digest"]),
                        Blob(descriptor["digest"], descriptor["size"], descriptor["mediaType"]))
    entries = LayerEntries()
    entries.add(QEMU_IN_IMAGE, qemu, 0o755)  # world-executable: the image runs as user 65532
    layer_file = out / "qemu.layer"
    qemu_layer = write_layer(entries, layer_file, 0)
    target.put_file(layer_file, qemu_layer)
    layer_file.unlink()

    config["config"]["Entrypoint"] = ENTRYPOINT
    config["rootfs"]["diff_ids"].append(qemu_layer.diff_id)
    if "history" in config:  # it pairs with the layers
        config["history"].append({"created_by": f"test: COPY qemu-aarch64-static {QEMU_IN_IMAGE}; "
                                                f"ENTRYPOINT {json.dumps(ENTRYPOINT)}"})
    config_blob = target.put_json(config, manifest["config"]["mediaType"])
    derived = {**manifest, "config": config_blob.descriptor(), "layers": [*manifest["layers"], qemu_layer.descriptor()]}
    manifest_blob = target.put_json(derived, OCI_MANIFEST)
    write_layout(out, [manifest_blob.descriptor(platform=top["platform"], annotations={REF_NAME: tag})])
    return out


def _container_publishing(url: str) -> str:
    """The name of the running container whose port ``url`` is (podman_run_detached keeps it to itself)."""
    port = url.rsplit(":", 1)[1]
    listed = json.loads(podman("ps", "--format", "json", timeout_s=30).stdout or "[]")
    return next(entry["Names"][0] for entry in listed
                if any(str(mapping.get("host_port")) == port for mapping in entry.get("Ports") or []))


def _processes(container: str) -> list[list[str]]:
    """pid, user and command line of every process in ``container``, read from /proc by podman's own ps (podman
    top with these descriptors runs nothing inside the container, which could not run an x86_64 ps anyway)."""
    rows = podman("top", container, "pid", "user", "args", timeout_s=30).stdout.strip().splitlines()[1:]
    return [row.split(None, 2) for row in rows]


def test_arm64_image_answers_under_qemu_like_onnxruntime_here(arm64_build, qemu, podman_env, tmp_path):
    image = arm64_build["image"]
    assert list(image["platforms"]) == ["linux/arm64"] and image["archive_platform"] == "linux/arm64"
    assert image["platforms"]["linux/arm64"]["python"] == "3.11"
    layout = _with_qemu_entrypoint(Path(image["layout"]), image["tag"], qemu, tmp_path / "under-qemu")
    # What podman will run, read by a tool nobody here wrote: still arm64, still the image's user and folder.
    config = json.loads(skopeo("inspect", "--config", f"oci:{layout}:{image['tag']}", timeout_s=120).stdout)
    assert (config["architecture"], config.get("variant")) == ("arm64", "v8")
    assert config["config"]["Entrypoint"] == ENTRYPOINT
    assert (config["config"]["User"], config["config"]["WorkingDir"]) == ("65532:65532", "/app")

    rows = np.load(EXAMPLES / "digits_sample.npy").astype(np.float32)
    name = arm64_build["name"]

    # No run option touches /sys: onnxruntime's cpuinfo reads /sys/devices/system/cpu/{possible,present} at import,
    # and runc's read-only /sys shows them (masking that folder made onnxruntime abort and qemu hang).
    with podman_run_detached(layout, ready_path="/v2/health/ready", ready_status=200, ready_timeout_s=READY_TIMEOUT_S,
                             timeout_s=READY_TIMEOUT_S + 300) as url:
        status, listed = http_get(url + "/v2/models", timeout_s=60)
        assert status == 200 and [m["name"] for m in json.loads(listed)["models"]] == [name]
        # Another CPU's kernels (NEON, not AVX) round differently; the answers must not.
        assert_infer_like_onnxruntime(url, name, Path(arm64_build["bundle"]), rows, tmp_path, rtol=0, atol=1e-4,
                                      timeout_s=120)

        processes = _processes(_container_publishing(url))
        # One process, qemu running the image's Python as the image's user: nothing was started beside it.
        assert len(processes) == 1, processes
        _, user, args = processes[0]
        assert user == "65532" and args.split() == ENTRYPOINT, processes
