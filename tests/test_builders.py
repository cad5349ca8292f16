"""Engine builds: `edgepack build --builder podman` builds the Dockerfile it wrote in podman, and the engine's
image must serve like the native one and hold the same files and config.

The base is the debootstrap Python layout of tests/containers.py, reached through a path with a '.'-led folder
and capitals (as ~/.cache is): podman names a base read from oci:PATH after PATH, so such a path broke the build.
The build runs under umask 077, which once made the context's folders, and so the engine's /app, private.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import containers
from cli_checks import assert_one_line_error
from containers import podman, podman_run_detached, skopeo
from edgepack.cli import app
from edgepack.errors import ImageError
from edgepack.package.builders import EngineBuild, PodmanBuilder
from oci_bases import make_base
from v2_checks import assert_infer_like_onnxruntime

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL, SAMPLE = EXAMPLES / "digits_mlp.skops", EXAMPLES / "digits_sample.npy"
OUR_LAYERS = 3  # deps, model, app: on top of the base's
# The engine builds are named apart (--name): the store is shared, and test_cloud_run loads edgepack/digits_mlp.


@pytest.fixture(scope="module")
def engine_build(python_base_layout, tmp_path_factory):
    """One podman build for the module, its engine image removed at the end (and checked gone)."""
    layout, tag = python_base_layout
    out = tmp_path_factory.mktemp("engine")
    awkward = out / ".Bases" / "Python"  # neither is allowed in an image name
    awkward.parent.mkdir()
    awkward.symlink_to(layout)
    before = set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    # The private podman store and configuration, in os.environ while edgepack runs podman (podman_env's
    # variables; that fixture is per test, this build is per module). A private umask: the build context's
    # folders must get the native 0755 all the same, or user 65532 could not read /app.
    umask = os.umask(0o077)
    try:
        result = CliRunner().invoke(app, [
            "build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud", "--base-image", f"oci:{awkward}:{tag}",
            "--builder", "podman", "--name", "engine_podman", "--out", str(out / "dist"), "--bench-time", "0.2",
            "--quiet", "--json"],
            env=dict(containers.podman_setup().env))
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    image_id = built["image"]["engine_image"]
    try:
        built["names_before"] = before
        yield built
    finally:
        podman("untag", image_id, f"localhost/{built['image']['ref']}", check=False)
        podman("rmi", "--ignore", image_id, timeout_s=120, check=False)
    assert podman("image", "exists", image_id, check=False).returncode == 1, f"{image_id} was left in the store"


@pytest.mark.slow
def test_the_engine_image_answers_v2_infer_like_onnxruntime(engine_build, podman_env, tmp_path):
    image_id, name = engine_build["image"]["engine_image"], engine_build["name"]
    assert podman("image", "inspect", "--format", "{{.Id}}", image_id).stdout.strip() == image_id
    rows = np.load(SAMPLE)[:5].astype(np.float32)

    with podman_run_detached(image_id, ready_path="/v2/health/ready", ready_status=200) as url:
        assert_infer_like_onnxruntime(url, name, Path(engine_build["bundle"]), rows, tmp_path)


@pytest.mark.slow
def test_the_engine_image_has_the_native_config_and_annotations(engine_build, podman_env):
    image = engine_build["image"]
    native = json.loads(skopeo("inspect", "--config", f"oci:{image['layout']}:{image['tag']}").stdout)
    native_manifest = json.loads(skopeo("inspect", "--raw", f"oci:{image['layout']}:{image['tag']}").stdout)
    (engine,) = json.loads(podman("image", "inspect", image["engine_image"]).stdout)
    config = engine["Config"]
    assert config["Entrypoint"] == ["python3", "-m", "runtime", "serve"] == native["config"]["Entrypoint"]
    assert config["User"] == "65532:65532" == native["config"]["User"]
    assert "PORT=8080" in config["Env"] and config["Env"] == native["config"]["Env"]
    assert config["ExposedPorts"] == {"8080/tcp": {}} == native["config"]["ExposedPorts"]
    assert config == native["config"]  # labels and working folder too; no io.buildah.version, no Cmd
    assert engine["Created"] == native["created"] and engine["Architecture"] == native["architecture"]
    # podman records its own name of the base in the annotations, here the native ones instead.
    assert engine["Annotations"] == native_manifest["annotations"]
    # The base podman read through a link is not left named in the store.
    names = set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    assert not [name for name in names - engine_build["names_before"] if "edgepack-base-" in name]


@pytest.mark.slow
def test_the_engine_image_holds_the_native_files_layer_by_layer(engine_build, podman_env, tmp_path):
    """Each of our layers has the same entries in both: names, types, modes, owners, times and bytes.
    The tars differ in encoding (podman writes type bits into the mode field), so their digests differ."""
    image = engine_build["image"]
    native_layers = image["platforms"]["linux/amd64"]["layers"]
    (engine,) = json.loads(podman("image", "inspect", image["engine_image"]).stdout)
    diff_ids = engine["RootFS"]["Layers"]
    assert diff_ids[:-OUR_LAYERS] == [layer["diff_id"] for layer in native_layers[:-OUR_LAYERS]]  # the base, as is
    assert diff_ids[-OUR_LAYERS:] != [layer["diff_id"] for layer in native_layers[-OUR_LAYERS:]]  # other tars
    _assert_same_files(native_layers, Path(image["layout"]), image["engine_image"], tmp_path / "engine")


@pytest.mark.slow
def test_a_multi_platform_engine_build_gives_each_platform_its_native_config_and_files(podman_env, tmp_path):
    """A manifest list: per platform the native config (the base's digest label differs by platform, the
    base's PYTHONPATH is kept after ours) and the native files (that architecture's deps)."""
    base = make_base(tmp_path / "Both", architectures=("amd64", "arm64"), env=("PYTHONPATH=/base/lib",))
    result = CliRunner().invoke(app, [
        "build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud", "--base-image", base, "--platform",
        "linux/amd64,linux/arm64", "--name", "engine_multi", "--builder", "podman", "--out", str(tmp_path / "dist"),
        "--bench-time", "0.2", "--quiet", "--json"])
    if result.exit_code != 0 and "wheels" in result.stderr:
        pytest.skip(f"cannot fetch wheels: {result.stderr}")
    assert result.exit_code == 0, result.output
    image = json.loads(result.stdout)["image"]
    list_name = f"localhost/{image['engine_image']}"
    listed = json.loads(podman("manifest", "inspect", list_name).stdout)
    ids = {}
    for line in podman("images", "-a", "--digests", "--no-trunc", "--format", "{{.Digest}} {{.ID}}").stdout.splitlines():
        digest, image_id = line.split()
        ids.setdefault(digest, image_id.removeprefix("sha256:"))
    engines = {entry["platform"]["architecture"]: ids[entry["digest"]] for entry in listed["manifests"]}
    try:
        native_index = json.loads(skopeo("inspect", "--raw", f"oci:{image['layout']}:{image['tag']}").stdout)
        platforms = [sorted(json.dumps(entry["platform"], sort_keys=True) for entry in index["manifests"])
                     for index in (listed, native_index)]
        assert platforms[0] == platforms[1]  # arm64 with its variant, v8
        for arch, engine_id in engines.items():
            native = json.loads(skopeo("inspect", "--config", "--override-arch", arch,
                                       f"oci:{image['layout']}:{image['tag']}").stdout)
            (engine,) = json.loads(podman("image", "inspect", engine_id).stdout)
            assert engine["Architecture"] == arch and engine["Config"] == native["config"], arch
            assert "PYTHONPATH=/opt/edgepack/deps:/app:/base/lib" in engine["Config"]["Env"]
            _assert_same_files(image["platforms"][f"linux/{arch}"]["layers"], Path(image["layout"]), engine_id,
                               tmp_path / f"engine-{arch}")
    finally:
        podman("manifest", "rm", list_name, check=False)
        podman("rmi", "--ignore", *engines.values(), timeout_s=120, check=False)
        _remove_unnamed(_base_digests(tmp_path / "Both"))
    assert set(engines) == {"amd64", "arm64"}


def _base_digests(layout: Path) -> set[str]:
    index = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return {index, *(entry["digest"] for entry in json.loads(_blob(layout, index).read_text())["manifests"])}


def _remove_unnamed(digests: set[str]) -> None:
    """The base images podman read for the build, left without a name once their link's name was removed."""
    rows = podman("images", "-a", "--digests", "--no-trunc", "--format", "{{.ID}} {{.Digest}} {{.Repository}}")
    unnamed = [row.split()[0] for row in rows.stdout.splitlines()
               if row.split()[1] in digests and row.split()[2] == "<none>"]
    if unnamed:
        podman("rmi", "--ignore", *unnamed, timeout_s=120, check=False)


def _assert_same_files(native_layers: list[dict], layout: Path, engine_id: str, saved: Path) -> None:
    """Our layers (the last three) hold the same entries in the native layout and in the engine's image."""
    podman("save", "--quiet", "--format", "oci-dir", "-o", str(saved), engine_id, timeout_s=300)
    manifest = json.loads(_blob(saved, json.loads((saved / "index.json").read_text())["manifests"][0]["digest"])
                          .read_text())
    engine_layers = manifest["layers"]
    assert len(engine_layers) == len(native_layers)
    for native, built in zip(native_layers[-OUR_LAYERS:], engine_layers[-OUR_LAYERS:]):
        native_entries = _entries(_blob(layout, native["digest"]))
        assert native_entries and native_entries == _entries(_blob(saved, built["digest"])), native["role"]
    assert [layer["role"] for layer in native_layers[-OUR_LAYERS:]] == ["deps", "model", "app"]


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/", 1)


def _entries(layer: Path) -> dict[str, tuple]:
    """Path -> (type, permission bits, uid, gid, mtime, sha256 of the bytes, link target)."""
    with open(layer, "rb") as probe:
        zipped = probe.read(2) == b"\x1f\x8b"
    entries = {}
    with (gzip.open(layer, "rb") if zipped else open(layer, "rb")) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            data = archive.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            entries[member.name.removeprefix("./").rstrip("/")] = (
                member.type, member.mode & 0o7777, member.uid, member.gid, member.mtime,
                hashlib.sha256(data).hexdigest(), member.linkname)
    return entries


def test_builder_podman_without_podman_is_a_one_line_error_with_install_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["build", str(MODEL), "--sample", str(SAMPLE), "--target", "cloud",
                                      "--base-image", f"oci:{tmp_path}/base:3.11", "--builder", "podman",
                                      "--out", str(tmp_path / "dist"), "--quiet"])
    assert_one_line_error(result, 8, "--builder podman cannot run here: podman is not installed")
    assert "apt-get install podman" in result.stderr and "--builder native" in result.stderr
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_a_failing_podman_build_is_one_image_error_with_podman_last_line(podman_env, tmp_path):
    (tmp_path / "context").mkdir()
    dockerfile = tmp_path / "x-1.Dockerfile"
    dockerfile.write_text('ARG BASE=scratch\nFROM ${BASE}\nCOPY missing.txt /\n')
    request = EngineBuild(dockerfile=dockerfile, context=tmp_path / "context", tag="localhost/edgepack-test-fails:1",
                          platforms=("linux/amd64",), base_args={"BASE": f"oci:{tmp_path}/no-such-layout:1"},
                          annotations={}, timestamp=0)
    with pytest.raises(ImageError) as raised:
        PodmanBuilder().build(request)
    message, hint = raised.value.message, raised.value.hint or ""
    assert message.startswith("podman build failed: Error: ") and "\n" not in message
    log = tmp_path / "x-1.podman-build.log"
    assert str(log) in hint and message.removeprefix("podman build failed: ") in log.read_text()
    assert podman("image", "exists", request.tag, check=False).returncode == 1
