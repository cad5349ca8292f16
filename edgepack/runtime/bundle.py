"""Bundle integrity: checksums, manifest checks and safe archive reading.

A bundle is a gzip tar with one top-level folder holding ``manifest.json``, ``SHA256SUMS`` and the
files those list. Nothing is loaded before every checksum has matched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import IntegrityError

MANIFEST_NAME = "manifest.json"
SUMS_NAME = "SHA256SUMS"
SCHEMA_VERSION = 2  # 2: output kinds, variant codes and aliases, source provenance
READS_SCHEMAS = (1, 2)  # this runtime reads bundles of these schemas (every field schema 2 added is optional)
# Python writes bytecode caches next to the runtime when it runs from an unpacked bundle, and the
# launcher unpacks the bundled wheels into DEPS_DIR (see deps.py); both are derived from checksummed
# files, so they are the only files allowed beyond the list.
_DERIVED_PARTS = ("__pycache__",)
DEPS_DIR = ".deps"
_REQUIRED_KEYS = ("schema_version", "name", "version", "inputs", "outputs", "model", "files")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedBundle:
    root: str  # the top-level folder name inside the archive, or the folder on disk
    manifest: dict[str, Any]
    sums: dict[str, str]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def format_sums(sums: dict[str, str]) -> str:
    return "".join(f"{sums[path]}  {path}\n" for path in sorted(sums))


def parse_sums(text: str, where: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        digest, sep, path = line.partition("  ")
        if not sep or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise IntegrityError(
                f"{where}: line {number} of {SUMS_NAME} is malformed",
                "the bundle was altered; rebuild it or fetch it again",
            )
        _check_relative(path, where)
        sums[path] = digest
    if not sums:
        raise IntegrityError(f"{where}: {SUMS_NAME} lists no files", "rebuild the bundle")
    return sums


def check_manifest(manifest: Any, sums: dict[str, str], where: str) -> dict[str, Any]:
    """The manifest must be a supported schema and agree file by file with SHA256SUMS."""
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{where}: {MANIFEST_NAME} is not a JSON object", "rebuild the bundle")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise IntegrityError(
            f"{where}: {MANIFEST_NAME} lacks {', '.join(missing)}", "rebuild the bundle"
        )
    if manifest["schema_version"] not in READS_SCHEMAS:
        raise IntegrityError(
            f"{where}: manifest schema version {manifest['schema_version']!r} is not supported "
            f"(this runtime reads {', '.join(map(str, READS_SCHEMAS))})",
            "use an edgepack release that matches the bundle",
        )
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    expected = {path: digest for path, digest in sums.items() if path != MANIFEST_NAME}
    if listed != expected:
        differing = sorted(set(listed.items()) ^ set(expected.items()))
        raise IntegrityError(
            f"{where}: {MANIFEST_NAME} and {SUMS_NAME} disagree on {differing[0][0]}",
            "the bundle was altered; rebuild it or fetch it again",
        )
    if manifest["model"] not in listed:
        raise IntegrityError(f"{where}: the manifest's model file is not checksummed", "rebuild")
    return manifest


def verify_dir(root: Path) -> VerifiedBundle:
    """Verify an unpacked bundle in place; raises IntegrityError at the first problem."""
    where = str(root)
    sums_path = root / SUMS_NAME
    if not sums_path.is_file():
        raise IntegrityError(f"{where}: no {SUMS_NAME} here", "run this inside an unpacked bundle")
    sums = parse_sums(sums_path.read_text(encoding="utf-8"), where)
    present = _present_files(root)
    present.discard(SUMS_NAME)
    _compare_sets(present, set(sums), where)
    for rel, digest in sorted(sums.items()):
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"{where}: {rel} is not a regular file", "rebuild the bundle")
        if sha256_file(path) != digest:
            raise IntegrityError(
                f"{where}: checksum mismatch for {rel}",
                "the file was altered or corrupted; rebuild the bundle or fetch it again",
            )
    manifest = _parse_manifest((root / MANIFEST_NAME).read_bytes(), where)
    return VerifiedBundle(root.name, check_manifest(manifest, sums, where), sums)


def verify_archive(path: Path) -> VerifiedBundle:
    """Verify a bundle archive without unpacking it: safe entries, every checksum, the manifest."""
    where = str(path)
    if not path.is_file():
        raise IntegrityError(f"{where}: no such bundle file", "check the path")
    digests: dict[str, str] = {}
    sums_text = manifest_bytes = None
    top: str | None = None
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                rel = check_member(member, where)
                head, _, rest = rel.partition("/")
                if top is None:
                    top = head
                if head != top:
                    raise IntegrityError(
                        f"{where}: entry {member.name!r} is outside the bundle folder {top!r}",
                        "a bundle holds exactly one top-level folder; rebuild it",
                    )
                if member.isdir() or not rest:
                    continue
                data = archive.extractfile(member)
                assert data is not None  # regular files always have data
                digest = hashlib.sha256()
                captured = bytearray() if rest in (SUMS_NAME, MANIFEST_NAME) else None
                while chunk := data.read(_CHUNK):
                    digest.update(chunk)
                    if captured is not None:
                        captured.extend(chunk)
                if rest in digests:
                    raise IntegrityError(f"{where}: {rest} appears twice", "rebuild the bundle")
                digests[rest] = digest.hexdigest()
                if rest == SUMS_NAME:
                    sums_text = bytes(captured or b"").decode("utf-8", errors="replace")
                elif rest == MANIFEST_NAME:
                    manifest_bytes = bytes(captured or b"")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise IntegrityError(
            f"{where}: not a complete gzip tar bundle ({err})",
            "the file is truncated or corrupt; rebuild it or fetch it again",
        ) from None
    if sums_text is None or manifest_bytes is None or top is None:
        raise IntegrityError(
            f"{where}: {SUMS_NAME} or {MANIFEST_NAME} is missing", "this is not an edgepack bundle"
        )
    sums = parse_sums(sums_text, where)
    digests.pop(SUMS_NAME)
    _compare_sets(set(digests), set(sums), where)
    for rel, digest in sorted(sums.items()):
        if digests[rel] != digest:
            raise IntegrityError(
                f"{where}: checksum mismatch for {rel}",
                "the file was altered or corrupted; rebuild the bundle or fetch it again",
            )
    manifest = check_manifest(_parse_manifest(manifest_bytes, where), sums, where)
    return VerifiedBundle(top, manifest, sums)


def extract_archive(path: Path, dest: Path) -> Path:
    """Verify, then unpack into ``dest``; returns the bundle folder."""
    verified = verify_archive(path)
    with tarfile.open(path, mode="r:gz") as archive:
        members = [m for m in archive.getmembers() if check_member(m, str(path))]
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12 has no filters; members were checked one by one above
            archive.extractall(dest, members=members)
    return dest / verified.root


def check_member(member: tarfile.TarInfo, where: str) -> str:
    """Refuse entries that could escape the destination or are not plain files and folders."""
    if member.issym() or member.islnk():
        kind = "a link"
    elif member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        kind = "a device or pipe"
    elif not (member.isreg() or member.isdir()):
        kind = "not a regular file"
    else:
        return _check_relative(member.name.rstrip("/"), where)
    raise IntegrityError(
        f"{where}: entry {member.name!r} is {kind}; bundles hold only files and folders",
        "do not unpack it; rebuild the bundle from a trusted source",
    )


def _present_files(root: Path) -> set[str]:
    """Files and links under ``root``, bundle-relative, without derived folders (not even entered:
    unpacked wheels are thousands of files, slow to walk on a small device)."""
    present: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        rel = here.relative_to(root)
        links = [name for name in dirs if (here / name).is_symlink()]  # listed like files, never entered
        dirs[:] = sorted(name for name in dirs if name not in links and not _derived((rel / name).parts))
        for name in files + links:
            path = here / name
            if (path.is_file() or path.is_symlink()) and not _derived((rel / name).parts):
                present.add((rel / name).as_posix())
    return present


def _derived(parts: tuple[str, ...]) -> bool:
    return parts[0] == DEPS_DIR or any(part in _DERIVED_PARTS for part in parts)


def _check_relative(name: str, where: str) -> str:
    posix = PurePosixPath(name)
    if not name or posix.is_absolute() or "\\" in name or ".." in posix.parts:
        raise IntegrityError(
            f"{where}: entry {name!r} has an unsafe path (absolute or with '..')",
            "do not unpack it; rebuild the bundle from a trusted source",
        )
    return posix.as_posix()


def _compare_sets(present: set[str], listed: set[str], where: str) -> None:
    if missing := sorted(listed - present):
        raise IntegrityError(
            f"{where}: {missing[0]} is listed in {SUMS_NAME} but missing",
            "the bundle is incomplete; rebuild it or fetch it again",
        )
    if extra := sorted(present - listed):
        raise IntegrityError(
            f"{where}: {extra[0]} is not listed in {SUMS_NAME}",
            "a file was added to the bundle; rebuild it or fetch it again",
        )


def _parse_manifest(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{where}: {MANIFEST_NAME} is not valid JSON ({err})", "rebuild") from None
