"""Platform wheels for a bundle: onnxruntime and numpy for the device's architecture and Python.

They come from ``pip download`` (binary only, for the target's manylinux tags), are never installed
here, and are kept in a cache. The versions pip resolves the first time are pinned in a lock file
beside them, so every later build with the same inputs takes the same wheels, offline, and gives a
byte-identical bundle. Only numpy and onnxruntime are fetched: ``import onnxruntime`` and
``InferenceSession.run`` need nothing else (coloredlogs, flatbuffers, packaging, protobuf and sympy,
which onnxruntime's metadata asks for, serve only its tools and the training packages).

A request with ``serve=True`` (cloud images) adds the HTTP stack of ``runtime/requirements.py``
resolved with its dependencies (uvicorn brings click and h11), still numpy and onnxruntime without
theirs, pinned in a lock of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgepack.errors import EdgepackError, ExitCode, InputError, IntegrityError
from edgepack.runtime.files import write_atomic
from edgepack.runtime.requirements import SERVE

if TYPE_CHECKING:
    from edgepack.bench.profiles import Profile

ARCHES = ("x86_64", "aarch64")
DEFAULT_PYTHON = "3.11"
PYTHON_VERSION = re.compile(r"^3\.[0-9]{1,2}$")
PACKAGES = ("numpy", "onnxruntime")
_ORT_VERSION = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
# onnxruntime releases before 1.19 are built against numpy 1.x and fail to import with numpy 2.
_FIRST_ORT_FOR_NUMPY2 = (1, 19)
_PIP_TIMEOUT_S = 900  # the whole download; pip's own --timeout bounds each read
_NETWORK_TROUBLE = ("failed to establish a new connection", "temporary failure in name resolution",
                    "name or service not known", "max retries exceeded", "network is unreachable",
                    "connection refused", "connecttimeout", "read timed out", "proxyerror", "sslerror",
                    "no route to host", "connection reset")


class WheelsUnavailable(InputError):
    """No wheels of the asked version exist for the target's Python and architecture."""


class WheelFetchError(EdgepackError):
    """pip could not fetch the wheels: no network, no pip, or pip failed."""

    exit_code = ExitCode.UNSUPPORTED_HERE


class _Reporter(Protocol):
    def start(self, stage: str, text: str) -> None: ...

    def finish(self, stage: str, text: str) -> None: ...


@dataclass(frozen=True)
class WheelRequest:
    arch: str
    python: str  # "3.11"
    onnxruntime: str  # "1.16" (newest patch of 1.16) or "1.16.3" (exactly)
    where: str = "the profile"  # where onnxruntime and python come from, for messages
    serve: bool = False  # also the HTTP server's packages, with their dependencies (cloud images)

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    @property
    def platforms(self) -> tuple[str, ...]:
        # Newer wheels are tagged 2_28 only, older ones 2_17 (alias manylinux2014): pip matches a
        # tag exactly and does not widen 2_28 down to 2_17, so both are asked for.
        return (f"manylinux_2_28_{self.arch}", f"manylinux_2_17_{self.arch}", f"manylinux2014_{self.arch}")

    @property
    def cache_folder(self) -> Path:
        # Image wheels apart from bundle wheels: each folder then holds one lock's wheels (and a
        # numpy of one lock is never mistaken for another's).
        return cache_root() / "wheels" / f"{self.python_tag}-{self.arch}{'-serve' if self.serve else ''}"

    @property
    def lock_name(self) -> str:
        return f"onnxruntime-{self.onnxruntime}{'-serve' if self.serve else ''}.lock.json"

    def requirements(self) -> tuple[str, str]:
        version = tuple(int(part) for part in self.onnxruntime.split("."))
        ort = f"onnxruntime=={self.onnxruntime}" + (".*" if len(version) == 2 else "")
        return ort, "numpy<2" if version[:2] < _FIRST_ORT_FOR_NUMPY2 else "numpy<3"

    def groups(self) -> list[tuple[list[str], bool]]:
        """pip runs: (requirements, with their dependencies?)."""
        return [(list(self.requirements()), False)] + ([(list(SERVE), True)] if self.serve else [])


@dataclass(frozen=True)
class WheelSet:
    request: WheelRequest
    wheels: dict[str, bytes]  # file name -> bytes
    from_cache: bool

    def files(self) -> dict[str, bytes]:
        return {f"wheels/{name}": data for name, data in self.wheels.items()}

    def versions(self) -> dict[str, str]:
        return {parse_wheel_name(name)[0]: parse_wheel_name(name)[1] for name in self.wheels}

    def describe(self) -> str:
        versions = ", ".join(f"{package} {version}" for package, version in sorted(self.versions().items()))
        return f"{versions} for CPython {self.request.python} on {self.request.arch}"


def request_for(profile: Profile, arch: str, python: str | None) -> WheelRequest:
    """The wheels a build for ``profile`` needs; ``arch`` must be the profile's."""
    where = str(profile.source) if profile.source else f"profile {profile.name}"
    if arch != profile.arch:
        matching = "an aarch64 profile such as edge-arm64-4c-4gb" if arch == "aarch64" else "an x86_64 profile"
        raise InputError(f"--arch {arch} does not match profile {profile.name}, which is {profile.arch}",
                         f"drop --arch, pass --arch {profile.arch}, or build for {matching}")
    version = python or profile.python or DEFAULT_PYTHON
    if not _ORT_VERSION.match(profile.onnxruntime.version):
        raise InputError(f"{where}: [onnxruntime] version {profile.onnxruntime.version!r} is not a release",
                         'write e.g. "1.16" (newest 1.16.x) or "1.16.3"')
    return WheelRequest(arch=arch, python=version, onnxruntime=profile.onnxruntime.version, where=where)


def cache_root() -> Path:
    return Path(os.environ.get("EDGEPACK_CACHE") or Path.home() / ".cache" / "edgepack")


def fetch_wheels(request: WheelRequest, reporter: _Reporter | None = None, show_pip: bool = False) -> WheelSet:
    """The pinned wheels for ``request``: from the cache when its lock and wheels are intact, else from pip."""
    folder = request.cache_folder
    lock = folder / request.lock_name
    if reporter:
        reporter.start("wheels", f"Wheels of onnxruntime {request.onnxruntime}, numpy"
                                 f"{' and the HTTP server' if request.serve else ''} for CPython "
                                 f"{request.python} on {request.arch}")
    pinned = _read_lock(lock, request)
    if pinned is not None:
        cached = {name: _valid_wheel(folder / name, digest) for name, digest in pinned.items()}
        if all(data is not None for data in cached.values()):
            result = WheelSet(request, {name: data for name, data in sorted(cached.items()) if data is not None}, True)
            if reporter:
                reporter.finish("wheels", f"{result.describe()} (cached in {folder})")
            return result
        # A wheel went missing or bad in the cache: fetch exactly the pinned versions again.
        groups = [([f"{package}=={version}" for package, version in
                    (parse_wheel_name(name)[:2] for name in sorted(pinned))], False)]
    else:
        groups = request.groups()
    requirements = [requirement for group, _ in groups for requirement in group]
    fetched = _download(request, groups, folder, show_pip)
    if pinned is not None and {name: hashlib.sha256(data).hexdigest() for name, data in fetched.items()} != pinned:
        raise IntegrityError(f"the wheels pip fetched again differ from those pinned in {lock}",
                             f"if the index changed on purpose, delete {lock} and build again")
    for name, data in fetched.items():
        write_atomic(folder / name, data)
    if pinned is None:
        body = {"requirements": requirements, "platforms": list(request.platforms), "python": request.python,
                "wheels": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(fetched.items())}}
        write_atomic(lock, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    result = WheelSet(request, dict(sorted(fetched.items())), False)
    if reporter:
        reporter.finish("wheels", f"{result.describe()} (downloaded into {folder})")
    return result


def parse_wheel_name(name: str) -> tuple[str, str, str, str]:
    """(distribution, version, python tag, platform tags) of a wheel file name."""
    parts = name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6) or not name.endswith(".whl"):
        raise IntegrityError(f"{name!r} is not a wheel file name", "delete it from the wheel cache")
    return parts[0].lower(), parts[1], parts[-3], parts[-1]


def _read_lock(lock: Path, request: WheelRequest) -> dict[str, str] | None:
    try:
        body = json.loads(lock.read_text(encoding="utf-8"))
        wheels = body["wheels"]
        packages = sorted(parse_wheel_name(n)[0] for n in wheels)
        if body["python"] != request.python or not _expected_packages(packages, request):
            return None
        return {str(name): str(digest) for name, digest in wheels.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IntegrityError):
        return None  # no lock yet, or one this edgepack cannot read: resolve afresh


def _valid_wheel(path: Path, digest: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != digest or not _is_zip(data):
        return None
    return data


def _is_zip(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _download(request: WheelRequest, groups: list[tuple[list[str], bool]], folder: Path,
              show_pip: bool) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as temp:
        for requirements, with_deps in groups:
            command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
                       "--progress-bar", "off", "--timeout", "60", "--retries", "2",
                       *([] if with_deps else ["--no-deps"]), "--only-binary=:all:",
                       *[f"--platform={tag}" for tag in request.platforms],
                       "--python-version", request.python, "--implementation", "cp", "--dest", temp, *requirements]
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=_PIP_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise WheelFetchError(f"pip download of {', '.join(requirements)} did not finish in {_PIP_TIMEOUT_S} s",
                                      "check the network, or use a cache from a machine with network or drop --arch"
                                      ) from None
            if show_pip:
                sys.stderr.write(done.stdout)
            if done.returncode != 0:
                raise _pip_error(done.stdout, request, requirements)
        fetched = {path.name: path.read_bytes() for path in sorted(Path(temp).glob("*.whl"))}
    _check_fetched(fetched, request)
    return fetched


def _expected_packages(packages: list[str], request: WheelRequest) -> bool:
    """A bundle's wheels are exactly numpy and onnxruntime; an image's add the server's, one wheel each."""
    if not request.serve:
        return packages == list(PACKAGES)
    return len(set(packages)) == len(packages) and set(PACKAGES) <= set(packages)


def _check_fetched(fetched: dict[str, bytes], request: WheelRequest) -> None:
    packages = sorted(parse_wheel_name(name)[0] for name in fetched)
    if not _expected_packages(packages, request):
        raise WheelFetchError(f"pip download gave {', '.join(sorted(fetched)) or 'nothing'}, not one wheel each of "
                              f"{' and '.join(PACKAGES)}{' and the server' if request.serve else ''}",
                              "rerun with --debug to see pip's output")
    for name, data in fetched.items():
        _, _, python_tag, platforms = parse_wheel_name(name)
        # Pure-Python wheels of the server stack (uvicorn, click, h11) are "any".
        if not all(tag.endswith(f"_{request.arch}") or tag == "any" for tag in platforms.split(".")) \
                or not _is_zip(data):
            raise WheelFetchError(f"pip download gave {name}, not a valid {request.arch} wheel",
                                  "rerun with --debug to see pip's output")
        abi = name.removesuffix(".whl").split("-")[-2]
        tags = python_tag.split(".")
        if not any(tag in (request.python_tag, "py3", "cp3") or (abi == "abi3" and tag.startswith("cp3"))
                   for tag in tags):
            raise WheelFetchError(f"pip download gave {name}, not a wheel for CPython {request.python}",
                                  "rerun with --debug to see pip's output")


def _pip_error(output: str, request: WheelRequest, requirements: list[str]) -> EdgepackError:
    text = output.lower()
    if "no module named pip" in text:
        return WheelFetchError(f"{sys.executable} has no pip to download wheels with",
                               f"{sys.executable} -m ensurepip, or drop --arch")
    if any(needle in text for needle in _NETWORK_TROUBLE):
        return WheelFetchError("pip could not reach the package index to download wheels of "
                               f"{' and '.join(requirements)}",
                               "use a cache from a machine with network (copy its ~/.cache/edgepack or set "
                               "EDGEPACK_CACHE) or drop --arch")
    missing = re.search(r"could not find a version that satisfies the requirement (\S+)"
                        r"(?: \(from versions: ([^)]*)\))?", output, re.IGNORECASE)
    if missing:
        wanted, versions = missing[1], (missing[2] or "").strip()
        found = f"there are {_summarize(versions)}" if versions and versions != "none" else "there are none"
        platform = f"CPython {request.python} on {request.arch} (manylinux 2.28/2.17)"
        if wanted.lower().startswith("onnxruntime"):
            return WheelsUnavailable(
                f"onnxruntime {request.onnxruntime} has no wheels for {platform}; {found}",
                f"change [onnxruntime] version in {request.where} to one of those, or pick a Python it has "
                "wheels for with --python-version or the profile's python key")
        return WheelsUnavailable(f"{wanted} has no wheels for {platform}; {found}",
                                 "pick another Python with --python-version, or another onnxruntime version")
    last = [line.strip() for line in output.splitlines() if line.strip()]
    return WheelFetchError(f"pip download of {' and '.join(requirements)} failed: {last[-1] if last else 'no output'}",
                           "rerun with --debug to see pip's output")


def _summarize(versions: str) -> str:
    listed = [v.strip() for v in versions.split(",") if v.strip()]
    return ", ".join(listed) if len(listed) <= 8 else f"{', '.join(listed[:3])}, …, {', '.join(listed[-4:])}"

