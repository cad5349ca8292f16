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


def base_args(bases: dict[str, str]) -> dict[str, str]:
    """The Dockerfile's ARG for each base and its default: BASE for one base, BASE_AMD64... for one per platform.

    The base is an ARG so that an engine can be given another name of the same image: podman stores a base
    read from ``oci:PATH`` under a name made from PATH, which a '.'-led folder (~/.cache) makes invalid.
    """
    if len(set(bases.values())) == 1:
        return {"BASE": next(iter(bases.values()))}
    return {f"BASE_{arch.upper()}": reference for arch, reference in bases.items()}


def dockerfile_text(bases: dict[str, str], env: dict[str, str], labels: dict[str, dict[str, str]],
                    config: dict[str, Any], deps_dir: str, app_dir: str) -> str:
    """``bases`` and ``labels``: by OCI architecture (amd64), the FROM reference and the labels of that platform."""
    first = next(iter(bases))
    args = base_args(bases)
    common = {key: value for key, value in labels[first].items() if all(other.get(key) == value
                                                                         for other in labels.values())}
    lines = ["# syntax=docker/dockerfile:1",
             "# Written by edgepack: the same files and config as the image it wrote itself.",
             f"#   podman build -f THIS_FILE --platform linux/{first} CONTEXT_FOLDER",
             "# (or docker build, which reads bases from registries only)",
             "# podman and buildah name a base read from oci:PATH after PATH: where PATH has a folder starting",
             "# with '.' or holding capitals, link it from a plain name and pass --build-arg BASE=oci:LINK:TAG.",
             f"ARG TARGETARCH={first}",
             *[f"ARG {name}={json.dumps(reference)}" for name, reference in args.items()]]
    if len(bases) == 1:
        lines.append("FROM ${BASE}")
    else:
        # A stage per platform, the one for the target architecture chosen by name: its own base, and the
        # labels that differ by platform (the base's digest, at least).
        for arch in bases:
            lines.append(f"FROM ${{{'BASE' if len(args) == 1 else f'BASE_{arch.upper()}'}}} AS base-{arch}")
            own = {key: value for key, value in labels[arch].items() if key not in common}
            if own:
                lines.append(_label(own))
        lines.append("FROM base-${TARGETARCH}")
    # The native config appends the base's PYTHONPATH to ours; ${VAR:+word} does the same where the base has one.
    ours = {key: value + "${PYTHONPATH:+:$PYTHONPATH}" if key == "PYTHONPATH" else value for key, value in env.items()}
    lines += [
        "ARG TARGETARCH",
        f"COPY --chown=0:0 {CONTEXT_DEPS.format(arch='${TARGETARCH}')}/ {deps_dir}/",
        f"COPY --chown=0:0 model.onnx {app_dir}/model.onnx",
        f"COPY --chown=0:0 app/ {app_dir}/",
        "ENV " + " ".join(f"{key}={json.dumps(value)}" for key, value in ours.items()),
        f"WORKDIR {config['WorkingDir']}",
        *[f"EXPOSE {port}" for port in sorted(config.get("ExposedPorts", {}))],
        _label(common),
        f"USER {config['User']}",
        f"ENTRYPOINT {json.dumps(config['Entrypoint'])}",
        "CMD []",
    ]
    return "\n".join(lines) + "\n"


def _label(labels: dict[str, str]) -> str:
    return "LABEL " + " \\\n      ".join(f"{json.dumps(key)}={json.dumps(value)}" for key, value in sorted(labels.items()))


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
    # An engine copies folders with their modes. The data filter leaves folder modes to the umask, as mkdir
    # does: set the native layers' 0755, or a umask of 077 would make /app unreadable to user 65532.
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return folder
