"""Cloud images written without an engine, checked by tools nobody here wrote: skopeo, umoci, and
Debian's python3 running the unpacked image's own numpy and onnxruntime as user 65532.

The bases are tiny layouts made in the test (tests/oci_bases.py); the dependency wheels come from
PyPI once into edgepack's cache (``$EDGEPACK_CACHE``, default ``~/.cache/edgepack``): without
network and without a filled cache these tests skip and say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgepack.package.wheels import WheelFetchError
from edgepack.pipeline import build
from edgepack.spec import BuildSpec
from oci_bases import make_base

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HERE_PYTHON = "/usr/bin/python3.11"  # Debian's: the image's deps are for CPython 3.11
pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="needs skopeo and umoci (apt-get install skopeo umoci)")


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, (command, done.stderr)
    return done


def _inspect(reference: str, *flags: str) -> dict:
    return json.loads(_run("skopeo", "inspect", *flags, reference).stdout)


def _build(out: Path, base: str | tuple[str, ...], model: Path = EXAMPLES / "digits_mlp.skops",
           sample: Path = EXAMPLES / "digits_sample.npy", **fields):
    bases = (base,) if isinstance(base, str) else base
    spec = BuildSpec(model=model, sample=sample, out=out, target="cloud", quantize="none", bench_time_s=0.2,
                     base_image=bases, **fields)
    try:
        return build(spec)
    except WheelFetchError as err:  # no network and no cache: nothing here can be tested
        pytest.skip(f"cannot fetch wheels: {err.one_line()}")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "amd64": make_base(root / "amd64"),
        "arm64": make_base(root / "arm64", architectures=("arm64",)),
        "both": make_base(root / "both", architectures=("amd64", "arm64")),
        "nopython": make_base(root / "nopython", python=None),
        "py312": make_base(root / "py312", python="3.12"),
    }


@pytest.fixture(scope="module")
def cloud(bases, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("cloud"), bases["amd64"])


@pytest.fixture(scope="module")
def unpacked(cloud, tmp_path_factory) -> Path:
    """The image's root filesystem, as umoci (an OCI runtime-bundle maker) lays it out."""
    bundle = tmp_path_factory.mktemp("unpack") / "bundle"
    _run("umoci", "unpack", "--image", f"{cloud.image.layout}:{cloud.image.tag}", str(bundle))
    return bundle / "rootfs"


def _bundle_file(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(f"/{name}"))
        return archive.extractfile(member).read()


def test_skopeo_reads_the_layout_and_its_config(cloud, bases):
    image = cloud.image
    index = json.loads((image.layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == image.tag
    assert json.loads((image.layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    inspected = _inspect(f"oci:{image.layout}:{image.tag}")
    assert inspected["Digest"] == image.digest
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    assert len(inspected["Layers"]) == 4  # base, deps, model, app
    assert [layer["role"] for layer in image.platforms["linux/amd64"]["layers"]] == ["base", "deps", "model", "app"]
    config = _inspect(f"oci:{image.layout}:{image.tag}", "--config")["config"]
    assert config["Entrypoint"] == ["python3", "-m", "runtime", "serve"] and "Cmd" not in config
    assert config["User"] == "65532:65532" and config["WorkingDir"] == "/app"
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    env = dict(entry.split("=", 1) for entry in config["Env"])
    assert env["PATH"].startswith("/usr/local/sbin") and env["PORT"] == "8080"
    assert env["PYTHONPATH"] == "/opt/edgepack/deps:/app" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    labels = config["Labels"]
    model_sha = hashlib.sha256(_bundle_file(cloud.bundle, "model.onnx")).hexdigest()
    assert labels["dev.edgepack.model.sha256"] == model_sha
    assert labels["org.opencontainers.image.version"] == cloud.manifest.version
    assert labels["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert labels["org.opencontainers.image.base.digest"] == _inspect(bases["amd64"])["Digest"]
    assert labels["base.label"] == "kept"
    assert labels["dev.edgepack.sbom.sha256"] == hashlib.sha256(image.sbom.read_bytes()).hexdigest()


def test_umoci_unpacks_the_model_deps_and_app_readable_by_the_image_user(cloud, unpacked):
    assert (unpacked / "app/model.onnx").read_bytes() == _bundle_file(cloud.bundle, "model.onnx")
    assert (unpacked / "opt/edgepack/deps/onnxruntime/__init__.py").is_file()
    assert (unpacked / "app/manifest.json").read_bytes() == _bundle_file(cloud.bundle, "manifest.json")
    assert (unpacked / "app/runtime/__main__.py").is_file() and (unpacked / "usr/bin/python3.11").is_file()
    for top in ("app", "opt/edgepack/deps"):
        for path in [unpacked / top, *(unpacked / top).rglob("*")]:
            mode = path.stat().st_mode
            # Owned by root: user 65532 reads through the "other" bits; folders must be enterable.
            assert mode & 0o004 and (not path.is_dir() or mode & 0o001), path
            assert not mode & 0o002, path  # nor writable by it


@pytest.mark.skipif(os.geteuid() != 0 or not Path(HERE_PYTHON).exists() or not shutil.which("setpriv"),
                    reason="runs Debian's python3.11 as user 65532: needs root, /usr/bin/python3.11 and setpriv")
def test_the_unpacked_image_predicts_as_user_65532_with_its_own_numpy_and_onnxruntime(cloud, unpacked):
    from edgepack.runtime.session import create_session

    os.chmod(unpacked.parent, 0o755)  # umoci keeps the bundle folder private to root
    for parent in unpacked.parents:
        if parent == Path(parent.anchor) or str(parent) == "/tmp":
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    env = {"PYTHONPATH": f"{unpacked}/opt/edgepack/deps:{unpacked}/app", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONNOUSERSITE": "1"}
    done = _run("setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups", "env", "-i",
                *[f"{k}={v}" for k, v in env.items()], HERE_PYTHON, "-c",
                "import numpy, onnxruntime, uvicorn, orjson, httptools, uvloop, h11, click, runtime;"
                "print(onnxruntime.__file__, onnxruntime.__version__)", cwd=unpacked / "app")
    assert done.stdout.startswith(f"{unpacked}/opt/edgepack/deps/onnxruntime/") and " 1.20." in done.stdout
    done = _run("setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups", "env", "-i",
                *[f"{k}={v}" for k, v in env.items()], HERE_PYTHON, "-m", "runtime", "predict", "bench_input.npz",
                cwd=unpacked / "app")
    with np.load(unpacked / "app/bench_input.npz") as rows:
        feed = dict(rows)
    session, _ = create_session(unpacked / "app/model.onnx")
    assert json.loads(done.stdout)["label"] == session.run(None, feed)[0].tolist()


def test_the_docker_archive_is_read_and_copied_by_skopeo(cloud, tmp_path):
    image = cloud.image
    inspected = _inspect(f"docker-archive:{image.archive}")
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux") and len(inspected["Layers"]) == 4
    assert inspected["Labels"]["dev.edgepack.model.sha256"]
    with tarfile.open(image.archive) as archive:
        (entry,) = json.loads(archive.extractfile("manifest.json").read())
    assert entry["RepoTags"] == [f"edgepack/{cloud.manifest.name}:{cloud.manifest.version}"] == [image.ref]
    _run("skopeo", "copy", f"docker-archive:{image.archive}", f"oci:{tmp_path / 'copy'}:again")
    assert _inspect(f"oci:{tmp_path / 'copy'}:again", "--config")["config"]["User"] == "65532:65532"
    _run("skopeo", "copy", f"oci:{image.layout}:{image.tag}", f"docker-archive:{tmp_path / 'out.tar'}:x/y:z")
    assert len(_inspect(f"docker-archive:{tmp_path / 'out.tar'}")["Layers"]) == 4


def test_the_sbom_is_valid_cyclonedx_and_lists_every_installed_package(cloud, unpacked):
    sbom = json.loads(cloud.image.sbom.read_text())
    assert (sbom["bomFormat"], sbom["specVersion"]) == ("CycloneDX", "1.5")
    libraries = {(c["name"], c["version"]) for c in sbom["components"] if c["type"] == "library"}
    installed = {tuple(p.name.removesuffix(".dist-info").rsplit("-", 1))
                 for p in (unpacked / "opt/edgepack/deps").glob("*.dist-info")}
    assert libraries == {(name.lower().replace("_", "-"), version) for name, version in installed}
    assert {"numpy", "onnxruntime", "uvicorn", "httptools", "uvloop", "orjson", "h11", "click"} <= {n for n, _ in libraries}
    for component in sbom["components"]:
        assert component["hashes"][0]["alg"] == "SHA-256" and len(component["hashes"][0]["content"]) == 64
        if component["type"] == "library":
            assert component["purl"].startswith(f"pkg:pypi/{component['name']}@{component['version']}")
    validation = pytest.importorskip("cyclonedx.validation.json", reason="pip install 'cyclonedx-python-lib[json-validation]'")
    from cyclonedx.schema import SchemaVersion

    assert validation.JsonStrictValidator(SchemaVersion.V1_5).validate_str(cloud.image.sbom.read_text()) is None


def test_dockerfile_and_context_describe_the_same_image(cloud):
    image = cloud.image
    text = image.dockerfile.read_text()
    assert "ENTRYPOINT [\"python3\", \"-m\", \"runtime\", \"serve\"]" in text and "USER 65532:65532" in text
    assert "COPY --chown=0:0 deps-${TARGETARCH}/ /opt/edgepack/deps/" in text
    assert (image.context / "model.onnx").read_bytes() == _bundle_file(cloud.bundle, "model.onnx")
    assert (image.context / "deps-amd64/onnxruntime/__init__.py").is_file()
    assert (image.context / "app/runtime/__main__.py").is_file() and not (image.context / "app/model.onnx").exists()
