"""Who builds the image: edgepack's own writer (native), or a Docker or Podman engine from the Dockerfile.

Each builder says up front, before the long part of a build, whether it can run here, and how to
make it able to when it cannot. The native writer always can; an engine build comes on top of the
native outputs (the layout, the docker-archive tar), into the engine's own image store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgepack.errors import ImageError, UnsupportedHere

_ENGINE_TIMEOUT_S = 1800


class Builder(Protocol):
    name: str

    def check(self, bases: list[str]) -> None:
        """Raise UnsupportedHere (with install advice) when this builder cannot run here."""

    def build(self, dockerfile: Path, context: Path, tag: str, platforms: list[str]) -> str:
        """Build in the engine; the engine's image id (or manifest list name)."""


@dataclass(frozen=True)
class NativeBuilder:
    name: str = "native"

    def check(self, bases: list[str]) -> None:
        return None

    def build(self, dockerfile: Path, context: Path, tag: str, platforms: list[str]) -> str:
        return ""  # the native writer's layout is the build


@dataclass(frozen=True)
class DockerBuilder:
    name: str = "docker"

    def check(self, bases: list[str]) -> None:
        try:
            import docker
        except ImportError:
            raise UnsupportedHere("--builder docker needs the docker Python SDK, which is not installed",
                                  "pip install docker, or use --builder native") from None
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        try:
            docker.from_env(timeout=10).ping()
        except Exception as err:  # noqa: BLE001 - the SDK raises DockerException and requests' errors alike
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise UnsupportedHere(f"--builder docker cannot run here: no Docker engine answers at {where} ({reason})",
                                  "install and start Docker Engine (docs.docker.com/engine/install) or set "
                                  "DOCKER_HOST; or use --builder native, which needs no engine") from None
        local = [base for base in bases if base.startswith(("oci:", "docker-archive:"))]
        if local:
            raise ImageError(f"--builder docker cannot start FROM {local[0]}: Docker reads bases only from "
                             "registries and its own store",
                             "push the base to a registry, or use --builder podman or native")

    def build(self, dockerfile: Path, context: Path, tag: str, platforms: list[str]) -> str:
        import docker

        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        image, _ = client.images.build(path=str(context), dockerfile=str(dockerfile.resolve()), tag=tag,
                                       platform=platforms[0], rm=True, pull=False)
        return str(image.id)


@dataclass(frozen=True)
class PodmanBuilder:
    name: str = "podman"

    def check(self, bases: list[str]) -> None:
        podman = shutil.which("podman")
        if podman is None:
            raise UnsupportedHere("--builder podman cannot run here: podman is not installed",
                                  "apt-get install podman (Debian, Ubuntu) or dnf install podman; or use --builder native")
        try:
            done = subprocess.run([podman, "info", "--format", "json"], capture_output=True, text=True, timeout=60,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UnsupportedHere("--builder podman cannot run here: `podman info` did not answer in 60 s",
                                  "check podman's storage and runtime, or use --builder native") from None
        if done.returncode != 0:
            last = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            raise UnsupportedHere(f"--builder podman cannot run here: `podman info` failed "
                                  f"({last[-1][:160] if last else f'exit {done.returncode}'})",
                                  "fix podman's setup (see `podman info`), or use --builder native")

    def build(self, dockerfile: Path, context: Path, tag: str, platforms: list[str]) -> str:
        target = ["--manifest", tag] if len(platforms) > 1 else ["--tag", tag]
        command = ["podman", "build", "--platform", ",".join(platforms), *target, "--file", str(dockerfile),
                   str(context)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_ENGINE_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            last = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise UnsupportedHere(f"podman build failed: {last[-1][:200] if last else f'exit {done.returncode}'}",
                                  f"run it yourself to see why: {' '.join(command)}")
        if len(platforms) > 1:
            return tag
        inspect = subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True, timeout=60,
                                 check=False)
        try:
            return str(json.loads(inspect.stdout)[0]["Id"])
        except (ValueError, IndexError, KeyError):
            return tag


_BUILDERS = {"native": NativeBuilder(), "docker": DockerBuilder(), "podman": PodmanBuilder()}
BUILDER_NAMES = tuple(_BUILDERS)


def builder_for(name: str) -> Builder:
    if name not in _BUILDERS:
        raise ImageError(f"--builder {name!r} is not a builder", f"choose one of {', '.join(_BUILDERS)}")
    return _BUILDERS[name]
