"""Base images: where they come from (an OCI layout, a docker-archive tar, a registry) and what they hold.

A base is named like skopeo names images: ``oci:PATH[:TAG]``, ``docker-archive:PATH`` or
``[docker://]REGISTRY/REPO[:TAG|@DIGEST]``. Each source lists the platform images it provides; the
image writer picks one per platform it builds and copies that image's blobs into its own layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import ImageError, IntegrityError
from edgepack.package.oci import (GZIP_LEVEL, INDEX_TYPES, MANIFEST_TYPES, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST,
                                  REF_NAME, TO_OCI, BlobStore, canonical_json, iter_descriptors)

_ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
_PLATFORM = re.compile(r"^linux/(amd64|arm64)(/v8)?$")
# Interpreters a base may run the runtime with: the official python images put them in
# /usr/local/bin, Debian and Ubuntu in /usr/bin.
_PYTHON_FILE = re.compile(r"^(?:usr/(?:local/)?)?bin/python(3\.[0-9]{1,2})$")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str  # OCI's words: amd64, arm64

    @classmethod
    def parse(cls, text: str) -> "Platform":
        if not _PLATFORM.match(text.strip()):
            raise ImageError(f"--platform {text!r} is not a platform edgepack builds for",
                             "give linux/amd64, linux/arm64 or both, comma-separated")
        os_name, architecture = text.strip().split("/")[:2]
        return cls(os_name, architecture)

    @property
    def arch(self) -> str:
        """The architecture in wheel tags' words (x86_64, aarch64)."""
        return _ARCHES[self.architecture]

    def oci(self) -> dict[str, str]:
        return {"architecture": self.architecture, "os": self.os, **({"variant": "v8"} if self.architecture == "arm64"
                                                                      else {})}

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}"


def parse_platforms(text: str) -> tuple[Platform, ...]:
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise ImageError("--platform is empty", "give linux/amd64, linux/arm64 or both, comma-separated")
    return tuple(dict.fromkeys(Platform.parse(part) for part in parts))


@dataclass(frozen=True)
class BaseImage:
    """One platform's image of a base: its manifest and config, and a way to copy its layers."""

    source: str  # as the user named it
    name: str  # for org.opencontainers.image.base.name
    digest: str  # the manifest's digest
    platform: Platform
    config: dict[str, Any]
    layers: tuple[dict[str, Any], ...]  # descriptors, OCI media types
    layer_file: Callable[[dict[str, Any]], Path]  # a local file holding a layer blob (fetched when need be)

    def python_versions(self, layer_names: list[tuple[str, ...]]) -> set[str]:
        """MAJOR.MINOR of every python3.X the base has: from its environment or its files."""
        found: set[str] = set()
        for entry in self.config.get("config", {}).get("Env") or []:
            key, _, value = str(entry).partition("=")
            if key == "PYTHON_VERSION" and re.match(r"^3\.[0-9]{1,2}", value):
                found.add(".".join(value.split(".")[:2]))
        for names in layer_names:
            for name in names:
                match = _PYTHON_FILE.match(name)
                if match:
                    found.add(match[1])
        return found


def python_file(name: str) -> bool:
    return bool(_PYTHON_FILE.match(name.removeprefix("./")))


def open_base(spec: str, timeout: float = 30.0, insecure: bool = False) -> list[BaseImage]:
    """Every platform image ``spec`` provides."""
    if spec.startswith("oci:"):
        path, tag = split_tag(spec[len("oci:"):])
        return _oci_layout(spec, Path(path), tag)
    if spec.startswith("docker-archive:"):
        return _docker_archive(spec, Path(spec[len("docker-archive:"):]))
    from edgepack.package.registry import pull_base

    return pull_base(spec.removeprefix("docker://"), timeout=timeout, insecure=insecure)


def split_tag(text: str) -> tuple[str, str | None]:
    """``PATH[:TAG]``: a colon after the last '/' starts the tag, as in skopeo."""
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail and head:
        return head, tail
    return text, None


def _oci_layout(spec: str, root: Path, tag: str | None) -> list[BaseImage]:
    if not (root / "index.json").is_file() or not (root / "oci-layout").is_file():
        raise ImageError(f"base image {spec}: {root} is not an OCI image layout (no index.json and oci-layout)",
                         "give oci:PATH[:TAG] of a layout written by skopeo, umoci or edgepack")
    store = BlobStore(root, create=False)
    index = _read_json(root / "index.json", spec)
    descriptors = list(iter_descriptors(index))
    tags = sorted({str(d.get("annotations", {}).get(REF_NAME)) for d in descriptors
                   if d.get("annotations", {}).get(REF_NAME)})
    if tag is not None:
        chosen = [d for d in descriptors if d.get("annotations", {}).get(REF_NAME) == tag]
        if not chosen:
            raise ImageError(f"base image {spec}: no image tagged {tag!r} in {root}",
                             f"tags there: {', '.join(tags) or 'none'}")
    elif len(descriptors) == 1:
        chosen = descriptors
    else:
        raise ImageError(f"base image {spec}: {root} holds {len(descriptors)} images and no tag was given",
                         f"name one: oci:{root}:TAG with TAG one of {', '.join(tags) or '(untagged)'}")
    name = f"{root.name}:{tag}" if tag else root.name

    def layer_file(descriptor: dict[str, Any]) -> Path:
        if not store.has(descriptor["digest"]):
            raise ImageError(f"base image {spec}: layer {descriptor['digest']} is missing from {root}",
                             "copy the layout again, completely")
        return store.path(descriptor["digest"])

    return _expand(spec, name, chosen[0], store.read, layer_file)


def _expand(spec: str, name: str, descriptor: dict[str, Any], read: Callable[[str], bytes],
            layer_file: Callable[[dict[str, Any]], Path]) -> list[BaseImage]:
    """The platform images behind a descriptor: itself when a manifest, its children when an index."""
    media_type = descriptor.get("mediaType")
    data = _read_blob(read, descriptor["digest"], spec)
    if media_type in INDEX_TYPES:
        children = [d for d in iter_descriptors(json.loads(data)) if d.get("mediaType") in MANIFEST_TYPES
                    and d.get("platform", {}).get("os") not in (None, "unknown")]
        return [image for child in children for image in _expand(spec, name, child, read, layer_file)]
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"base image {spec}: {descriptor['digest']} is a {media_type}, not an image",
                         "give an image or an image index")
    manifest = json.loads(data)
    config = json.loads(_read_blob(read, manifest["config"]["digest"], spec))
    layers = tuple({**layer, "mediaType": TO_OCI.get(layer["mediaType"], layer["mediaType"])}
                   for layer in manifest.get("layers", []))
    platform = Platform(str(config.get("os", "linux")), str(config.get("architecture", "")))
    return [BaseImage(spec, name, descriptor["digest"], platform, config, layers, layer_file)]


def _read_blob(read: Callable[[str], bytes], digest: str, spec: str) -> bytes:
    try:
        data = read(digest)
    except OSError:
        raise ImageError(f"base image {spec}: blob {digest} is missing", "copy the image again, completely") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"base image {spec}: blob {digest} does not match its digest",
                             "the base image is damaged; fetch it again")
    return data


def _read_json(path: Path, spec: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ImageError(f"base image {spec}: cannot read {path} ({err})", "check the path") from None


def _docker_archive(spec: str, path: Path) -> list[BaseImage]:
    """A ``docker save``/``skopeo copy`` tar: manifest.json naming the config and the layer tars."""
    if not path.is_file():
        raise ImageError(f"base image {spec}: no such file {path}", "give docker-archive:PATH of a `docker save` tar")
    try:
        with tarfile.open(path) as archive:
            entries = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
            first = entries[0]
            config_bytes = archive.extractfile(first["Config"]).read()  # type: ignore[union-attr]
            layer_names = list(first["Layers"])
    except (OSError, tarfile.TarError, KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise ImageError(f"base image {spec}: not a docker-archive tar ({type(err).__name__}: {err})",
                         "make one with `docker save` or `skopeo copy ... docker-archive:FILE`") from None
    config = json.loads(config_bytes)
    diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
    if len(diff_ids) != len(layer_names):
        raise IntegrityError(f"base image {spec}: {len(layer_names)} layers but {len(diff_ids)} diff_ids",
                             "the archive is damaged; save it again")
    # Layers are plain tars there (gzipped in newer docker saves); an OCI image carries them gzipped,
    # compressed here with fixed settings so the same archive gives the same blobs.
    layers = []
    compressed: dict[str, bytes] = {}
    with tarfile.open(path) as archive:
        for member, diff_id in zip(layer_names, diff_ids):
            raw = archive.extractfile(member).read()  # type: ignore[union-attr]
            zipped = raw[:2] == b"\x1f\x8b"
            data = raw if zipped else gzip.compress(raw, GZIP_LEVEL, mtime=0)
            if "sha256:" + hashlib.sha256(gzip.decompress(raw) if zipped else raw).hexdigest() != diff_id:
                raise IntegrityError(f"base image {spec}: layer {member} does not match its diff_id",
                                     "the archive is damaged; save it again")
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            compressed[digest] = data
            layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(data)})
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": layers}
    manifest_bytes = canonical_json(manifest)
    blobs = {config_digest: config_bytes, **compressed,
             "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(): manifest_bytes}

    from edgepack.package.wheels import cache_root

    cache = BlobStore(cache_root() / "blobs")

    def layer_file(descriptor: dict[str, Any]) -> Path:
        cache.put_bytes(blobs[descriptor["digest"]], descriptor["mediaType"])
        return cache.path(descriptor["digest"])

    descriptor = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                  "size": len(manifest_bytes)}
    return _expand(spec, path.name, descriptor, lambda digest: blobs[digest], layer_file)
