"""Benchmark a bundle on a real device over SSH, next to the same profile emulated here.

The bundle is verified here, copied with the system ``scp`` into a fresh ``mktemp -d`` folder on the
device, unpacked, and timed there by the bundle's own runtime (``python3 -m runtime.bench``, which
verifies every checksum again before loading the model). The folder is removed afterwards, also on
failure. Only the OpenSSH client is used, through subprocess, never prompting and never waiting
without a bound. Nothing here prints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.bench.profiles import Profile
from edgepack.errors import (
    DeviceError,
    EdgepackError,
    InputError,
    IntegrityError,
    UnsupportedHere,
)

if TYPE_CHECKING:
    from edgepack.bench.runner import BenchSettings

# Exit codes of the remote shell scripts below (ssh itself exits 255 on its own failures).
_NO_PYTHON, _NO_MODULES, _UNPACK_FAILED = 90, 91, 92
_SSH_FAILED = 255
_SAFE_DIR = re.compile(r"^/[A-Za-z0-9._/+-]*edgepack-bench\.[A-Za-z0-9]+$")
_TARGET = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                     r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?$")


class DeviceUnreachable(DeviceError):
    """No SSH connection: refused, timed out, unknown host, no route."""


class DeviceAuthError(DeviceError):
    """The device answered but refused the key, or its host key changed."""


class RemotePythonError(DeviceError):
    """The device's Python is missing or cannot import numpy or onnxruntime."""


class RemoteBenchFailed(DeviceError):
    """Unpacking or the benchmark itself failed on the device."""


@dataclass(frozen=True)
class SshTarget:
    host: str
    user: str | None = None
    port: int = 22
    identity: Path | None = None

    @classmethod
    def parse(cls, spec: str, identity: Path | None = None) -> "SshTarget":
        """``user@host[:port]``; an IPv6 address goes in brackets (``user@[::1]:2222``)."""
        match = _TARGET.match(spec.strip())
        port = int(match["port"]) if match and match["port"] else 22
        if not match or match["host"].startswith("-") or not 0 < port < 65536:
            raise InputError(f"--ssh {spec!r} is not user@host[:port]", "e.g. --ssh pi@192.168.1.20 or pi@edge-box:2222")
        if identity is not None and not identity.is_file():
            raise InputError(f"{identity}: no such key file", "pass the private key given to --identity")
        return cls(host=match["host"].strip("[]"), user=match["user"], port=port, identity=identity)

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def address(self) -> str:
        if self.port == 22:
            return self.login
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}" if self.user else f"{host}:{self.port}"


@dataclass(frozen=True)
class RemoteSettings:
    python: str = "python3"
    connect_timeout_s: int = 10
    known_hosts: Path | None = None  # None: EDGEPACK_KNOWN_HOSTS, else ~/.cache/edgepack/known_hosts

    def known_hosts_file(self) -> Path:
        if self.known_hosts is not None:
            return self.known_hosts
        if os.environ.get("EDGEPACK_KNOWN_HOSTS"):
            return Path(os.environ["EDGEPACK_KNOWN_HOSTS"])
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "edgepack" / "known_hosts"


@dataclass(frozen=True)
class DeviceComparison:
    """The device's report and, when this host can emulate the profile, the emulated one."""

    device: dict[str, Any]
    emulated: dict[str, Any] | None
    profile: Profile

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "emulated": self.emulated}


def compare_on_device(archive: Path, target: SshTarget, profile: Profile, settings: BenchSettings,
                      remote: RemoteSettings = RemoteSettings()) -> DeviceComparison:
    """Benchmark ``archive`` on the device, then on ``profile`` emulated here when it is this host's arch."""
    from edgepack.bench.runner import bench_bundle

    device = bench_on_device(archive, target, profile, settings, remote)
    emulated = bench_bundle(archive, profile, settings) if profile.runnable_here() else None
    return DeviceComparison(device=device, emulated=emulated, profile=profile)


def bench_on_device(archive: Path, target: SshTarget, profile: Profile, settings: BenchSettings,
                    remote: RemoteSettings = RemoteSettings()) -> dict[str, Any]:
    """Verify here, copy, unpack and benchmark on the device with ``profile``'s limits; its JSON report."""
    from edgepack.bench.runner import bench_args, label
    from edgepack.manifest import parse_manifest
    from edgepack.runtime.bundle import verify_archive

    verified = verify_archive(archive)  # a tampered bundle never leaves this host
    manifest = parse_manifest(verified.manifest, str(archive))
    session = _Ssh(target, remote)
    folder = session.prepare(carries_wheels=manifest.wheels is not None)  # an --arch bundle brings its own
    try:
        session.copy(archive, f"{folder}/bundle.tar.gz")
        report = session.bench(folder, verified.root, bench_args(profile, settings),
                               timeout_s=settings.timeout_s() + archive.stat().st_size / 10e6)
    finally:
        session.remove(folder)
    return label(report, profile=profile.name, measured_on=f"device {target.login}",
                 device={"ssh": target.address, "python": remote.python},
                 bundle={"name": manifest.name, "version": manifest.version, "variant": manifest.variant,
                         "built_for": manifest.target.profile, "verified": "here before copying, and on the "
                         "device by runtime.bench before loading"})


class _Ssh:
    """The OpenSSH client, one bounded subprocess per step."""

    def __init__(self, target: SshTarget, remote: RemoteSettings) -> None:
        self.target, self.remote = target, remote
        known_hosts = remote.known_hosts_file()
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        self.options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={remote.connect_timeout_s}",
                        "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
                        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if target.identity is not None:
            self.options += ["-i", str(target.identity), "-o", "IdentitiesOnly=yes"]
        self.python = shlex.quote(remote.python)

    def prepare(self, carries_wheels: bool = False) -> str:
        """Check the device's Python, then make the work folder; its absolute path."""
        script = (f"command -v {self.python} >/dev/null 2>&1 || exit {_NO_PYTHON}\n"
                  + ("" if carries_wheels else f"{self.python} -c 'import numpy, onnxruntime' || exit {_NO_MODULES}\n")
                  + 'mktemp -d "${TMPDIR:-/tmp}/edgepack-bench.XXXXXXXX"\n')
        done = self._ssh(script, timeout_s=self.remote.connect_timeout_s + 60, step="checking Python")
        where = f"{self.remote.python} on {self.target.address}"
        if done.returncode == _NO_PYTHON:
            raise RemotePythonError(f"{where}: no such Python", "install python3 there or pass --remote-python PATH")
        if done.returncode == _NO_MODULES:
            missing = re.search(r"No module named '([^']+)'", done.stderr)
            raise RemotePythonError(
                f"{where} cannot import {missing[1] if missing else 'numpy and onnxruntime'} "
                f"({_last_line(done.stderr)})",
                "pip install numpy onnxruntime there (all a bundle needs), or pass --remote-python PATH")
        self._check(done, "checking Python")
        folder = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if not _SAFE_DIR.match(folder):
            raise RemoteBenchFailed(f"mktemp on {self.target.address} gave {folder!r}, not a usable folder",
                                    "check that the device has a writable $TMPDIR or /tmp")
        return folder

    def copy(self, archive: Path, remote_path: str) -> None:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        host = f"{self.target.user}@{host}" if self.target.user else host
        command = ["scp", "-q", *self.options, "-P", str(self.target.port), str(archive), f"{host}:{remote_path}"]
        timeout_s = 60 + archive.stat().st_size / 250e3  # at least 250 kB/s
        self._check(self._run(command, timeout_s, "copying the bundle"), "copying the bundle")

    def bench(self, folder: str, root: str, args: list[str], timeout_s: float) -> dict[str, Any]:
        bench = " ".join(shlex.quote(arg) for arg in args)
        script = (f"cd {shlex.quote(folder)} || exit {_UNPACK_FAILED}\n"
                  f"tar -xzf bundle.tar.gz || exit {_UNPACK_FAILED}\n"
                  f"cd {shlex.quote(root)} || exit {_UNPACK_FAILED}\n"
                  f"exec {self.python} -m runtime.bench {bench}\n")
        done = self._ssh(script, timeout_s, step="benchmarking")
        if done.returncode == _UNPACK_FAILED:
            raise RemoteBenchFailed(f"unpacking the bundle on {self.target.address} failed: {_last_line(done.stderr)}",
                                    "check the device's free space in $TMPDIR or /tmp")
        if done.returncode != 0 and done.returncode != _SSH_FAILED:
            raise _bench_error(done.stderr, done.returncode, self.target.address)
        self._check(done, "benchmarking")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise RemoteBenchFailed(f"the benchmark on {self.target.address} printed no JSON report",
                                    "run `python3 -m runtime.bench` in the unpacked bundle there to see why") from None

    def remove(self, folder: str) -> None:
        """Best effort: the folder is the device's temporary space, and a failure here must not hide another."""
        try:
            self._ssh(f"rm -rf -- {shlex.quote(folder)}", timeout_s=self.remote.connect_timeout_s + 30, step="cleaning up")
        except EdgepackError:
            pass

    def _ssh(self, script: str, timeout_s: float, step: str) -> subprocess.CompletedProcess[str]:
        command = ["ssh", "-T", *self.options, "-p", str(self.target.port), "--", self.target.login,
                   "sh -c " + shlex.quote(script)]
        return self._run(command, timeout_s, step)

    def _run(self, command: list[str], timeout_s: float, step: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except FileNotFoundError:
            raise UnsupportedHere(f"{command[0]} is not installed here", "install the OpenSSH client (openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.target.address} did not finish {step} within {timeout_s:.0f} s",
                                    "check the device and the network, or lower --bench-time") from None

    def _check(self, done: subprocess.CompletedProcess[str], step: str) -> None:
        if done.returncode == 0:
            return
        raise _ssh_error(done.stderr, done.returncode, self.target, self.remote.known_hosts_file(), step)


def _ssh_error(stderr: str, code: int, target: SshTarget, known_hosts: Path, step: str) -> DeviceError:
    where, text = target.address, stderr.lower()
    detail = _last_line(stderr) or f"exit code {code}"
    if "permission denied" in text and step == "copying the bundle" and "publickey" not in text:
        return RemoteBenchFailed(f"copying the bundle to {where} failed: {detail}", "check the device's free space")
    if "permission denied" in text or "too many authentication failures" in text:
        key = f"the key {target.identity}" if target.identity else "your default keys"
        return DeviceAuthError(f"{where} refused {key} (authentication failed)",
                               "pass --identity KEY whose .pub is in the device's ~/.ssh/authorized_keys")
    if "unprotected private key" in text or "bad permissions" in text:
        return DeviceAuthError(f"ssh refuses the key {target.identity}: others can read it", f"chmod 600 {target.identity}")
    if "host identification has changed" in text or "host key verification failed" in text:
        return DeviceAuthError(f"{where}'s host key differs from the one recorded in {known_hosts}",
                               f"if the device was reinstalled, remove its line from {known_hosts}; otherwise stop")
    reasons = {"connection refused": "connection refused", "timed out": "timed out",
               "could not resolve": "unknown host name", "no route to host": "no route to host",
               "network is unreachable": "network unreachable", "connection closed": "connection closed",
               "connection reset": "connection reset"}
    for needle, reason in reasons.items():
        if needle in text:
            return DeviceUnreachable(f"cannot reach {where}: {reason}",
                                     "check the host and port, that the device is on and that sshd runs there")
    return DeviceError(f"{step} on {where} failed: {detail}", "rerun with --debug; try `ssh` to the device by hand")


def _bench_error(stderr: str, code: int, where: str) -> EdgepackError:
    """The runtime's one-line JSON error (``{"error": ..., "exit_code": ...}``), or the last line of stderr."""
    try:
        detail = json.loads(stderr.strip().splitlines()[-1])
        message, remote_code = str(detail["error"]), int(detail["exit_code"])
    except (ValueError, IndexError, KeyError, TypeError):
        return RemoteBenchFailed(f"the benchmark on {where} failed: {_last_line(stderr) or f'exit code {code}'}",
                                 "run `python3 -m runtime.bench` in the unpacked bundle there to see why")
    if remote_code == int(IntegrityError.exit_code):
        return IntegrityError(f"on {where}: {message}")
    return RemoteBenchFailed(f"the benchmark on {where} failed: {message}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
