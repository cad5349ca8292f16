"""An arm64 Debian bookworm with python3, for running aarch64 code under qemu-user on this x86_64 host.

Two forms of the same tree, each made once and kept in ``${EDGEPACK_CACHE:-~/.cache/edgepack}``:

    test-rootfs/arm64-bookworm/                   the tree: ``qemu-aarch64-static -L TREE`` runs its python3
    test-containers/base-python-3.11-arm64/oci/   the tree as a linux/arm64 image, ``oci:DIR:3.11``, build.json beside

No arm64 code runs to make either, so neither needs binfmt_misc (not mounted here, and host-wide state a test
must not register) nor a container engine: the tree is ``debootstrap --foreign`` plus ``dpkg-deb -x``, and the
image is that tree as one layer, tarred here and written with edgepack's own OCI blob store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

from containers import locked
from python_base import DEBIAN_MIRROR
from edgepack.package.oci import OCI_CONFIG, OCI_MANIFEST, REF_NAME, Blob, BlobStore, write_layout, write_tar_layer
from edgepack.package.wheels import cache_root

ARM64_TAG = "3.11"  # bookworm's python3
ARM64_PLATFORM = {"architecture": "arm64", "os": "linux", "variant": "v8"}


def arm64_rootfs() -> Path:
    """A minimal Debian bookworm arm64 tree with python3, made once and kept in the cache.

    debootstrap's first stage (--foreign) needs no arm64 code to run; it unpacks only the required
    packages, so the rest (python3 among them) is unpacked here with dpkg-deb, as its second stage
    would do without running maintainer scripts, which a Python interpreter does not need.
    """
    rootfs = cache_root() / "test-rootfs" / "arm64-bookworm"
    if (rootfs / "usr" / "bin" / "python3").exists():
        return rootfs
    missing = [tool for tool in ("qemu-aarch64-static", "debootstrap", "dpkg-deb") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install qemu-user-static debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root to make the arm64 root filesystem")
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    # The cache is shared by every checkout on the machine: two runs making the tree at once would race on the rename.
    with locked(rootfs.parent / ".lock"):
        if not (rootfs / "usr" / "bin" / "python3").exists():
            _make_rootfs(rootfs)
    return rootfs


def _make_rootfs(rootfs: Path) -> None:
    for stale in rootfs.parent.glob(f".{rootfs.name}.*"):  # a run killed midway; makers hold the lock we hold
        shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{rootfs.name}.", dir=rootfs.parent))
    try:
        _run_or_skip(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3", "--foreign",
                      "bookworm", str(temp), DEBIAN_MIRROR], "debootstrap --foreign", timeout=900)
        debs = sorted((temp / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        for deb in debs:
            _run_or_skip(["dpkg-deb", "-x", str(deb), str(temp)], f"dpkg-deb -x {deb.name}", timeout=120)
            deb.unlink()
        if not (temp / "usr" / "bin" / "python3").exists():
            pytest.skip(f"the arm64 root filesystem has no python3 after unpacking {len(debs)} packages")
        # onnxruntime's cpuinfo reads these at import and aborts when it cannot (sandboxed hosts hide
        # them); qemu's -L finds them here first, so the test does not depend on the host's /sys.
        cpu = temp / "sys" / "devices" / "system" / "cpu"
        cpu.mkdir(parents=True, exist_ok=True)
        for name in ("possible", "present", "online"):
            (cpu / name).write_text(f"0-{max(os.cpu_count() or 1, 1) - 1}\n")
        os.rename(temp, rootfs)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _run_or_skip(command: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{what} did not finish within {timeout:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{what} failed (exit {done.returncode}): {last}")


# --- the tree as a linux/arm64 image ----------------------------------------------------------------

def arm64_python_layout() -> tuple[Path, str]:
    """(OCI layout folder, tag) of a linux/arm64 image of the arm64 tree, with python3 as its Cmd."""
    rootfs = arm64_rootfs()
    final = cache_root() / "test-containers" / f"base-python-{ARM64_TAG}-arm64"
    if not (final / "oci" / "index.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        # Not containers.py's .lock: that one is held for minutes while the amd64 base is debootstrapped.
        with locked(final.parent / ".lock-arm64"):
            if not (final / "oci" / "index.json").exists():
                _write_layout(rootfs, final)
    return final / "oci", ARM64_TAG


# Left out of the layer, as from the amd64 base (containers.py): what every engine mounts over (/dev, /proc, /sys,
# /run, /tmp: the tree's /sys/devices/system/cpu files are for qemu's -L only), what apt can fetch again, the
# documentation, and debootstrap's own working folder.
_EMPTIED = ("dev", "proc", "sys", "run", "tmp", "var/log", "var/lib/apt/lists", "var/cache/apt", "usr/share/doc",
            "usr/share/man", "usr/share/info", "usr/share/locale")
_LEFT_OUT = ("debootstrap",)


def _write_layout(rootfs: Path, final: Path) -> None:
    """Build in a temporary folder beside ``final`` and rename it into place."""
    for stale in final.parent.glob(f".{final.name}.*"):  # a build killed midway; builders hold the lock we hold
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        store = BlobStore(temp / "oci")
        layer_file = temp / "layer.tar.gz"
        layer = _tar_tree(rootfs, layer_file)
        store.put_file(layer_file, layer)
        layer_file.unlink()
        config = {**ARM64_PLATFORM, "created": created,
                  "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                     "LANG=C.UTF-8"], "Cmd": ["python3"]},
                  "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                  "history": [{"created": created, "created_by": "debootstrap --foreign --arch=arm64 --variant=minbase "
                                                                 "--include=python3 bookworm; dpkg-deb -x"}]}
        config_blob = store.put_json(config, OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_blob.descriptor(),
                    "layers": [layer.descriptor()]}
        manifest_blob = store.put_json(manifest, OCI_MANIFEST)
        write_layout(store.root, [manifest_blob.descriptor(platform=ARM64_PLATFORM,
                                                           annotations={REF_NAME: ARM64_TAG})])
        record = {"layout": "oci", "tag": ARM64_TAG, "platform": "linux/arm64/v8", "suite": "bookworm",
                  "rootfs": str(rootfs), "built": created, "build_seconds": round(time.monotonic() - started, 1),
                  "layer_bytes": layer.size, "uncompressed_bytes": layer.uncompressed_size,
                  "manifest_digest": manifest_blob.digest}
        (temp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        temp.chmod(0o755)
        os.rename(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _tar_tree(rootfs: Path, target: Path) -> Blob:
    """The tree as a gzip layer. edgepack's LayerEntries takes only plain files and folders; a Debian tree
    has links (symbolic and hard), setuid files and a sticky /tmp, which tarfile keeps as they are."""

    def add(archive: tarfile.TarFile) -> None:
        for path, name in _walk(rootfs):
            info = archive.gettarinfo(str(path), name)  # a second path to an inode becomes a hard link
            info.uname = info.gname = ""  # numeric owners: the host's names mean nothing in the image
            if info.isreg():
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
            else:
                archive.addfile(info)

    return write_tar_layer(target, add)


def _walk(rootfs: Path) -> Iterator[tuple[Path, str]]:
    """(path, name in the layer) of every entry to keep, parents before children, in a stable order."""
    for folder, dirs, files in os.walk(rootfs):
        relative = Path(folder).relative_to(rootfs).as_posix()
        prefix = "" if relative == "." else relative + "/"
        if relative in _EMPTIED:
            dirs[:] = []
            continue
        # os.walk lists a link to a folder among the folders and never enters it: it goes in as the link it is.
        links = sorted(d for d in dirs if os.path.islink(os.path.join(folder, d)))
        dirs[:] = sorted(d for d in dirs if d not in links and prefix + d not in _LEFT_OUT)
        for name in [*dirs, *sorted([*files, *links])]:
            yield Path(folder) / name, prefix + name
