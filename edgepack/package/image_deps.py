"""The image's Python dependency layer: the runtime's and the server's packages at /opt/edgepack/deps.

The wheels come from ``wheels.fetch_wheels`` (pinned in a lock, cached), are installed on the build
host with ``pip install --target`` for the image's platform (nothing runs inside the image), and
packed into a deterministic layer. The finished layer is cached too, keyed by everything that
decides its bytes, so a rebuild after a model change reuses it untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepack.package.bundle import source_date_epoch
from edgepack.runtime.files import write_atomic
from edgepack.package.oci import OCI_LAYER_GZIP, Blob, LayerEntries, write_layer
from edgepack.package.wheels import WheelFetchError, WheelRequest, WheelSet, cache_root, fetch_wheels

DEPS_DIR = "/opt/edgepack/deps"
# Bump when the rules that turn wheels into the layer change, so old cached layers are not reused.
# 2: RECORD files no longer list the console scripts left out of the layer.
_LAYER_FORMAT = 2
_INSTALL_TIMEOUT_S = 600


def deps_layer(request: WheelRequest, reporter: Any = None, show_pip: bool = False
               ) -> tuple[Path, Blob, WheelSet]:
    """The dependency layer for ``request`` (a ``serve`` request): its file in the cache, blob and wheels."""
    wheels = fetch_wheels(request, reporter, show_pip)
    key = _layer_key(wheels)
    folder = cache_root() / "layers"
    record_path, blob_path = folder / f"deps-{key}.json", folder / f"deps-{key}.tar.gz"
    cached = _cached_layer(record_path, blob_path)
    if cached is None:
        if reporter:
            reporter.start("deps", f"Installing {len(wheels.wheels)} wheels for {request.arch} into {DEPS_DIR}")
        cached = _make_layer(wheels, blob_path, show_pip)
        write_atomic(record_path, (json.dumps(cached.__dict__, indent=2, sort_keys=True) + "\n").encode())
        if reporter:
            reporter.finish("deps", f"{wheels.describe()}: layer {cached.digest[7:19]} "
                                    f"({cached.size / 2**20:.1f} MB, {cached.uncompressed_size / 2**20:.1f} MB unpacked)")
    return blob_path, cached, wheels


def _layer_key(wheels: WheelSet) -> str:
    inputs = {"format": _LAYER_FORMAT, "prefix": DEPS_DIR, "mtime": source_date_epoch(),
              "python": wheels.request.python, "arch": wheels.request.arch,
              "platforms": list(wheels.request.platforms), "pip": _pip_version(),
              "wheels": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(wheels.wheels.items())}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _pip_version() -> str:
    try:
        return metadata.version("pip")
    except metadata.PackageNotFoundError:
        return "none"


def _cached_layer(record_path: Path, blob_path: Path) -> Blob | None:
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        blob = Blob(**record)
        # Size, not digest, is checked here: the store copy checks the digest whenever it copies,
        # and a hard link shares the very bytes the digest was taken of.
        if blob_path.stat().st_size != blob.size or blob.media_type != OCI_LAYER_GZIP:
            return None
        return blob
    except (OSError, ValueError, TypeError):
        return None


def _make_layer(wheels: WheelSet, target: Path, show_pip: bool) -> Blob:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".deps-", dir=target.parent) as temp:
        links, installed = Path(temp) / "wheels", Path(temp) / "site"
        links.mkdir()
        # Only the locked files in the folder pip looks in: it then cannot pick another build of a version.
        wheel_folder = wheels.request.cache_folder
        for name, data in wheels.wheels.items():
            try:
                os.link(wheel_folder / name, links / name)
            except OSError:
                (links / name).write_bytes(data)
        _pip_install(wheels, links, installed, show_pip)
        entries = LayerEntries()
        # bin/ holds console scripts whose shebang names this host's Python; the image runs `python3 -m`.
        _drop_records_outside(installed)
        entries.add_tree(installed, DEPS_DIR, skip=("bin",))
        partial = Path(temp) / "layer.tar.gz"
        blob = write_layer(entries, partial, source_date_epoch())
        os.replace(partial, target)
    return blob


def _drop_records_outside(installed: Path) -> None:
    """RECORD lists, as ``../../bin/NAME``, the console scripts that stay out of the layer, with the digest and size
    of each: their shebang is the path of the Python that ran pip, so the layer's bytes (and the image's digest)
    would change with it. Only those lines go; the others keep their bytes."""
    for record in sorted(installed.glob("*.dist-info/RECORD")):
        text = record.read_bytes()
        kept = b"".join(line for line in text.splitlines(keepends=True) if not line.lstrip(b'"').startswith(b"../"))
        if kept != text:
            record.write_bytes(kept)


def _pip_install(wheels: WheelSet, links: Path, dest: Path, show_pip: bool) -> None:
    request = wheels.request
    pins = [f"{package}=={version}" for package, version in sorted(wheels.versions().items())]
    # --no-compile: bytecode would be this host's and record its clock; --no-deps: the lock is complete.
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-index",
               "--find-links", str(links), "--no-deps", "--no-compile", "--no-warn-script-location",
               "--only-binary=:all:", *[f"--platform={tag}" for tag in request.platforms],
               "--python-version", request.python, "--implementation", "cp", "--target", str(dest), *pins]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=_INSTALL_TIMEOUT_S, check=False,
                              env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    except subprocess.TimeoutExpired:
        raise WheelFetchError(f"pip install --target of the image's packages took over {_INSTALL_TIMEOUT_S} s",
                              "check the disk; rerun with --debug") from None
    if show_pip:
        sys.stderr.write(done.stdout)
    if done.returncode != 0:
        last = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        raise WheelFetchError(f"pip install --target of {', '.join(pins)} failed: {last[-1] if last else 'no output'}",
                              "rerun with --debug to see pip's output")
    if not (dest / "onnxruntime").is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        raise WheelFetchError("pip install --target left no onnxruntime package", "rerun with --debug")
