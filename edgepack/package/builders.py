"""Who builds the image: edgepack's own writer (native), or a Docker or Podman engine from the Dockerfile.

Each builder says up front, before the long part of a build, whether it can run here, and how to
make it able to when it cannot. The native writer always can; an engine build comes on top of the
native outputs (the layout, the docker-archive tar), into the engine's own image store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgepack.errors import ImageError, UnsupportedHere
from edgepack.package.base_image import split_tag

# A build only copies files (no RUN step): minutes on a slow disk. Past this it is stuck, not slow.
_ENGINE_TIMEOUT_S = 1800
_QUERY_TIMEOUT_S = 60  # podman info, image lookups and untags


@dataclass(frozen=True)
class EngineBuild:
    """What an engine builds: the written Dockerfile and context, named and stamped like the native image."""

    dockerfile: Path
    context: Path
    tag: str  # edgepack/NAME:VERSION, as in the docker-archive
    platforms: tuple[str, ...]  # linux/amd64, ...
    base_args: Mapping[str, str]  # the Dockerfile's base ARGs and their defaults (see dockerfile.base_args)
    annotations: Mapping[str, str]  # the native manifest's, those every platform has alike
    timestamp: int  # SOURCE_DATE_EPOCH: the native image's created time and file times


class Builder(Protocol):
    name: str

    def check(self, bases: list[str]) -> None:
        """Raise UnsupportedHere (with install advice) when this builder cannot run here."""

    def build(self, request: EngineBuild) -> str:
        """Build in the engine; the engine's image id (or manifest list name)."""


@dataclass(frozen=True)
class NativeBuilder:
    name: str = "native"

    def check(self, bases: list[str]) -> None:
        return None

    def build(self, request: EngineBuild) -> str:
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
            raise UnsupportedHere(f"--builder docker cannot run here: no Docker engine answers at {where} "
                                  f"({_first_line(err)})",
                                  "install and start Docker Engine (docs.docker.com/engine/install) or set "
                                  "DOCKER_HOST; or use --builder native, which needs no engine") from None
        local = [base for base in bases if base.startswith(("oci:", "docker-archive:"))]
        if local:
            raise ImageError(f"--builder docker cannot start FROM {local[0]}: Docker reads bases only from "
                             "registries and its own store",
                             "push the base to a registry, or use --builder podman or native")

    def build(self, request: EngineBuild) -> str:
        import docker

        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        try:
            image, _ = client.images.build(path=str(request.context), dockerfile=str(request.dockerfile.resolve()),
                                           tag=request.tag, platform=request.platforms[0], rm=True, pull=False,
                                           network_mode="none")
        except Exception as err:  # noqa: BLE001 - BuildError, APIError and requests' timeouts alike
            raise ImageError(f"docker build failed: {_first_line(err)}",
                             f"build it yourself to see the whole log: docker build -f {request.dockerfile} "
                             f"{request.context}") from None
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
            done = subprocess.run([podman, "info", "--format", "json"], capture_output=True, text=True,
                                  timeout=_QUERY_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UnsupportedHere(f"--builder podman cannot run here: `podman info` did not answer in "
                                  f"{_QUERY_TIMEOUT_S} s", "check podman's storage and runtime, or use --builder native"
                                  ) from None
        if done.returncode != 0:
            raise UnsupportedHere(f"--builder podman cannot run here: `podman info` failed "
                                  f"({_last_line(done.stderr) or f'exit {done.returncode}'})",
                                  "fix podman's setup (see `podman info`), or use --builder native")

    def build(self, request: EngineBuild) -> str:
        podman = shutil.which("podman") or "podman"
        # podman stores a base it reads from oci:PATH under the name localhost/PATH, which is no valid name
        # when PATH has a '.'-led folder (~/.cache) or capitals; a relative oci:LINK, LINK a plain-named
        # symlink in podman's working folder, gives the same image a name that always is.
        with tempfile.TemporaryDirectory(prefix="edgepack-podman-") as folder:
            links = Path(folder)
            base_args = dict(request.base_args)
            for arg, reference in request.base_args.items():
                if reference.startswith("oci:"):
                    path, tag = split_tag(reference[len("oci:"):])
                    link = f"edgepack-base-{uuid.uuid4().hex[:12]}"
                    (links / link).symlink_to(Path(path).resolve())
                    base_args[arg] = f"oci:{link}" + (f":{tag}" if tag else "")
            try:
                return _podman_build(podman, request, base_args, links)
            finally:
                for arg, reference in base_args.items():
                    if reference != request.base_args[arg]:
                        _forget_name(podman, "localhost/" + split_tag(reference[len("oci:"):])[0])


def _podman_build(podman: str, request: EngineBuild, base_args: dict[str, str], workdir: Path) -> str:
    multi = len(request.platforms) > 1
    iidfile = workdir / "image-id"
    local = all(reference.startswith(("oci:", "docker-archive:")) for reference in base_args.values())
    # --manifest adds to a list of that name: one left by an earlier build would keep its images too.
    if multi and _podman(podman, "manifest", "exists", request.tag).returncode == 0:
        _podman(podman, "manifest", "rm", request.tag)
    command = [
        podman, "build", "--file", str(request.dockerfile.resolve()), "--platform", ",".join(request.platforms),
        *(["--manifest", request.tag] if multi else ["--tag", request.tag, "--iidfile", str(iidfile)]),
        # Bases on disk never need a registry; a registry base is pinned by digest, fetched when missing.
        f"--pull={'never' if local else 'missing'}",
        "--network=none",  # nothing runs in the build; nothing should reach out
        "--layers=true",  # deps, model and app each a layer, as in the native image (BUILDAH_LAYERS may say no)
        "--identity-label=false",  # io.buildah.version is not in the native config
        # The native created time, also given to every file the build adds (as the native layers have them).
        "--timestamp", str(request.timestamp),
        *[arg for name, value in base_args.items() for arg in ("--build-arg", f"{name}={value}")],
        *[arg for key, value in sorted(request.annotations.items()) for arg in ("--annotation", f"{key}={value}")],
        str(request.context.resolve()),
    ]
    log = request.dockerfile.with_name(request.dockerfile.name.removesuffix(".Dockerfile") + ".podman-build.log")
    # The caller's environment (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, ...) chooses podman's store and setup.
    with open(log, "w", encoding="utf-8") as output:
        try:
            done = subprocess.run(command, cwd=workdir, env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=_ENGINE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ImageError(f"podman build did not finish within {_ENGINE_TIMEOUT_S} s",
                             f"its output so far is in {log}") from None
    if done.returncode != 0:
        last = _last_line(log.read_text(encoding="utf-8", errors="replace")) or f"exit {done.returncode}"
        raise ImageError(f"podman build failed: {last}", f"its whole output is in {log}")
    log.unlink()
    if multi:
        return request.tag
    return iidfile.read_text().strip().removeprefix("sha256:")


def _forget_name(podman: str, repository: str) -> None:
    """Remove the names podman gave a base under ``repository``; the image stays, the parent of ours."""
    listed = _podman(podman, "images", "--filter", f"reference={repository}", "--format", "{{.Repository}}:{{.Tag}}")
    for name in {line.strip() for line in listed.stdout.splitlines() if line.strip().startswith(repository + ":")}:
        # With no NAME after the image, `podman untag` removes every name the image has, others' too.
        _podman(podman, "untag", name, name)


def _podman(podman: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([podman, *args], capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([podman, *args], 124, "", f"no answer within {_QUERY_TIMEOUT_S} s")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


_BUILDERS = {"native": NativeBuilder(), "docker": DockerBuilder(), "podman": PodmanBuilder()}
BUILDER_NAMES = tuple(_BUILDERS)


def builder_for(name: str) -> Builder:
    if name not in _BUILDERS:
        raise ImageError(f"--builder {name!r} is not a builder", f"choose one of {', '.join(_BUILDERS)}")
    return _BUILDERS[name]
