"""Deterministic edge bundles: sorted entries, fixed times, owners and modes, gzip without a timestamp.

The archive is written to a temporary file beside the target and renamed into place, so a reader
never sees half a bundle.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from edgepack.manifest import FileEntry, Manifest
from edgepack.runtime import bundle as runtime_bundle

RUNTIME_DIR = Path(runtime_bundle.__file__).resolve().parent
LAUNCHER_NAME = "run"
_LAUNCHER = b"""#!/bin/sh
# edgepack bundle launcher: verifies every checksum, then benchmarks or predicts.
#   ./run verify | ./run bench [--help] | ./run predict INPUT.npy
cd "$(dirname "$0")" || exit 1
# Only the checksummed sources run: anything but runtime/*.py (a __pycache__, a .pyc or .so that
# Python would import first) stops the launch before Python starts, and no bytecode is written.
for entry in runtime/* runtime/.[!.]* runtime/..?*; do
  case "$entry" in
    *.py) [ -f "$entry" ] && [ ! -L "$entry" ] && continue ;;
  esac
  if [ -e "$entry" ] || [ -L "$entry" ]; then
    echo "error: $entry is not part of this bundle (only runtime/*.py are; remove it, or unpack the bundle again)" >&2
    exit 7
  fi
done
export PYTHONDONTWRITEBYTECODE=1
exec "${PYTHON:-python3}" -B -m runtime "$@"
"""
_EXECUTABLE = {LAUNCHER_NAME}


def source_date_epoch() -> int:
    # The reproducible-builds convention; 0 keeps bundles identical when it is unset.
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    return int(value) if value.isdigit() else 0


def runtime_files() -> dict[str, bytes]:
    return {
        f"runtime/{path.relative_to(RUNTIME_DIR).as_posix()}": path.read_bytes()
        for path in sorted(RUNTIME_DIR.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def payload_with_runtime(payload: dict[str, bytes]) -> dict[str, bytes]:
    return {**payload, **runtime_files(), LAUNCHER_NAME: _LAUNCHER}


def file_entries(files: dict[str, bytes]) -> list[FileEntry]:
    return [FileEntry(path=path, sha256=hashlib.sha256(files[path]).hexdigest(), size=len(files[path]))
            for path in sorted(files)]


def bundle_root(manifest: Manifest) -> str:
    """``name-version``; bundles with platform wheels add ``-cp311-aarch64`` so that builds of one model
    for several devices can share an output folder without overwriting each other."""
    root = f"{manifest.name}-{manifest.version}"
    if manifest.wheels is not None:
        root += f"-cp{manifest.wheels.python.replace('.', '')}-{manifest.wheels.arch}"
    return root


def assemble(files: dict[str, bytes], manifest: Manifest) -> tuple[str, bytes]:
    """The bundle's folder name and archive bytes: ``files``, the manifest and SHA256SUMS."""
    root = bundle_root(manifest)
    content = {**files, runtime_bundle.MANIFEST_NAME: manifest.to_json()}
    sums = {path: hashlib.sha256(data).hexdigest() for path, data in content.items()}
    content[runtime_bundle.SUMS_NAME] = runtime_bundle.format_sums(sums).encode()
    return root, archive_bytes(root, content)


def archive_bytes(root: str, content: dict[str, bytes]) -> bytes:
    mtime = source_date_epoch()
    folders = {root}
    for path in content:
        parts = path.split("/")[:-1]
        folders.update(f"{root}/{'/'.join(parts[: i + 1])}" for i in range(len(parts)))
    entries = sorted([(name, None) for name in folders] + [(f"{root}/{p}", d) for p, d in content.items()])
    buffer = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of the temp file's name and the clock.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
                if data is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    archive.addfile(info)
                else:
                    info.size = len(data)
                    info.mode = 0o755 if name.rsplit("/", 1)[-1] in _EXECUTABLE else 0o644
                    archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
