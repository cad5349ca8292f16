"""How much a bundle may unpack to, and a decompressed stream that refuses to go past it.

A gzip tar is read as a stream: a 1 GiB file of zeros is a 1 MB archive, so what an archive may
hold is bounded by its own size unless the user raises it. ``EDGEPACK_MAX_UNPACKED_MB`` (or the
``max_unpacked_mb`` argument) sets an absolute limit instead.

Standard library only: this runs on the device before numpy exists.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from .errors import InputError, IntegrityError

MAX_UNPACKED_ENV = "EDGEPACK_MAX_UNPACKED_MB"
UNPACKED_RATIO = 64  # by default an archive unpacks to at most 64x its own size ...
UNPACKED_FLOOR = 64 << 20  # ... or 64 MiB, whichever is larger (a tiny bundle of text compresses well)
METADATA_CAP = 8 << 20  # SHA256SUMS and manifest.json are read into memory: a few KiB in practice
_HEADERS_ALLOWANCE = 16 << 20  # tar headers and padding on top of the files' own bytes
READ_CAP = 1 << 20  # the largest single read: our chunks, tar headers; a bigger pax header is a bomb


def unpacked_limit(archive_size: int, max_unpacked_mb: float | None = None) -> int:
    """The most bytes an archive of ``archive_size`` bytes may unpack to: the argument, else the
    environment variable, else the larger of ``UNPACKED_RATIO`` times its size and ``UNPACKED_FLOOR``."""
    source = "max_unpacked_mb"
    if max_unpacked_mb is None and (text := os.environ.get(MAX_UNPACKED_ENV, "").strip()):
        source = MAX_UNPACKED_ENV
        try:
            max_unpacked_mb = float(text)
        except ValueError:
            max_unpacked_mb = -1.0
    if max_unpacked_mb is None:
        return max(UNPACKED_RATIO * archive_size, UNPACKED_FLOOR)
    if not max_unpacked_mb > 0 or max_unpacked_mb == float("inf"):
        raise InputError(f"{source} {max_unpacked_mb!r}: expected a positive number of MiB",
                         f"e.g. {MAX_UNPACKED_ENV}=4096 lets a bundle unpack to 4 GiB")
    return int(max_unpacked_mb * (1 << 20))


def too_large(where: str, what: str, size: int, limit: int) -> IntegrityError:
    return IntegrityError(
        f"{where}: {what} would unpack to {size / (1 << 20):.1f} MiB, past the limit of "
        f"{limit / (1 << 20):.1f} MiB (a bundle that unpacks to far more than its own size is a bomb)",
        f"if this bundle is trusted and really that large, set {MAX_UNPACKED_ENV} to a larger limit",
    )


class CappedStream:
    """A decompressed stream for ``tarfile``: no single read past ``READ_CAP`` and no position past
    ``limit`` plus room for headers, so neither a tar header nor a member can make it hold or
    decompress more than that. Seeking past the cap is refused before anything is decompressed."""

    def __init__(self, raw: BinaryIO, limit: int, where: str) -> None:
        self._raw = raw
        self._limit = limit
        self._cap = limit + _HEADERS_ALLOWANCE
        self._where = where

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > READ_CAP:
            raise IntegrityError(
                f"{self._where}: an archive header asks for {'all' if size is None or size < 0 else size} "
                f"bytes at once (at most {READ_CAP} are read at a time)",
                "the archive is malformed or a decompression bomb; do not unpack it")
        data = self._raw.read(size)
        self._check(self._raw.tell())
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._raw.tell()
        elif whence != os.SEEK_SET:
            raise OSError("a decompressed bundle stream can only seek from its start")
        self._check(offset)
        return self._raw.seek(offset)

    def tell(self) -> int:
        return self._raw.tell()

    def _check(self, position: int) -> None:
        if position > self._cap:
            raise too_large(self._where, "the archive", position, self._limit)
