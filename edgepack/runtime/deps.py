"""numpy and onnxruntime from the bundle's own wheels, for devices that have only python3.

A bundle built with ``--arch`` carries ``wheels/*.whl`` for one architecture and CPython version.
When this Python cannot import numpy or onnxruntime (or ``EDGEPACK_USE_WHEELS=1`` asks for the
bundled ones even so), the bundle is verified, the wheels are unpacked once into
``.deps/cp311-aarch64/`` inside the bundle (into a temporary folder, then renamed, so a crash never
leaves half of it), and that folder goes first on ``sys.path`` before anything imports numpy.
``EDGEPACK_USE_WHEELS=0`` never uses them.

When the bundle folder is read-only, the wheels are unpacked into a private temporary folder for
this run instead, removed at exit, and a note on stderr says so: the run works, it only pays the
unpacking each time. ``.deps`` is derived from checksummed wheels, like ``__pycache__`` is from
checksummed sources; a stamp of the wheels' checksums decides whether it can be reused.

Standard library only: this runs before numpy exists.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import platform
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .bundle import DEPS_DIR, verify_dir
from .errors import EdgepackError, IntegrityError, UnsupportedHere

WHEELS_DIR = "wheels"
USE_WHEELS = "EDGEPACK_USE_WHEELS"
_STAMP = ".edgepack-wheels"
_MACHINES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_CHUNK = 1 << 20


def activate(root: Path) -> Path | None:
    """Put the bundle's unpacked wheels first on ``sys.path`` when they are needed; the folder, or None."""
    wheels = sorted((root / WHEELS_DIR).glob("*.whl"))
    choice = os.environ.get(USE_WHEELS, "")
    if not wheels or choice == "0":
        return None
    if choice != "1" and all(importlib.util.find_spec(name) for name in ("numpy", "onnxruntime")):
        return None
    verified = verify_dir(root)  # nothing from a wheel runs before every checksum has matched
    record = verified.manifest.get("wheels") or {}
    _check_platform(record, root, forced=choice == "1")
    names = [f"{WHEELS_DIR}/{path.name}" for path in wheels]
    stamp = "".join(f"{verified.sums[name]}  {name}\n" for name in names)
    tag = f"cp{record['python'].replace('.', '')}-{record['arch']}"
    folder = _unpacked(root / DEPS_DIR, tag, wheels, stamp)
    sys.path.insert(0, str(folder))
    return folder


def activate_or_exit(root: Path) -> None:
    """``activate`` for a launcher: a failure is one line on stderr and the runtime's exit code."""
    try:
        activate(root)
    except EdgepackError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        raise SystemExit(int(err.exit_code)) from None


def _check_platform(record: dict, root: Path, forced: bool = False) -> None:
    if not record.get("python") or record.get("arch") not in ("x86_64", "aarch64"):
        raise IntegrityError(f"{root}: the manifest does not say which platform its wheels are for",
                             "rebuild the bundle with this edgepack version")
    here_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    machine = platform.machine().lower()
    here_arch = _MACHINES.get(machine, machine)
    if (sys.implementation.name, here_python, here_arch) != ("cpython", record["python"], record["arch"]):
        why = f"{USE_WHEELS}=1 asks for them" if forced else "it cannot import numpy and onnxruntime"
        raise UnsupportedHere(
            f"this bundle's wheels are for CPython {record['python']} on {record['arch']}, this is "
            f"{'CPython' if sys.implementation.name == 'cpython' else sys.implementation.name} {here_python} "
            f"on {here_arch}, and {why}",
            (f"unset {USE_WHEELS}, " if forced else "pip install numpy onnxruntime here, ")
            + f"or rebuild with --arch {here_arch} --python-version {here_python}")


def _unpacked(parent: Path, tag: str, wheels: list[Path], stamp: str) -> Path:
    final = parent / tag
    if _stamp_of(final) == stamp:
        return final
    try:
        parent.mkdir(exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=parent))
    except OSError as err:
        return _unpacked_elsewhere(parent.parent, wheels, stamp, err)
    try:
        _unzip_all(wheels, temp, stamp)
        os.chmod(temp, 0o755)  # mkdtemp's 0700 would hide it from other users the bundle serves
        if final.exists():  # a stale unpacking (other wheels): move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{tag}.stale.", dir=parent))
            os.rename(final, stale / tag)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(temp, final)
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        if _stamp_of(final) == stamp:  # another run of this bundle finished first
            return final
        raise UnsupportedHere(f"cannot unpack the bundled wheels into {parent}: {err.strerror or err}",
                              "free some disk space there, or install numpy and onnxruntime") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _unpacked_elsewhere(root: Path, wheels: list[Path], stamp: str, err: OSError) -> Path:
    temp = Path(tempfile.mkdtemp(prefix="edgepack-deps-"))
    atexit.register(shutil.rmtree, temp, True)
    print(f"note: cannot write {DEPS_DIR}/ in {root} ({err.strerror}); unpacked the bundled wheels into {temp} "
          "for this run (removed at exit)", file=sys.stderr)
    _unzip_all(wheels, temp, stamp)
    return temp


def _stamp_of(folder: Path) -> str | None:
    try:
        return (folder / _STAMP).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _unzip_all(wheels: list[Path], dest: Path, stamp: str) -> None:
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.infolist():
                    _unzip_member(archive, member, dest, wheel.name)
        except (zipfile.BadZipFile, EOFError) as err:
            raise IntegrityError(f"{wheel.name} is not a valid wheel ({err})", "rebuild the bundle") from None
    # Written last: a folder with a stamp is complete.
    (dest / _STAMP).write_text(stamp, encoding="utf-8")


def _unzip_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, dest: Path, wheel: str) -> None:
    name = member.filename
    parts = PurePosixPath(name).parts
    mode = member.external_attr >> 16
    if (not name or name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]
            or stat.S_ISLNK(mode)):
        raise IntegrityError(f"{wheel}: member {name!r} is a link or has an unsafe path (absolute or with '..')",
                             "do not use this bundle; rebuild it from trusted wheels")
    target = dest.joinpath(*parts)
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
    if mode & 0o111:
        os.chmod(target, 0o755)

