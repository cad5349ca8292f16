"""A Python base image made here: Debian bookworm minbase with python3 by debootstrap, imported into the
private podman store (``BASE_IMAGE``) and kept as an OCI layout (``oci:DIR:3.11``) for image builders.

Built once under ``containers.locked``, into a temporary folder renamed into place, and restored into the
store from the layout in seconds when the store was emptied. See ``containers.py`` for the podman setup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from containers import (INSTALL_HINT, ContainerError, PodmanSetup, locked, podman, podman_run, podman_setup, skopeo,
                        tool)

BASE_REPOSITORY = "localhost/edgepack-test-python"
BASE_TAG = "3.11"  # bookworm's python3
BASE_IMAGE = f"{BASE_REPOSITORY}:{BASE_TAG}"
DEBIAN_MIRROR = os.environ.get("EDGEPACK_DEBIAN_MIRROR", "http://deb.debian.org/debian")


_base: tuple[Path, str] | None = None
_base_skip: str | None = None


def python_base_layout() -> tuple[Path, str]:
    """(OCI layout folder, tag) of the base image, also in podman's store as BASE_IMAGE; built once, then cached."""
    global _base, _base_skip
    if _base is None and _base_skip is None:
        setup = podman_setup()
        final = setup.root / f"base-python-{BASE_TAG}"
        with locked(setup.root / ".lock"):
            if not (final / "oci" / "index.json").exists():
                _base_skip = _build_base(setup, final)
            if _base_skip is None and podman("image", "exists", BASE_IMAGE, timeout_s=60, check=False).returncode:
                # The store was emptied but the layout is intact: restoring it takes seconds.
                skopeo("copy", "--quiet", f"oci:{final / 'oci'}:{BASE_TAG}", f"containers-storage:{BASE_IMAGE}")
        if _base_skip is None:
            _base = (final / "oci", BASE_TAG)
    if _base_skip is not None:
        pytest.skip(_base_skip)
    assert _base is not None
    return _base


def base_image_record() -> dict:
    """What the base image build recorded: sizes in bytes, seconds taken, the manifest digest."""
    layout, _ = python_base_layout()
    return json.loads((layout.parent / "build.json").read_text())


def _build_base(setup: PodmanSetup, final: Path) -> str | None:
    """Build into a temporary folder and rename it into place; return why not when it cannot be built here."""
    debootstrap = tool("debootstrap")
    if not debootstrap:
        return f"debootstrap not installed ({INSTALL_HINT})"
    for stale in setup.root.glob(f".{final.name}.*"):  # a build killed midway; builds hold the lock we hold
        _remove_tree(stale)
    started = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=setup.root))
    rootfs = temp / "rootfs"
    try:
        try:
            done = subprocess.run([debootstrap, "--variant=minbase", "--include=python3", "bookworm", str(rootfs),
                                   DEBIAN_MIRROR], check=False, capture_output=True, text=True, timeout=480)
        except subprocess.TimeoutExpired:
            return f"debootstrap of bookworm from {DEBIAN_MIRROR} did not finish within 480 s"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
            return f"debootstrap of bookworm from {DEBIAN_MIRROR} failed (exit {done.returncode}): {last}"
        debootstrap_s = time.monotonic() - started
        _trim(rootfs)
        rootfs_bytes = _tree_bytes(rootfs)
        _import(rootfs, setup)
        _remove_tree(rootfs)
        version = podman_run(BASE_IMAGE, "python3", "-c", "import sys; print(sys.version.split()[0])")
        if not version.stdout.startswith(BASE_TAG + "."):
            raise ContainerError(f"{BASE_IMAGE} should run Python {BASE_TAG}: {version.stdout}{version.stderr}")
        skopeo("copy", "--quiet", f"containers-storage:{BASE_IMAGE}", f"oci:{temp / 'oci'}:{BASE_TAG}")
        index = json.loads((temp / "oci" / "index.json").read_text())
        size = podman("image", "inspect", "--format", "{{.Size}}", BASE_IMAGE, timeout_s=60).stdout.strip()
        record = {"image": BASE_IMAGE, "layout": "oci", "tag": BASE_TAG, "python": version.stdout.strip(),
                  "suite": "bookworm", "mirror": DEBIAN_MIRROR, "built": datetime.now(timezone.utc).isoformat(),
                  "debootstrap_seconds": round(debootstrap_s, 1), "build_seconds": round(time.monotonic() - started, 1),
                  "rootfs_bytes": rootfs_bytes, "image_bytes": int(size),
                  "layout_bytes": _tree_bytes(temp / "oci" / "blobs"),
                  "manifest_digest": index["manifests"][0]["digest"], "storage_driver": setup.driver}
        (temp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        temp.chmod(0o755)  # mkdtemp made it private
        os.rename(temp, final)
    finally:
        if temp.exists():
            _remove_tree(temp)
    return None


# Trimmed: package indexes and caches (apt can fetch them again), documentation but its copyright files, and the
# device nodes debootstrap made (every engine mounts its own /dev, and rootless extraction refuses them).
_TRIMMED = ("var/lib/apt/lists", "var/cache/apt", "usr/share/man", "usr/share/info", "usr/share/locale", "var/log",
            "dev", "run", "tmp")


def _trim(rootfs: Path) -> None:
    for folder in filter(Path.is_dir, (rootfs / name for name in _TRIMMED)):
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for old in [*(rootfs / "var/cache/debconf").glob("*-old"), *(rootfs / "var/lib/dpkg").glob("*-old")]:
        old.unlink()
    for doc in sorted((rootfs / "usr/share/doc").rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if doc.is_symlink() or doc.is_file():
            if doc.name != "copyright":
                doc.unlink()
        elif doc.is_dir() and not any(doc.iterdir()):
            doc.rmdir()


def _import(rootfs: Path, setup: PodmanSetup) -> None:
    """tar | podman import, with the settings an image config needs (no Dockerfile: nothing here pulls one)."""
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
               'CMD ["python3"]']
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe nobody reads while podman reads the tree
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE,
                               stderr=errors)
        assert tar.stdout is not None
        try:
            podman("import", "--quiet", *[arg for change in changes for arg in ("--change", change)], "-",
                   BASE_IMAGE, stdin=tar.stdout, timeout_s=300, setup=setup)
        finally:
            tar.stdout.close()
            if tar.poll() is None:
                tar.kill()
            tar.wait(timeout=30)
        if tar.returncode != 0:  # a short stream would have made an image of part of the tree
            podman("rmi", "--ignore", BASE_IMAGE, timeout_s=120, check=False, setup=setup)
            errors.seek(0)
            raise ContainerError(f"tar of {rootfs} failed (exit {tar.returncode}): {errors.read().decode()[-2000:]}")


def _tree_bytes(path: Path) -> int:
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def _remove_tree(path: Path) -> None:
    """rmtree, after unmounting anything debootstrap left mounted inside (/proc, /sys of a killed run)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount_point in sorted((m for m in mounts if m.startswith(str(path) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True, timeout=60)
    shutil.rmtree(path, ignore_errors=True)
