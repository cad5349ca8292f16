"""The Dockerfile equivalent of a natively written image, and its build context.

``docker build -f NAME.Dockerfile NAME.context`` (or ``podman build``) makes the same filesystem and
config as edgepack's own writer: the base, the dependency tree for the target architecture, the
model, the app, then ENV/USER/ENTRYPOINT. The layer digests differ (each engine writes its own
tars), the content does not.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from edgepack.package.oci import BlobStore, open_layer

CONTEXT_DEPS = "deps-{arch}"


def dockerfile_text(bases: dict[str, Any], env: dict[str, str], labels: dict[str, str], config: dict[str, Any],
                    deps_dir: str, app_dir: str) -> str:
    """``bases``: OCI architecture (amd64) -> the FROM reference of that platform's base."""
    lines = ["# syntax=docker/dockerfile:1",
             "# Written by edgepack: the same files and config as the image it wrote itself.",
             f"#   docker build -f THIS_FILE --platform linux/{next(iter(bases))} CONTEXT_FOLDER"]
    first = next(iter(bases))
    lines.append(f"ARG TARGETARCH={first}")
    if len(set(bases.values())) == 1:
        lines.append(f"FROM {next(iter(bases.values()))}")
    else:
        # One base per platform: a stage each, the one for the target architecture chosen by name.
        lines += [f"FROM {reference} AS base-{arch}" for arch, reference in bases.items()]
        lines.append("FROM base-${TARGETARCH}")
    lines += [
        "ARG TARGETARCH",
        f"COPY --chown=0:0 {CONTEXT_DEPS.format(arch='${TARGETARCH}')}/ {deps_dir}/",
        f"COPY --chown=0:0 model.onnx {app_dir}/model.onnx",
        f"COPY --chown=0:0 app/ {app_dir}/",
        "ENV " + " ".join(f"{key}={json.dumps(value)}" for key, value in env.items()),
        f"WORKDIR {config['WorkingDir']}",
        *[f"EXPOSE {port}" for port in sorted(config.get("ExposedPorts", {}))],
        "LABEL " + " \\\n      ".join(f"{json.dumps(key)}={json.dumps(value)}" for key, value in sorted(labels.items())),
        f"USER {config['User']}",
        f"ENTRYPOINT {json.dumps(config['Entrypoint'])}",
        "CMD []",
    ]
    return "\n".join(lines) + "\n"


def write_context(folder: Path, store: BlobStore, deps_layers: dict[str, str], deps_dir: str,
                  model: bytes, app_files: dict[str, tuple[bytes, int]]) -> Path:
    """``folder``: ``deps-<arch>/`` unpacked from each dependency layer, ``model.onnx`` and ``app/``."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = deps_dir.strip("/") + "/"
    for arch, digest in deps_layers.items():
        target = folder / CONTEXT_DEPS.format(arch=arch)
        with open_layer(store.path(digest)) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.name.startswith(prefix):
                    continue
                member.name = member.name[len(prefix):]
                # The data filter refuses links out, absolute paths and devices, though the layer is ours.
                archive.extract(member, target, filter="data")
    (folder / "model.onnx").write_bytes(model)
    (folder / "model.onnx").chmod(0o644)
    for path, (data, mode) in sorted(app_files.items()):
        file = folder / "app" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        file.chmod(mode)
    return folder
