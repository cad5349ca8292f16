"""A CycloneDX 1.5 JSON SBOM of an image: every wheel in its dependency layer(s) and the model.

Deterministic like the image: the timestamp is ``SOURCE_DATE_EPOCH`` and the serial number is
derived from the content (CycloneDX asks for a fresh UUID per BOM, but then two builds of the same
inputs could not give the same files; the content-derived UUID is still unique per content).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import edgepack
from edgepack.package.bundle import source_date_epoch
from edgepack.package.wheels import WheelSet, parse_wheel_name


def created_at() -> str:
    return datetime.fromtimestamp(source_date_epoch(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pypi_purl(name: str, version: str, file_name: str | None = None) -> str:
    # The purl spec for PyPI: lowercase, '_' as '-'; file_name tells builds of one version apart.
    normalized = re.sub(r"[-_.]+", "-", name).lower()
    return f"pkg:pypi/{normalized}@{version}" + (f"?file_name={file_name}" if file_name else "")


def image_sbom(name: str, version: str, model_sha256: str, wheel_sets: dict[str, WheelSet]) -> bytes:
    """``wheel_sets``: platform (linux/amd64) -> the wheels installed in that platform's image."""
    components: list[dict[str, Any]] = [{
        "type": "machine-learning-model", "bom-ref": f"model:{name}@{version}", "name": name, "version": version,
        "hashes": [{"alg": "SHA-256", "content": model_sha256}],
    }]
    for platform, wheels in sorted(wheel_sets.items()):
        for file_name, data in sorted(wheels.wheels.items()):
            package, package_version, _, _ = parse_wheel_name(file_name)
            purl = pypi_purl(package, package_version, file_name)
            components.append({
                "type": "library", "bom-ref": purl, "name": package, "version": package_version, "purl": purl,
                "hashes": [{"alg": "SHA-256", "content": hashlib.sha256(data).hexdigest()}],
                "properties": [{"name": "dev.edgepack:platform", "value": platform},
                               {"name": "dev.edgepack:path", "value": "/opt/edgepack/deps"}],
            })
    body: dict[str, Any] = {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "metadata": {
            "timestamp": created_at(),
            "tools": {"components": [{"type": "application", "name": "edgepack", "version": edgepack.__version__}]},
            "component": {"type": "container", "bom-ref": f"image:{name}@{version}", "name": f"edgepack/{name}",
                          "version": version},
        },
        "components": components,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body["serialNumber"] = f"urn:uuid:{uuid.UUID(digest[:32], version=5)}"
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
