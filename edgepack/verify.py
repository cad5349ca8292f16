"""``edgepack verify``: archive safety, every checksum, and the manifest against its schema."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from edgepack.manifest import parse_manifest
from edgepack.runtime.bundle import verify_archive


def verify_bundle(path: Path) -> dict[str, Any]:
    verified = verify_archive(path)
    manifest = parse_manifest(verified.manifest, str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {
        "ok": True, "bundle": str(path), "sha256": digest.hexdigest(), "name": manifest.name,
        "version": manifest.version, "variant": manifest.variant, "profile": manifest.target.profile,
        "files": len(verified.sums),
    }
