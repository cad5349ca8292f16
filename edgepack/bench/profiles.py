"""Device profiles: ``targets/*.toml``, validated once on load (unknown keys are an error)."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgepack.errors import InputError, UnsupportedHere
from edgepack.toml_files import read_toml, validate

# The repository's targets/ (editable installs), unless EDGEPACK_TARGETS points elsewhere.
TARGETS_DIR = Path(os.environ.get("EDGEPACK_TARGETS") or Path(__file__).resolve().parents[2] / "targets")
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeSettings(_Strict):
    version: str = Field(description="oldest onnxruntime the target ships; fixes the opset")
    threads: int = Field(0, ge=0, description="intra-op threads; 0 = one per core")
    inter_op_threads: int = Field(1, ge=1)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


class Budgets(_Strict):
    max_p99_ms: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)


class ImageSettings(_Strict):
    """``[image]`` of a cloud profile: what its container image is built on."""

    base: str | None = Field(None, min_length=1, description="oci:PATH[:TAG], docker-archive:PATH or REGISTRY/REPO:TAG")
    python: str | None = Field(None, pattern=r"^3\.[0-9]{1,2}$", description="the base's Python, when it does not say")
    platforms: tuple[Literal["linux/amd64", "linux/arm64"], ...] = Field(("linux/amd64",), min_length=1)


class Profile(_Strict):
    name: str
    description: str
    kind: Literal["cloud", "edge"]
    arch: Literal["x86_64", "aarch64"]
    aliases: tuple[str, ...] = ()
    cpus: int = Field(0, ge=0, description="cores the model may use; 0 = all, no pinning")
    cpu_quota: float | None = Field(None, gt=0, description="cores' worth of CPU time (0.5 = half a core); "
                                                            "unset: cpus, or none when cpus = 0")
    memory_mb: int | None = Field(None, gt=0)
    python: str | None = Field(None, pattern=r"^3\.[0-9]{1,2}$",
                               description="the device's Python, MAJOR.MINOR: the wheels `--arch` bundles carry")
    onnxruntime: RuntimeSettings
    budgets: Budgets = Budgets()
    image: ImageSettings | None = None
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _quota_within_cores(self) -> Profile:
        if self.cpu_quota is not None and self.cpus and self.cpu_quota > self.cpus:
            raise ValueError(f"cpu_quota {self.cpu_quota:g} is more than the {self.cpus} core(s) of cpus; "
                             "lower cpu_quota or raise cpus")
        return self

    @model_validator(mode="after")
    def _image_for_cloud(self) -> Profile:
        if self.image is not None and self.kind != "cloud":
            raise ValueError("[image] is for cloud profiles (kind = \"cloud\"); edge profiles ship bundles")
        return self

    def quota_cores(self) -> float | None:
        """The CPU time the model may use, in cores' worth: ``cpu_quota``, else ``cpus``; None when unlimited."""
        return self.cpu_quota if self.cpu_quota is not None else (float(self.cpus) if self.cpus else None)

    def runnable_here(self) -> bool:
        return self.arch == host_arch()

    def require_runnable_here(self) -> None:
        if not self.runnable_here():
            raise UnsupportedHere(
                f"profile {self.name} is {self.arch} and this host is {host_arch()}: "
                "it can be benchmarked only on the device",
                "copy the bundle there, unpack it and run `python -m runtime.bench`",
            )

    def emulation_summary(self) -> str:
        from edgepack.bench.isolation import availability

        if not self.runnable_here():
            return f"device only ({self.arch})"
        parts = [f"{self.onnxruntime.threads or 'all'} thread(s)"]
        if self.cpus:
            parts.append(f"pinned to {self.cpus} core(s)")
        cgroups = availability() if self.quota_cores() or self.memory_mb else {}
        if self.quota_cores():
            parts.append(f"CPU quota {self.quota_cores():g} core(s) {_via(cgroups['cpu'])}")
        if self.memory_mb:
            parts.append(f"{self.memory_mb} MB {_via(cgroups['memory'])}")
        return "emulated: " + ", ".join(parts)


def _via(state: str) -> str:
    return state if state.startswith("not enforced") else f"via {state}"


def host_arch() -> str:
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def load_profile_file(path: Path) -> Profile:
    data = read_toml(path, "profile")
    return validate(Profile, {**data, "source": path}, path, "see targets/README.md for the profile keys")


@cache
def builtin_profiles() -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    files = sorted(TARGETS_DIR.glob("*.toml"))
    if not files:
        raise InputError(f"no device profiles found in {TARGETS_DIR}",
                         "install edgepack from its repository (pip install -e .) or set EDGEPACK_TARGETS")
    for path in files:
        profile = load_profile_file(path)
        for key in (profile.name, *profile.aliases):
            if key in profiles:
                raise InputError(f"{path}: name {key!r} is already used by another profile",
                                 "give each profile and alias a unique name")
            profiles[key] = profile
    return profiles


def resolve_profile(name_or_path: str) -> Profile:
    """A profile by name or alias (``edge``, ``cloud``), or a path to a TOML file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_profile_file(Path(name_or_path))
    profiles = builtin_profiles()
    if name_or_path not in profiles:
        known = ", ".join(sorted(profiles))
        raise InputError(f"unknown profile {name_or_path!r}", f"choose one of: {known}, or a .toml path")
    return profiles[name_or_path]


def all_profiles() -> list[Profile]:
    unique = {p.name: p for p in builtin_profiles().values()}
    return [unique[name] for name in sorted(unique)]
