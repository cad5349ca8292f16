"""The image config, labels and annotations of an edgepack image, made from its base's config."""

from __future__ import annotations

from typing import Any

from edgepack.package.base_image import BaseImage

APP_DIR = "/app"
PORT = 8080
# A fixed non-root id ("nonroot" in distroless images): the server needs no privilege, and every
# file edgepack adds is world-readable so this user can read them without existing in /etc/passwd.
USER = "65532:65532"
ENTRYPOINT = ["python3", "-m", "runtime", "serve"]
# The config keys of the OCI image spec; Docker's extras (container_config, docker_version, ...)
# describe how the base was built, not this image.
_OCI_KEYS = ("author", "architecture", "os", "os.version", "os.features", "variant")


def image_env(base_env: list[str], deps_dir: str) -> tuple[list[str], dict[str, str]]:
    """The base's environment (PATH kept) with ours set over it; also ours alone, for the Dockerfile."""
    ours = {"PYTHONPATH": f"{deps_dir}:{APP_DIR}", "PORT": str(PORT), "PYTHONDONTWRITEBYTECODE": "1"}
    merged: dict[str, str] = {}
    for entry in base_env:
        key, _, value = str(entry).partition("=")
        merged[key] = value
    if merged.get("PYTHONPATH"):
        ours["PYTHONPATH"] += ":" + merged["PYTHONPATH"]
    merged.update(ours)
    return [f"{key}={value}" for key, value in merged.items()], ours


def image_labels(name: str, version: str, created: str, base: BaseImage, model_sha256: str, sbom_sha256: str,
                 description: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.base.name": base.name,
        "org.opencontainers.image.base.digest": base.digest,
        "dev.edgepack.model.sha256": model_sha256,
        "dev.edgepack.sbom.sha256": sbom_sha256,
    }


def image_config(base: BaseImage, diff_ids: list[str], labels: dict[str, str], created: str,
                 deps_dir: str, added: list[str]) -> dict[str, Any]:
    """``added``: what made each of our layers, for the history."""
    inner = dict(base.config.get("config") or {})
    env, _ = image_env(list(inner.get("Env") or []), deps_dir)
    # The base's Cmd (["python3"] in python images) would become arguments of our entrypoint.
    inner.pop("Cmd", None)
    inner.update({
        "Env": env, "Entrypoint": list(ENTRYPOINT), "WorkingDir": APP_DIR, "User": USER,
        "ExposedPorts": {**(inner.get("ExposedPorts") or {}), f"{PORT}/tcp": {}},
        "Labels": {**(inner.get("Labels") or {}), **labels},
    })
    config: dict[str, Any] = {key: base.config[key] for key in _OCI_KEYS if key in base.config}
    config.update({"created": created, "architecture": base.platform.architecture, "os": base.platform.os,
                   "config": inner, "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    history = list(base.config.get("history") or [])
    base_layers = len(diff_ids) - len(added)
    # History must pair with the layers: extend it only when the base's does (or the base has none).
    if sum(not entry.get("empty_layer") for entry in history) == base_layers:
        config["history"] = history + [{"created": created, "created_by": f"edgepack: {what}", "comment": "edgepack"}
                                       for what in added]
    return config
