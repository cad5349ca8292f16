"""The ``docker save`` format, written from an image in a blob store: ``docker load``/``podman load`` read it.

One tar with ``manifest.json`` (``[{"Config", "RepoTags", "Layers"}]``), the config as
``<config hex>.json``, each layer as its gzip blob, byte for byte, named ``<digest hex>.tar.gz``,
and the legacy ``repositories`` file. Deterministic like the layers: sorted, fixed times and owners.
``docker load`` and ``podman load`` detect compressed layers; keeping them compressed makes the
archive a third of the size and its writing a copy instead of a decompression (seconds for a
Python base).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from edgepack.package.bundle import source_date_epoch
from edgepack.package.oci import BlobStore


def write_docker_archive(store: BlobStore, manifest: dict[str, Any], repo_tag: str, target: Path) -> Path:
    """``target``: the image of ``manifest`` (its blobs in ``store``), tagged ``repo_tag`` (repo:tag)."""
    config_digest = manifest["config"]["digest"]
    config = store.read_json(config_digest)
    diff_ids = config["rootfs"]["diff_ids"]
    config_name = f"{config_digest.split(':')[1]}.json"
    layer_names = [f"{layer['digest'].split(':')[1]}.tar.gz" for layer in manifest["layers"]]
    repository, _, tag = repo_tag.rpartition(":")
    index = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    repositories = {repository: {tag: diff_ids[-1].split(":")[1]}} if diff_ids else {}
    mtime = source_date_epoch()
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        small = {config_name: store.read(config_digest),
                 "manifest.json": json.dumps(index, separators=(",", ":")).encode(),
                 "repositories": json.dumps(repositories, separators=(",", ":")).encode()}
        layers = dict(zip(layer_names, manifest["layers"]))
        for name in sorted({*small, *layers}):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = mtime, 0, 0, "", "", 0o644
            if name in small:
                info.size = len(small[name])
                archive.addfile(info, io.BytesIO(small[name]))
                continue
            layer = layers[name]
            info.size = int(layer["size"])
            with store.path(layer["digest"]).open("rb") as stream:
                archive.addfile(info, stream)
    return target
