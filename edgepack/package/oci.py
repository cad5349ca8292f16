"""OCI image building blocks with the standard library: blobs, deterministic layers, the image layout.

A layer is a tar written with sorted entries, one fixed mtime (``SOURCE_DATE_EPOCH``), owner 0:0
without names and fixed modes, gzipped with mtime 0 and no file name, so the same files always give
the same ``diff_id`` (digest of the tar) and ``digest`` (digest of the gzip). Blobs are written into
a staging folder under their digest; the caller renames the finished folder into place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Union

from edgepack.errors import IntegrityError, InputError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# Docker's media types name the same bytes as OCI's; an OCI image says it in OCI's words.
TO_OCI = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_LIST: OCI_INDEX, DOCKER_CONFIG: OCI_CONFIG,
          DOCKER_LAYER_GZIP: OCI_LAYER_GZIP}
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
# zlib's default: level 9 costs twice the time on the dependency layer for about 2% less size.
GZIP_LEVEL = 6

# A file for a layer: its bytes, or a path to copy from; ``None`` makes a directory.
Content = Union[bytes, Path, None]


@dataclass(frozen=True)
class Blob:
    """A blob in a store: its descriptor fields, and (layers) the digest and size of its tar."""

    digest: str
    size: int
    media_type: str
    diff_id: str | None = None
    uncompressed_size: int | None = None

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces: the same document always has the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_digest(digest: str, where: str) -> str:
    algorithm, _, hexa = digest.partition(":")
    if algorithm != "sha256" or len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
        raise IntegrityError(f"{where}: {digest!r} is not a sha256 digest", "the image is damaged; fetch it again")
    return hexa


class BlobStore:
    """``blobs/sha256/<hex>`` under ``root``: content-addressed, each blob written once."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = root
        self.folder = root / "blobs" / "sha256"
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.folder / check_digest(digest, str(self.root))

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_bytes(self, data: bytes, media_type: str) -> Blob:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            self._place(digest, lambda handle: handle.write(data))
        return Blob(digest, len(data), media_type)

    def put_json(self, value: Any, media_type: str) -> Blob:
        return self.put_bytes(canonical_json(value), media_type)

    def put_file(self, source: Path, blob: Blob) -> Blob:
        """A file whose digest the caller knows: hard-linked when it can be, else copied and checked."""
        if self.has(blob.digest):
            return blob
        try:
            os.link(source, self.path(blob.digest))
            return blob
        except OSError:
            pass  # another file system, or no links: copy and check
        with open(source, "rb") as reader:
            return self.put_stream(reader, blob)

    def put_stream(self, stream: BinaryIO, blob: Blob) -> Blob:
        """Bytes read from ``stream``, which must have ``blob``'s digest (checked before they land)."""
        if self.has(blob.digest):
            return blob
        hasher = hashlib.sha256()

        def copy(handle: BinaryIO) -> None:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
                handle.write(chunk)

        self._place(blob.digest, copy, hasher)
        return blob

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def read_json(self, digest: str) -> Any:
        try:
            return json.loads(self.read(digest))
        except (OSError, ValueError) as err:
            raise IntegrityError(f"{self.root}: blob {digest} is missing or not JSON ({err})",
                                 "the image layout is damaged; write it again") from None

    def _place(self, digest: str, write: Any, hasher: Any = None) -> None:
        handle, temp = tempfile.mkstemp(prefix=".blob-", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as out:
                write(out)
            if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
                raise IntegrityError(f"a blob copied into {self.root} does not have digest {digest}",
                                     "the source changed while it was read; build again")
            os.chmod(temp, 0o644)
            os.replace(temp, self.path(digest))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


class _Digesting(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.hasher, self.count = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.count += len(view)
        self.sink.write(view)
        return len(view)


@dataclass
class LayerEntries:
    """What goes into one layer, by path inside the image (no leading '/'); parents are added."""

    files: dict[str, tuple[Content, int]] = field(default_factory=dict)  # path -> (content, mode)

    def add(self, path: str, content: Content, mode: int = 0o644) -> None:
        clean = PurePosixPath(path.strip("/"))
        if not clean.parts or ".." in clean.parts:
            raise InputError(f"{path!r} is not a path inside an image", "use an absolute path such as /app/x")
        self.files[clean.as_posix()] = (content, mode)

    def add_tree(self, source: Path, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Every file and folder under ``source`` at ``prefix``; modes made 0755/0644 by the owner's x bit."""
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if relative.parts[0] in skip or "__pycache__" in relative.parts:
                continue
            if path.is_symlink():
                raise InputError(f"{path} is a link", "only plain files and folders go into image layers")
            name = f"{prefix.strip('/')}/{relative.as_posix()}"
            if path.is_dir():
                self.add(name, None, 0o755)
            else:
                self.add(name, path, 0o755 if path.stat().st_mode & 0o100 else 0o644)

    def sorted_entries(self) -> Iterator[tuple[str, Content, int]]:
        folders: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        everything = {**{name: (None, 0o755) for name in folders}, **self.files}
        for name in sorted(everything):
            content, mode = everything[name]
            yield name, content, mode


def write_layer(entries: LayerEntries, target: Path, mtime: int) -> Blob:
    """A deterministic gzip layer at ``target``; its digest, size, diff_id and tar size."""

    def add(archive: tarfile.TarFile) -> None:
        for name, content, mode in entries.sorted_entries():
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            info.mode = mode
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif isinstance(content, bytes):
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with open(content, "rb") as handle:
                    archive.addfile(info, handle)

    return write_tar_layer(target, add)


def write_tar_layer(target: Path, add: Callable[[tarfile.TarFile], None]) -> Blob:
    """A gzip layer at ``target`` holding what ``add`` puts in the tar; one pass gives digest and diff_id.

    gzip without name or time, so the bytes depend only on the tar ``add`` writes.
    """
    with open(target, "wb") as raw:
        compressed = _Digesting(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL) as zipped:
            tar_stream = _Digesting(zipped)  # type: ignore[arg-type]
            with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[arg-type]
                add(archive)
    return Blob("sha256:" + compressed.hasher.hexdigest(), compressed.count, OCI_LAYER_GZIP,
                "sha256:" + tar_stream.hasher.hexdigest(), tar_stream.count)


def open_layer(path: Path) -> BinaryIO:
    """A layer blob's tar stream, whether the blob is gzipped or a plain tar."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerScan:
    diff_id: str
    uncompressed_size: int
    names: tuple[str, ...]  # the regular files and links in it, for finding python3.X


def scan_layer(path: Path, wanted: Any = None) -> LayerScan:
    """The tar digest and size of a layer blob, and its member names that ``wanted(name)`` accepts."""
    hasher, size = hashlib.sha256(), 0
    names: list[str] = []
    try:
        with open_layer(path) as stream:
            counted = _Counting(stream, hasher)
            with tarfile.open(fileobj=counted, mode="r|") as archive:  # type: ignore[arg-type]
                for member in archive:
                    name = member.name.removeprefix("./")
                    if wanted is None or wanted(name):
                        names.append(name)
            while counted.read(_CHUNK):  # the tar's zero padding after its end marker counts too
                pass
            size = counted.count
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise IntegrityError(f"layer {path.name[:12]} of the base image is not a readable tar ({err})",
                             "the base image is damaged; fetch it again") from None
    return LayerScan("sha256:" + hasher.hexdigest(), size, tuple(names))


class _Counting(io.RawIOBase):
    def __init__(self, stream: BinaryIO, hasher: Any) -> None:
        self.stream, self.hasher, self.count = stream, hasher, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.hasher.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def write_layout(root: Path, manifests: list[dict[str, Any]]) -> None:
    """``oci-layout`` and ``index.json`` beside the blobs under ``root``; ``manifests`` are their descriptors."""
    (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (root / "index.json").write_bytes(canonical_json(index))


def replace_dir(staged: Path, target: Path) -> Path:
    """Put the finished folder ``staged`` at ``target``; an older one there is moved aside first."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, aside / target.name)
        os.rename(staged, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staged, target)
    return target


def iter_descriptors(index: dict[str, Any]) -> Iterable[dict[str, Any]]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise IntegrityError("an image index without a manifests list", "the base image is damaged")
    return manifests
