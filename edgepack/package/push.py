"""``edgepack push``: an image edgepack wrote (OCI layout or docker-archive tar) to a registry.

edgepack's own client by default (``registry.py``), or ``skopeo copy`` when asked for and installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ImageError, RegistryError, UnsupportedHere
from edgepack.package.oci import OCI_MANIFEST, REF_NAME, BlobStore, write_layout
from edgepack.package.registry import Reference, RegistryClient, push_layout

_SKOPEO_TIMEOUT_S = 1800


@dataclass(frozen=True)
class PushOptions:
    insecure: bool = False
    credentials: tuple[str, str] | None = None
    with_skopeo: bool = False
    timeout_s: float = 30.0


def push_image(image: Path, target: str, options: PushOptions) -> dict[str, Any]:
    """Push ``image`` to ``target`` (REGISTRY/REPO[:TAG]); the ref, digest and blob counts."""
    if not image.exists():
        raise ImageError(f"{image}: no such image", "give the .oci folder or the .image.tar that `edgepack build` wrote")
    ref = Reference.parse(target, default_tag=None)
    with tempfile.TemporaryDirectory(prefix="edgepack-push-") as temp:
        layout = image if image.is_dir() else _layout_of_archive(image, Path(temp) / "layout")
        tag = ref.reference or _layout_tag(layout)
        ref = Reference(ref.host, ref.repository, tag)
        if options.with_skopeo:
            return {"ref": str(ref), "digest": _skopeo_copy(layout, _layout_tag(layout), ref, options),
                    "uploaded": None, "skipped": None, "with": "skopeo"}
        client = RegistryClient(ref, insecure=options.insecure or None, timeout=options.timeout_s,
                                credentials=options.credentials, push=True)
        digest, uploaded, skipped = push_layout(layout, ref, client)
    return {"ref": str(ref), "digest": digest, "uploaded": uploaded, "skipped": skipped, "with": "edgepack"}


def _layout_tag(layout: Path) -> str:
    try:
        index = json.loads((layout / "index.json").read_text(encoding="utf-8"))
        return str(index["manifests"][0]["annotations"][REF_NAME])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise ImageError(f"{layout} is not an OCI layout with a tagged image",
                         "give the .oci folder that `edgepack build` wrote, or name the tag in REF") from None


def _layout_of_archive(archive: Path, root: Path) -> Path:
    """A docker-archive tar as a one-image OCI layout (layers gzipped as a base read would be)."""
    from edgepack.package.base_image import open_base
    from edgepack.package.oci import Blob

    (image,) = open_base(f"docker-archive:{archive}")
    store = BlobStore(root)
    for descriptor in image.layers:
        store.put_file(image.layer_file(descriptor), Blob(descriptor["digest"], int(descriptor["size"]),
                                                          descriptor["mediaType"]))
    config = store.put_json(image.config, "application/vnd.oci.image.config.v1+json")
    manifest = store.put_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
                               "layers": list(image.layers)}, OCI_MANIFEST)
    tag = str(image.config.get("config", {}).get("Labels", {}).get("org.opencontainers.image.version") or "latest")
    write_layout(root, [manifest.descriptor(annotations={REF_NAME: tag})])
    return root


def _skopeo_copy(layout: Path, tag: str, ref: Reference, options: PushOptions) -> str:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise UnsupportedHere("--with-skopeo: skopeo is not installed here",
                              "apt-get install skopeo, or drop --with-skopeo to use edgepack's own client")
    local = ref.host.split(":")[0] in ("localhost", "127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="edgepack-skopeo-") as temp:
        digest_file = Path(temp) / "digest"
        command = [skopeo, "copy", "--all", "--preserve-digests", "--digestfile", str(digest_file),
                   *(["--dest-tls-verify=false"] if options.insecure or local else []),
                   *(["--dest-creds", f"{options.credentials[0]}:{options.credentials[1]}"] if options.credentials
                     else []),
                   f"oci:{layout}:{tag}", f"docker://{ref}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_SKOPEO_TIMEOUT_S, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RegistryError(f"skopeo copy to {ref} took over {_SKOPEO_TIMEOUT_S} s", "check the registry") from None
        if done.returncode != 0:
            last = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            raise RegistryError(f"skopeo copy to {ref} failed: {last[-1][:200] if last else f'exit {done.returncode}'}",
                                "check the address, credentials and --insecure")
        return digest_file.read_text().strip()
