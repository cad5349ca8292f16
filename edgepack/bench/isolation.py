"""Puts a benchmark child process under a profile's CPU quota and memory limit with Linux cgroups.

Both cgroup versions: v1 (one hierarchy per controller: ``cpu.cfs_quota_us``,
``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``) and v2 (the unified hierarchy:
``cpu.max``, ``memory.max``, ``memory.swap.max``). Each child cgroup is made under this process's own
cgroup, as ``/proc/self/cgroup`` names it, joined by the child before it imports anything (a shell
writes its pid to ``cgroup.procs``, then execs Python) and removed afterwards, also on failure.
Whatever cannot be enforced is said with its reason, never silently skipped.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

CPU_PERIOD_US = 100_000  # the kernel's default CFS period
_MIN_QUOTA_US = 1_000  # the kernel refuses a quota below 1 ms
_names = itertools.count(1)

# Joins every cgroup named before "--", then becomes the command after it (same pid, so the
# kernel's SIGKILL on out-of-memory reaches the benchmark itself). Exit 125: a cgroup refused it.
_JOIN = ('for procs in "$@"; do shift; [ "$procs" = -- ] && break; '
         'echo $$ > "$procs" || { echo "edgepack: cannot join the cgroup of $procs" >&2; exit 125; }; done; '
         'exec "$@"')


@dataclass(frozen=True)
class CgroupLimits:
    """What a profile asks the kernel to enforce on the benchmark child."""

    cpu_quota: float | None = None  # cores' worth of CPU time per period (0.5 = half a core); None: none
    memory_mb: int | None = None


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller lives for this process: the cgroup version and this process's own cgroup."""

    controller: Literal["cpu", "memory"]
    version: Literal[1, 2]
    own: Path


@dataclass
class Isolation:
    """The cgroups made for one child: what each limit got, and how to start the child inside them."""

    enforced: dict[str, str] = field(default_factory=dict)  # limit -> how
    not_enforced: dict[str, str] = field(default_factory=dict)  # limit -> why
    groups: list[Path] = field(default_factory=list)  # cgroups the child joins
    memory_group: tuple[int, Path] | None = None  # (version, cgroup) holding the memory limit

    def wrap(self, command: list[str]) -> list[str]:
        """``command``, started so that it runs inside every cgroup of this isolation from its first byte."""
        if not self.groups:
            return command
        return ["/bin/sh", "-c", _JOIN, "edgepack-join", *(str(g / "cgroup.procs") for g in self.groups),
                "--", *command]

    def flags(self) -> list[str]:
        """``runtime.bench`` flags that put what was done here into the child's own report."""
        said = [("--enforced", limit, how) for limit, how in self.enforced.items()]
        said += [("--not-enforced", limit, why) for limit, why in self.not_enforced.items()]
        return [arg for flag, limit, text in said for arg in (flag, f"{limit}={text}")]

    def report(self) -> dict[str, str]:
        return {**{k: f"enforced ({v})" for k, v in self.enforced.items()},
                **{k: f"not enforced ({v})" for k, v in self.not_enforced.items()}}

    def oom_kills(self) -> int:
        """How many processes the kernel killed in the memory cgroup for want of memory."""
        if self.memory_group is None:
            return 0
        version, group = self.memory_group
        try:
            if version == 2:
                return _counter(group / "memory.events", "oom_kill")
            control = (group / "memory.oom_control").read_text()
            if "oom_kill " in control:
                return _counter(group / "memory.oom_control", "oom_kill")
            # Kernels before 4.13 have no oom_kill line: a limit that was hit is the nearest sign.
            return int(any(int(_read(group / name) or 0) for name in ("memory.failcnt", "memory.memsw.failcnt")))
        except (OSError, ValueError):
            return 0

    def out_of_memory(self, returncode: int) -> bool:
        """Whether a child that ended with ``returncode`` was killed by the memory limit."""
        return returncode == -signal.SIGKILL and self.oom_kills() > 0


def _counter(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def own_cgroups() -> dict[str, Hierarchy | str]:
    """For ``cpu`` and ``memory``: this process's cgroup in that controller's hierarchy, or why there is none."""
    try:
        membership = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return {c: "no /proc/self/cgroup: cgroups are Linux only" for c in ("cpu", "memory")}
    v1_paths: dict[str, str] = {}
    v2_path: str | None = None
    for line in membership:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_path = path
        for controller in controllers.split(","):
            v1_paths[controller] = path
    v1_mounts: dict[str, tuple[str, str]] = {}
    v2_mount: tuple[str, str] | None = None
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if after[0] == "cgroup2":
            v2_mount = (root, point)
        elif after[0] == "cgroup":
            for option in after[2].split(","):
                v1_mounts.setdefault(option, (root, point))
    found: dict[str, Hierarchy | str] = {}
    for controller in ("cpu", "memory"):
        if controller in v1_mounts and controller in v1_paths:
            found[controller] = Hierarchy(controller, 1, _inside(v1_mounts[controller], v1_paths[controller]))  # type: ignore[arg-type]
        elif v2_mount is not None and v2_path is not None:
            own = _inside(v2_mount, v2_path)
            available = _read(own / "cgroup.controllers").split()
            if controller in available:
                found[controller] = Hierarchy(controller, 2, own)  # type: ignore[arg-type]
            else:
                found[controller] = f"the cgroup v2 {controller} controller is not delegated to {own}"
        else:
            found[controller] = f"no cgroup {controller} controller is mounted here"
    return found


def _inside(mount: tuple[str, str], path: str) -> Path:
    root, point = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return Path(point) / path.lstrip("/")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def availability() -> dict[str, str]:
    """Without creating anything: for ``cpu`` and ``memory``, ``cgroup vN`` where a limit could be set, else why not."""
    said: dict[str, str] = {}
    for controller, where in own_cgroups().items():
        if isinstance(where, str):
            said[controller] = f"not enforced: {where}"
        elif not os.access(where.own, os.W_OK):
            said[controller] = f"not enforced: {where.own} is not writable" + ("" if os.geteuid() == 0 else " (not root)")
        else:
            said[controller] = f"cgroup v{where.version}"
    return said


@contextmanager
def isolate(limits: CgroupLimits, label: str = "edgepack") -> Iterator[Isolation]:
    """Make the cgroups for ``limits``; yield an :class:`Isolation`; remove them when the block ends."""
    cage = Isolation()
    made: list[Path] = []
    try:
        _setup(limits, cage, made)
        yield cage
    finally:
        for group in reversed(made):
            _remove(group)


def _setup(limits: CgroupLimits, cage: Isolation, made: list[Path]) -> None:
    wanted = {"cpu_quota": limits.cpu_quota, "memory": limits.memory_mb}
    if limits.cpu_quota is None:
        cage.not_enforced["cpu_quota"] = "the profile sets no CPU quota"
    if limits.memory_mb is None:
        cage.not_enforced["memory"] = "the profile sets no memory limit"
    if all(value is None for value in wanted.values()):
        return
    where = own_cgroups()
    name = f"edgepack-{os.getpid()}-{next(_names)}"
    for limit, controller in (("cpu_quota", "cpu"), ("memory", "memory")):
        if wanted[limit] is None:
            continue
        hierarchy = where[controller]
        if isinstance(hierarchy, str):
            cage.not_enforced[limit] = hierarchy
            continue
        try:
            group = _group(hierarchy, name, made)
            if limit == "cpu_quota":
                how = _set_cpu(group, hierarchy.version, float(wanted[limit]))  # type: ignore[arg-type]
            else:
                how = _set_memory(group, hierarchy.version, int(wanted[limit]))  # type: ignore[arg-type]
                cage.memory_group = (hierarchy.version, group)
        except _Refused as err:
            cage.not_enforced[limit] = str(err)
            continue
        cage.enforced[limit] = how
        if group not in cage.groups:
            cage.groups.append(group)
    for group in [g for g in made if g not in cage.groups]:  # made, but no limit took: leave no trace
        _remove(group)
        made.remove(group)


class _Refused(Exception):
    """A cgroup step failed; the message says which file and why, for the report."""


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise _Refused(f"cannot write {value!r} to {path}: {_why(err)}") from None


def _why(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (cgroup not writable" + ("" if os.geteuid() == 0 else "; not root") + ")"
    return reason


def _group(hierarchy: Hierarchy, name: str, made: list[Path]) -> Path:
    group = hierarchy.own / name
    if group in made:  # v2, or v1 controllers mounted together: one cgroup holds both limits
        return group
    if hierarchy.version == 2:
        enabled = _read(hierarchy.own / "cgroup.subtree_control").split()
        if hierarchy.controller not in enabled:
            _write(hierarchy.own / "cgroup.subtree_control", f"+{hierarchy.controller}")
    try:
        group.mkdir()
    except OSError as err:
        raise _Refused(f"cannot create a cgroup in {hierarchy.own}: {_why(err)}") from None
    made.append(group)
    return group


def _set_cpu(group: Path, version: int, cores: float) -> str:
    quota = max(_MIN_QUOTA_US, round(cores * CPU_PERIOD_US))
    if version == 2:
        _write(group / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        return f"cgroup v2 cpu.max = {quota} {CPU_PERIOD_US}: {cores:g} core(s) of CPU time"
    _write(group / "cpu.cfs_period_us", str(CPU_PERIOD_US))
    _write(group / "cpu.cfs_quota_us", str(quota))
    return f"cgroup v1 cpu.cfs_quota_us = {quota} per cpu.cfs_period_us = {CPU_PERIOD_US}: {cores:g} core(s) of CPU time"


def _set_memory(group: Path, version: int, mb: int) -> str:
    limit = str(mb * 1024 * 1024)
    if version == 2:
        _write(group / "memory.max", limit)
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")
            return f"cgroup v2 memory.max = {mb} MB, memory.swap.max = 0"
        return f"cgroup v2 memory.max = {mb} MB; swap not limited (no memory.swap.max)"
    _write(group / "memory.limit_in_bytes", limit)
    if (group / "memory.memsw.limit_in_bytes").exists():
        _write(group / "memory.memsw.limit_in_bytes", limit)  # memory + swap: no escape into swap
        return f"cgroup v1 memory.limit_in_bytes = memory.memsw.limit_in_bytes = {mb} MB"
    return f"cgroup v1 memory.limit_in_bytes = {mb} MB; swap not limited (no swap accounting)"


def _remove(group: Path) -> None:
    """Remove a cgroup this process made; stray processes in it are children it started, killed first."""
    for attempt in range(50):
        for pid in _read(group / "cgroup.procs").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or attempt == 49:
                return  # best effort: a leftover empty cgroup must not hide the benchmark's own outcome
            time.sleep(0.02)
