"""``--arch`` bundles: real platform wheels from PyPI, run by a Python that has neither numpy nor
onnxruntime, and an aarch64 bundle answering under qemu-user.

The wheels are downloaded once into edgepack's cache (``$EDGEPACK_CACHE``, default
``~/.cache/edgepack``); without network and without a filled cache these tests skip and say so.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from arm64_base import arm64_rootfs
from edgepack.errors import InputError, IntegrityError, UnsupportedHere
from edgepack.package.wheels import WheelFetchError, WheelsUnavailable, cache_root, fetch_wheels, request_for
from edgepack.pipeline import build
from edgepack.runtime import deps
from edgepack.runtime.bundle import extract_archive
from edgepack.runtime.session import create_session
from edgepack.spec import BuildSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HERE_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
EM_AARCH64 = 183


def _build(out: Path, **fields) -> Path:
    spec = BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy", out=out,
                     quantize="none", bench_time_s=0.2, **fields)
    try:
        return build(spec).bundle
    except WheelFetchError as err:  # no network and no cache: nothing here can be tested
        pytest.skip(f"cannot fetch wheels: {err.one_line()}")


@pytest.fixture(scope="module")
def x86_bundle(tmp_path_factory) -> Path:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("runs x86_64 wheels: needs an x86_64 Linux host")
    return _build(tmp_path_factory.mktemp("x86"), target="edge", arch="x86_64", python_version=HERE_PYTHON)


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("arm"), target="edge-arm64-4c-4gb", arch="aarch64")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv of this Python without pip: no numpy, no onnxruntime, nothing from this environment."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import numpy"], capture_output=True, text=True, timeout=60)
    assert "No module named 'numpy'" in probe.stderr
    return python


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _reference(root: Path, rows: np.ndarray) -> list[np.ndarray]:
    session, _ = create_session(root / "model.onnx")
    return session.run(None, {session.get_inputs()[0].name: rows})


def test_x86_64_bundle_runs_on_a_python_without_numpy_or_onnxruntime(x86_bundle, bare_python, tmp_path):
    root = extract_archive(x86_bundle, tmp_path)
    manifest = _manifest(root)
    assert root.name.endswith(f"-cp{HERE_PYTHON.replace('.', '')}-x86_64")
    env = {**os.environ, "PYTHON": str(bare_python)}
    bench = subprocess.run(["./run", "bench", "--min-time", "0.2"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert report["runs"] > 0 and report["p50_ms"] > 0
    # numpy and onnxruntime came from the bundle's wheels, unpacked beside it.
    assert report["environment"]["onnxruntime"] == manifest["wheels"]["versions"]["onnxruntime"]
    assert report["environment"]["numpy"] == manifest["wheels"]["versions"]["numpy"]
    assert (root / ".deps" / f"cp{HERE_PYTHON.replace('.', '')}-x86_64" / "onnxruntime").is_dir()

    rows = np.load(EXAMPLES / "digits_sample.npy")[:64]
    np.save(tmp_path / "rows.npy", rows)
    predicted = subprocess.run(["./run", "predict", str(tmp_path / "rows.npy")], cwd=root, env=env,
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    answers = json.loads(predicted.stdout)
    labels, probabilities = _reference(root, rows)
    assert answers["label"] == labels.tolist()
    np.testing.assert_allclose(np.array(answers["probabilities"]), probabilities, rtol=1e-5, atol=1e-5)
    # The unpacked wheels are derived files: verification still passes with them there.
    verified = subprocess.run(["./run", "verify"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stderr


def test_wheel_bundle_lists_its_wheels_and_builds_byte_identical(x86_bundle, tmp_path):
    again = _build(tmp_path, target="edge", arch="x86_64", python_version=HERE_PYTHON)
    assert again.name == x86_bundle.name
    assert again.read_bytes() == x86_bundle.read_bytes()
    root = extract_archive(again, tmp_path / "unpacked")
    manifest = _manifest(root)
    wheels = manifest["wheels"]
    assert wheels["arch"] == "x86_64" and wheels["python"] == HERE_PYTHON
    assert wheels["platforms"] == ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert sorted(wheels["versions"]) == ["numpy", "onnxruntime"]
    assert wheels["versions"]["onnxruntime"].startswith("1.17.")  # edge-1core's [onnxruntime] version
    assert wheels["versions"]["numpy"].startswith("1.")  # onnxruntime before 1.19 needs numpy 1.x
    listed = {entry["path"] for entry in manifest["files"]}
    sums = {line.split("  ", 1)[1] for line in (root / "SHA256SUMS").read_text().splitlines()}
    assert set(wheels["files"]) <= listed and set(wheels["files"]) <= sums
    assert sorted(p.name for p in (root / "wheels").iterdir()) == [f.split("/", 1)[1] for f in wheels["files"]]


def test_aarch64_bundle_carries_aarch64_wheels(arm_bundle):
    with tarfile.open(arm_bundle) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if m.isfile()}
        manifest = json.load(archive.extractfile(members["manifest.json"]))
        wheels = {name: archive.extractfile(m).read() for name, m in members.items() if name.startswith("wheels/")}
    assert manifest["wheels"]["arch"] == "aarch64" and manifest["wheels"]["python"] == "3.11"
    assert manifest["wheels"]["versions"]["onnxruntime"].startswith("1.16.")  # the profile's version
    assert sorted(name.split("/")[1].split("-")[0] for name in wheels) == ["numpy", "onnxruntime"]
    machines = set()
    for name, data in wheels.items():
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
            tags = [line.split(": ", 1)[1] for line in wheel.read(meta).decode().splitlines()
                    if line.startswith("Tag: ")]
            assert tags and all(tag.startswith("cp311-cp311-") and tag.endswith("_aarch64") for tag in tags), tags
            if name.startswith("wheels/onnxruntime-"):
                so = next(n for n in wheel.namelist() if "onnxruntime_pybind11_state" in n and n.endswith(".so"))
                machines.add(_elf_machine(wheel.read(so)[:64]))
    assert machines == {EM_AARCH64}


def _elf_machine(header: bytes) -> int:
    assert header[:4] == b"\x7fELF", "not an ELF file"
    assert header[4] == 2 and header[5] == 1, "not a 64-bit little-endian ELF"
    return struct.unpack_from("<H", header, 18)[0]  # e_machine


def test_arch_must_match_the_profile(tmp_path):
    with pytest.raises(InputError, match="--arch aarch64 does not match profile edge-1core, which is x86_64"):
        _build(tmp_path, target="edge", arch="aarch64")
    with pytest.raises(InputError, match="--python-version chooses the wheels of an --arch bundle"):
        BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy", python_version="3.11")
    with pytest.raises(InputError, match="is not an architecture"):
        BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy", arch="riscv64")


def test_missing_onnxruntime_wheels_name_what_to_change(tmp_path):
    from edgepack.bench.profiles import load_profile_file

    path = tmp_path / "old-pi.toml"
    path.write_text('name = "old-pi"\ndescription = "x"\nkind = "edge"\narch = "aarch64"\npython = "3.13"\n'
                    '[onnxruntime]\nversion = "1.16"\n')
    profile = load_profile_file(path)
    try:
        fetch_wheels(request_for(profile, "aarch64", None))
    except WheelFetchError as err:
        pytest.skip(f"cannot reach the package index: {err.one_line()}")
    except WheelsUnavailable as err:
        assert "onnxruntime 1.16 has no wheels for CPython 3.13 on aarch64" in err.message
        assert str(path) in err.hint and "[onnxruntime] version" in err.hint
    else:
        pytest.fail("onnxruntime 1.16 has no CPython 3.13 wheels, yet the fetch succeeded")


def test_cached_wheels_need_no_network_and_bad_ones_are_replaced(x86_bundle, tmp_path, monkeypatch):
    profile_request = request_for(_profile("edge"), "x86_64", HERE_PYTHON)
    folder = f"{profile_request.python_tag}-x86_64"
    shutil.copytree(cache_root() / "wheels" / folder, tmp_path / "cache" / "wheels" / folder)
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    cached = fetch_wheels(profile_request)
    assert cached.from_cache
    # A truncated wheel in the cache is noticed and fetched again, the same file as pinned.
    # The pinned numpy, not any numpy: the cache folder may hold other files too.
    victim = tmp_path / "cache" / "wheels" / folder / next(name for name in cached.wheels if name.startswith("numpy-"))
    victim.write_bytes(victim.read_bytes()[:1000])
    try:
        again = fetch_wheels(profile_request)
    except WheelFetchError as err:
        pytest.skip(f"cannot reach the package index: {err.one_line()}")
    assert not again.from_cache and again.wheels == cached.wheels
    # Without network and without the cache: one line saying what to do.
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WheelFetchError, match="could not reach the package index") as caught:
        fetch_wheels(profile_request)
    assert "drop --arch" in caught.value.hint and "\n" not in caught.value.one_line()


def _profile(name: str):
    from edgepack.bench.profiles import resolve_profile

    return resolve_profile(name)


def _zip(path: Path, name: str, data: bytes = b"x", mode: int = 0o100644) -> Path:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, data)
    return path


@pytest.mark.parametrize("name, mode", [
    ("../escape.py", 0o100644),
    ("/etc/evil.py", 0o100644),
    ("pkg/../../escape.py", 0o100644),
    ("pkg/link", 0o120777),
])
def test_unsafe_wheel_members_are_refused(tmp_path, name, mode):
    wheel = _zip(tmp_path / "bad-1.0-py3-none-any.whl", name, b"/etc/passwd" if mode == 0o120777 else b"x", mode)
    with pytest.raises(IntegrityError, match="link or has an unsafe path"):
        deps._unzip_all([wheel], tmp_path / "out", "stamp")
    assert not (tmp_path / "escape.py").exists()


def test_wheels_for_another_python_are_refused_with_a_hint(tmp_path):
    other = "3.9" if HERE_PYTHON != "3.9" else "3.10"
    with pytest.raises(UnsupportedHere, match=f"wheels are for CPython {other}") as caught:
        deps._check_platform({"python": other, "arch": "x86_64"}, tmp_path)
    assert "pip install numpy onnxruntime here" in caught.value.hint


def test_read_only_bundle_unpacks_into_a_temporary_folder(x86_bundle):
    """A bundle folder the user cannot write: the wheels go to a temporary folder for the run."""
    python = Path("/usr/bin/python3")
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the bundle as another user")
    probe = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[:2]); import numpy"],
                           capture_output=True, text=True, timeout=60) if python.exists() else None
    if probe is None or f"({HERE_PYTHON.replace('.', ', ')})" not in probe.stdout or probe.returncode == 0:
        pytest.skip(f"needs {python}, CPython {HERE_PYTHON} without numpy, that another user can run")
    shared = Path(tempfile.mkdtemp(prefix="edgepack-ro-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        root = extract_archive(x86_bundle, shared)  # owned by root: read-only for nobody
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-m",
                               "runtime", "bench", "--min-time", "0.1"], cwd=root, capture_output=True, text=True,
                              timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["runs"] > 0
        assert "cannot write .deps/" in done.stderr and "removed at exit" in done.stderr
        assert not (root / ".deps").exists()
        left = done.stderr.split("wheels into ", 1)[1].split(" ", 1)[0]
        assert not Path(left).exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --- aarch64 under qemu-user -----------------------------------------------------------------------

@pytest.mark.slow
def test_aarch64_bundle_answers_under_qemu(arm_bundle, tmp_path):
    rootfs = arm64_rootfs()
    root = extract_archive(arm_bundle, tmp_path)
    # -L: the guest's loader, libraries and /usr/lib/python3.11 come from the arm64 tree; no binfmt
    # registration or chroot is needed. Timings under emulation mean nothing and are discarded.
    qemu = ["qemu-aarch64-static", "-L", str(rootfs), str(rootfs / "usr" / "bin" / "python3"), "-m", "runtime"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    # --processes 1: without binfmt, the emulated Python cannot start more of itself.
    bench = subprocess.run([*qemu, "bench", "--processes", "1", "--min-time", "0.2", "--max-time", "2",
                            "--min-runs", "20", "--max-warmup", "0.5"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    manifest = _manifest(root)
    assert report["environment"]["machine"] == "aarch64"
    assert report["environment"]["onnxruntime"] == manifest["wheels"]["versions"]["onnxruntime"]
    assert report["runs"] > 0

    rows = np.load(EXAMPLES / "digits_sample.npy")
    np.save(tmp_path / "rows.npy", rows)
    predicted = subprocess.run([*qemu, "predict", str(tmp_path / "rows.npy")], cwd=root, env=env,
                               capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr
    answers = json.loads(predicted.stdout)
    labels, probabilities = _reference(root, rows)
    # Another CPU's kernels round differently; the answers must not.
    assert np.mean(np.array(answers["label"]) == labels) >= 0.99
    np.testing.assert_allclose(np.array(answers["probabilities"]), probabilities, atol=1e-4)
