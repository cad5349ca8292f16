"""Tiny base images for the image tests, written in the test: no registry, no engine.

A base is one layer with a stand-in ``/usr/bin/python3.X`` (enough for the writer, which runs
nothing in the image) and a config like the official python images' (PATH, a Cmd to drop). Each
is checked by skopeo in the tests before anything is built on it.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.package.oci import (OCI_INDEX, OCI_MANIFEST, REF_NAME, BlobStore, LayerEntries, write_layer,
                                  write_layout)

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _platform_manifest(store: BlobStore, root: Path, architecture: str, files: dict[str, bytes],
                       env: list[str]) -> dict:
    entries = LayerEntries()
    entries.add("etc/os-release", b'PRETTY_NAME="edgepack test base"\n')
    entries.add("tmp", None, 0o777)
    for path, data in files.items():
        entries.add(path, data, 0o755)
    layer_file = root / f".layer-{architecture}"
    layer = write_layer(entries, layer_file, 0)
    store.put_file(layer_file, layer)
    layer_file.unlink()
    config = {"architecture": architecture, "os": "linux", "created": "1970-01-01T00:00:00Z",
              "config": {"Env": [PATH_ENV, *env], "Cmd": ["python3"], "Labels": {"base.label": "kept"}},
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
              "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "test base layer"}]}
    config_blob = store.put_json(config, "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_blob.descriptor(),
                "layers": [layer.descriptor()]}
    platform = {"architecture": architecture, "os": "linux", **({"variant": "v8"} if architecture == "arm64" else {})}
    return store.put_json(manifest, OCI_MANIFEST).descriptor(platform=platform)


def make_base(root: Path, tag: str = "base", architectures: tuple[str, ...] = ("amd64",), python: str | None = "3.11",
              env: tuple[str, ...] = ()) -> str:
    """An OCI layout at ``root``: one image, or an index when several architectures; ``oci:ROOT:TAG``."""
    store = BlobStore(root)
    files = {f"usr/bin/python{python}": b"#!/bin/sh\necho stand-in\n"} if python else {}
    descriptors = [_platform_manifest(store, root, arch, files, list(env)) for arch in architectures]
    if len(descriptors) == 1:
        top = descriptors[0]
    else:
        top = store.put_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors},
                             OCI_INDEX).descriptor()
    write_layout(root, [{**top, "annotations": {REF_NAME: tag}}])
    return f"oci:{root}:{tag}"
