"""Bundle integrity: checksums, manifest checks and safe archive reading.

A bundle is a gzip tar with one top-level folder holding ``manifest.json``, ``SHA256SUMS`` and the
files those list. Nothing is loaded before every checksum has matched.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .errors import InputError, IntegrityError
from .unpack_limits import METADATA_CAP, CappedStream, too_large, unpacked_limit

MANIFEST_NAME = "manifest.json"
SUMS_NAME = "SHA256SUMS"
SCHEMA_VERSION = 2  # 2: output kinds, variant codes and aliases, source provenance
READS_SCHEMAS = (1, 2)  # this runtime reads bundles of these schemas (every field schema 2 added is optional)
# The launcher unpacks the bundled wheels into DEPS_DIR (see deps.py), derived from checksummed
# wheels: the only folder allowed beyond the list. A bytecode cache (__pycache__) is not: Python would
# run it instead of the checksummed sources, and the runtime never writes one (see __init__.py).
DEPS_DIR = ".deps"
_PYCACHE = "__pycache__"
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
    """Verify an unpacked bundle in place; raises IntegrityError at the first problem: anything but
    the listed regular files (an extra file, a bytecode cache, a link, a device, a pipe), or a checksum."""
    where = str(root)
    sums_path = root / SUMS_NAME
    if not sums_path.is_file():
        raise IntegrityError(f"{where}: no {SUMS_NAME} here", "run this inside an unpacked bundle")
    present = _present_files(root, where)  # first: no link, pipe or device is opened below
    sums = parse_sums(_read_small(sums_path, where).decode("utf-8", errors="replace"), where)
    present.discard(SUMS_NAME)
    _compare_sets(present, set(sums), where)
    for rel, digest in sorted(sums.items()):
        if _sha256_regular(root / rel, where) != digest:
            raise IntegrityError(
                f"{where}: checksum mismatch for {rel}",
                "the file was altered or corrupted; rebuild the bundle or fetch it again",
            )
    manifest = _parse_manifest(_read_small(root / MANIFEST_NAME, where), where)
    return VerifiedBundle(root.name, check_manifest(manifest, sums, where), sums)


def verify_archive(path: Path, max_unpacked_mb: float | None = None) -> VerifiedBundle:
    """Verify a bundle archive without unpacking it: safe entries, every checksum, the manifest.

    One streaming pass with bounded memory: ``SHA256SUMS`` comes first, so an unlisted entry is
    refused at its header, before its data is read; the entries' sizes may not add up past
    ``unpack_limits.unpacked_limit``; the tar must end with its end-of-archive blocks and the gzip stream is
    read to its end, so its length and CRC are checked (a truncated archive is refused)."""
    where = str(path)
    if path.is_dir():
        raise InputError(f"{where}: a folder, not a bundle file",
                         "give the bundle's .tar.gz, or run ./run verify inside an unpacked bundle")
    if not path.is_file():
        raise InputError(f"{where}: no such bundle file", "give the path of a bundle .tar.gz")
    limit = unpacked_limit(path.stat().st_size, max_unpacked_mb)
    check = _StreamCheck(where, limit)
    try:
        with _open_archive(path, limit, where) as (archive, stream):
            for member in archive:
                check.member(archive, member)
            _check_end(stream, archive.offset, where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise IntegrityError(
            f"{where}: not a complete gzip tar bundle ({err})",
            "the file is truncated or corrupt; rebuild it or fetch it again",
        ) from None
    return check.result()


def extract_archive(path: Path, dest: Path, max_unpacked_mb: float | None = None) -> Path:
    """Verify, then unpack into ``dest`` through the same bounded stream; returns the bundle folder."""
    verified = verify_archive(path, max_unpacked_mb)
    where = str(path)
    limit = unpacked_limit(path.stat().st_size, max_unpacked_mb)
    with _open_archive(path, limit, where) as (archive, _):
        members = [m for m in archive.getmembers() if check_member(m, where)]
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12 has no filters; members were checked one by one above
            archive.extractall(dest, members=members)
    return dest / verified.root


@contextmanager
def _open_archive(path: Path, limit: int, where: str) -> Iterator[tuple[tarfile.TarFile, CappedStream]]:
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
        stream = CappedStream(unzipped, limit, where)
        with tarfile.open(fileobj=stream, mode="r:") as archive:  # type: ignore[call-overload]
            yield archive, stream


class _StreamCheck:
    """The checks of one pass over an archive's entries, in order; ``result`` after the last."""

    def __init__(self, where: str, limit: int) -> None:
        self.where, self.limit = where, limit
        self.top: str | None = None
        self.sums: dict[str, str] | None = None
        self.manifest: Any = None
        self.sizes: dict[str, int] = {}  # entry -> its size in the archive, for every file read
        self.folders: set[str] = set()
        self.parents: set[str] = set()  # the folders SHA256SUMS implies, once it is read
        self.total = 0

    def member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        where = self.where
        rel = check_member(member, where)
        head, _, rest = rel.partition("/")
        if self.top is None:
            self.top = head
        if head != self.top or not (rest or member.isdir()):
            raise IntegrityError(
                f"{where}: entry {member.name!r} is outside the bundle folder {self.top!r}",
                "a bundle holds exactly one top-level folder; rebuild it",
            )
        if member.isdir():
            self._folder(rest)
            return
        self._admit(rest, member.size)
        data = archive.extractfile(member)
        if data is None:  # a regular file always has data; this is not a tar tarfile can read
            raise IntegrityError(f"{where}: entry {member.name!r} has no data", "rebuild the bundle")
        digest = hashlib.sha256()
        small = bytearray() if rest in (SUMS_NAME, MANIFEST_NAME) else None
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
            if small is not None:
                small.extend(chunk)
        if rest == SUMS_NAME:
            self.sums = parse_sums(bytes(small or b"").decode("utf-8", errors="replace"), where)
            self.parents = {parent.as_posix() for path in self.sums for parent in PurePosixPath(path).parents}
            return
        if digest.hexdigest() != self.sums[rest]:  # type: ignore[index]  # _admit saw sums
            raise IntegrityError(
                f"{where}: checksum mismatch for {rest}",
                "the file was altered or corrupted; rebuild the bundle or fetch it again",
            )
        if rest == MANIFEST_NAME:
            self._manifest(bytes(small or b""))

    def _folder(self, rest: str) -> None:
        # Before SHA256SUMS only the bundle folder itself; after it, only folders of listed files:
        # a stream of empty folders cannot fill memory either.
        if rest in self.folders or (rest and rest not in self.parents):
            raise IntegrityError(f"{self.where}: folder {rest or self.top!r} is repeated or holds no listed file",
                                 "a file was added to the bundle; rebuild it or fetch it again")
        self.folders.add(rest)

    def _admit(self, rest: str, size: int) -> None:
        """Refuse an entry from its header alone, before any of its data is read."""
        where = self.where
        if self.sums is None and rest != SUMS_NAME:
            raise IntegrityError(f"{where}: {rest} comes before {SUMS_NAME}",
                                 f"an edgepack bundle lists its files first, in {SUMS_NAME}; rebuild it")
        if rest in self.sizes:
            raise IntegrityError(f"{where}: {rest} appears twice", "rebuild the bundle")
        if self.sums is not None and rest not in self.sums:
            raise IntegrityError(f"{where}: {rest} is not listed in {SUMS_NAME}",
                                 "a file was added to the bundle; rebuild it or fetch it again")
        if rest in (SUMS_NAME, MANIFEST_NAME) and size > METADATA_CAP:
            raise IntegrityError(f"{where}: {rest} is {size} bytes, more than the {METADATA_CAP} a bundle's "
                                 "metadata may take", "the bundle was altered; rebuild it or fetch it again")
        listed = self._listed_sizes().get(rest)
        if listed is not None and listed != size:
            raise IntegrityError(f"{where}: {rest} is {size} bytes, the manifest lists {listed}",
                                 "the bundle was altered; rebuild it or fetch it again")
        self.total += size
        if self.total > self.limit:
            raise too_large(where, f"{rest} and the files before it", self.total, self.limit)
        self.sizes[rest] = size

    def _manifest(self, raw: bytes) -> None:
        self.manifest = check_manifest(_parse_manifest(raw, self.where), self.sums or {}, self.where)
        listed = self._listed_sizes()
        if sum(listed.values()) > self.limit:
            raise too_large(self.where, "the files the manifest lists", sum(listed.values()), self.limit)
        for rest, size in self.sizes.items():
            if rest in listed and listed[rest] != size:
                raise IntegrityError(f"{self.where}: {rest} is {size} bytes, the manifest lists {listed[rest]}",
                                     "the bundle was altered; rebuild it or fetch it again")

    def _listed_sizes(self) -> dict[str, int]:
        if not isinstance(self.manifest, dict):
            return {}
        return {entry["path"]: entry["size"] for entry in self.manifest["files"]
                if isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool)}

    def result(self) -> VerifiedBundle:
        if self.sums is None or self.manifest is None or self.top is None:
            raise IntegrityError(
                f"{self.where}: {SUMS_NAME} or {MANIFEST_NAME} is missing", "this is not an edgepack bundle"
            )
        _compare_sets(set(self.sizes) - {SUMS_NAME}, set(self.sums), self.where)
        return VerifiedBundle(self.top, self.manifest, self.sums)


def _check_end(stream: CappedStream, offset: int, where: str) -> None:
    """The tar's two zero blocks must follow its last entry (tarfile stops quietly at a cut or a
    broken header); then the gzip stream is read to its end, which checks its length and CRC."""
    stream.seek(offset)
    if stream.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
        raise IntegrityError(f"{where}: the tar stream ends without its end-of-archive blocks",
                             "the file is truncated or corrupt; rebuild it or fetch it again")
    while stream.read(_CHUNK):
        pass


def _open_regular(path: Path, where: str):
    """``path`` opened for reading only if it is still a regular file: a pipe or device swapped in
    after the walk neither blocks the open nor is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(path, flags)
    except OSError as err:
        raise IntegrityError(f"{where}: cannot read {path.relative_to(where)} ({err.strerror or err})",
                             "the bundle is incomplete or altered; rebuild it or fetch it again") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise IntegrityError(f"{where}: {path.relative_to(where)} is not a regular file",
                             "remove it, or unpack the bundle again from a trusted archive")
    return os.fdopen(handle, "rb")


def _sha256_regular(path: Path, where: str) -> str:
    digest = hashlib.sha256()
    with _open_regular(path, where) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_small(path: Path, where: str) -> bytes:
    """A metadata file, whole, refused past ``METADATA_CAP`` without reading more than that."""
    with _open_regular(path, where) as handle:
        data = handle.read(METADATA_CAP + 1)
    if len(data) > METADATA_CAP:
        raise IntegrityError(f"{where}: {path.name} is more than the {METADATA_CAP} bytes a bundle's "
                             "metadata may take", "the bundle was altered; rebuild it or fetch it again")
    return data


def check_member(member: tarfile.TarInfo, where: str) -> str:
    """Refuse entries that could escape the destination or are not plain files and folders."""
    if member.issym() or member.islnk():
        kind = "a link"
    elif member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        kind = "a device or pipe"
    elif member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        kind = "a sparse file"  # its holes would unpack to far more than its stored size
    elif not (member.isreg() or member.isdir()):
        kind = "not a regular file"
    else:
        return _check_relative(member.name.rstrip("/"), where)
    raise IntegrityError(
        f"{where}: entry {member.name!r} is {kind}; bundles hold only files and folders",
        "do not unpack it; rebuild the bundle from a trusted source",
    )


def _present_files(root: Path, where: str) -> set[str]:
    """Regular files under ``root``, bundle-relative. Anything else there is refused at once: a link,
    a device, a pipe or a socket, and a bytecode cache. ``DEPS_DIR`` is not entered (unpacked wheels
    are thousands of files, slow to walk on a small device; deps.py checks their stamp)."""
    present: set[str] = set()
    pending = [PurePosixPath()]
    while pending:
        rel_folder = pending.pop()
        with os.scandir(root.joinpath(*rel_folder.parts)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = rel_folder / entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    if rel.as_posix() == DEPS_DIR:
                        continue
                    if entry.name == _PYCACHE:
                        raise IntegrityError(
                            f"{where}: {rel} is not part of the bundle (a bytecode cache, which Python would "
                            "run instead of the checksummed sources)",
                            f"remove it (rm -r {rel}) and run the bundle with ./run, which never writes one")
                    pending.append(rel)
                elif stat.S_ISREG(mode):
                    present.add(rel.as_posix())
                else:
                    raise IntegrityError(
                        f"{where}: {rel} is {_kind(mode)}; a bundle holds only regular files and folders",
                        "remove it, or unpack the bundle again from a trusted archive")
    return present


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


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
