"""``edgepack verify``: archive safety, every checksum, and the manifest against its schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.manifest import parse_manifest
from edgepack.runtime.bundle import sha256_file, verify_archive


def verify_bundle(path: Path, max_unpacked_mb: float | None = None) -> dict[str, Any]:
    """``max_unpacked_mb``: how large the bundle may unpack to (None: ``EDGEPACK_MAX_UNPACKED_MB``,
    else 64 times the archive's size or 64 MiB; see ``edgepack.runtime.unpack_limits``)."""
    verified = verify_archive(path, max_unpacked_mb)
    manifest = parse_manifest(verified.manifest, str(path))
    return {
        "ok": True, "bundle": str(path), "sha256": sha256_file(path), "name": manifest.name,
        "version": manifest.version, "variant": manifest.variant, "profile": manifest.target.profile,
        "files": len(verified.sums),
    }
