"""The container test environment: rootful podman with a private store, a Python base image made here with
debootstrap, containers run detached behind a published port, and a local registry.

Cloud images must be run with tools nobody here wrote, and this machine reaches no container registry, so
everything an image test needs is made on it and kept in ``${EDGEPACK_CACHE:-~/.cache/edgepack}/test-containers/``:

    containers.<hash>.conf, storage.<hash>.conf, registries.conf   what the tools read (CONTAINERS_* variables)
    storage-<driver>/                  podman's image and container store, kept across runs
    base-python-3.11/oci/              the base image as an OCI layout (``oci:DIR:3.11``), build.json beside it
    .lock                              held while the base image is built or restored, so two runs never race

and its runtime state (runroot, tmp_dir, events log) in ``/run/edgepack-ctr/<hash of the store's path>/``.

The base image is made in ``python_base.py``. Use the fixtures (registered in conftest.py) or call the helpers:
``python_base.python_base_layout()``, ``podman_env()``,
``podman_run(image, *command)``, ``podman_run_detached(image_or_archive, *command, port=8080)``,
``run_local_registry(folder)``. What is missing here (root, a tool) skips with the reason; what is broken fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import pytest

from edgepack.package.wheels import cache_root

OWNER_LABEL = "edgepack.test.pid"  # on every container started here: the pytest process that owns it
INSTALL_HINT = ".ci/run installs it"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # runc and debootstrap live here, not always on PATH


class ContainerError(RuntimeError):
    """A container tool failed or a container did not come up: a real failure, never a skip."""


@dataclass(frozen=True)
class PodmanSetup:
    root: Path  # the test-containers folder
    driver: str  # overlay or vfs
    env: Mapping[str, str]  # only the CONTAINERS_* variables; podman_env() adds the rest of os.environ


# --- podman with a private configuration -------------------------------------------------------------

def tool(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


_setup: PodmanSetup | None = None
_setup_skip: str | None = None


def podman_setup() -> PodmanSetup:
    """Configured once per process; skips (every time, without trying again) when podman cannot be used here."""
    global _setup, _setup_skip
    if _setup is None and _setup_skip is None:
        _setup_skip = _why_no_podman()
        if _setup_skip is None:
            _setup = _configure(cache_root() / "test-containers")
    if _setup_skip is not None:
        pytest.skip(_setup_skip)
    assert _setup is not None
    return _setup


def _why_no_podman() -> str | None:
    if os.uname().sysname != "Linux":
        return "containers need Linux"
    if os.geteuid() != 0:
        # Rootless podman needs subordinate ids and user namespaces set up by an admin; CI runs as root.
        return "the container tests run rootful podman and debootstrap: run them as root (CI does)"
    missing = [name for name in ("podman", "skopeo", "runc", "slirp4netns", "tar") if not tool(name)]
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    return None


def _configure(root: Path) -> PodmanSetup:
    root.mkdir(parents=True, exist_ok=True)
    driver = _storage_driver(root)
    graphroot = root / f"storage-{driver}"
    # Runtime state belongs on a tmpfs, and podman 4.3 needs a runroot of at most 50 characters: it hands it to
    # the cleanup command conmon runs when a container ends, which refuses a longer one (podman issue 22272), so
    # the container is never cleaned up and every attached run or wait hangs 20 s on conmon's timeout.
    run = Path("/run/edgepack-ctr") / hashlib.sha256(str(graphroot).encode()).hexdigest()[:12]
    with locked(root / ".lock"):
        _forget_state_of_an_earlier_boot(run)
        events = run / "events.log"
        if events.exists() and events.stat().st_size > 16 << 20:  # not rotated by podman 4.3: bounded here
            events.write_text("")
    (root / "tmp").mkdir(exist_ok=True)
    storage = _write_once(root, "storage", "\n".join([
        "[storage]",
        f'driver = "{driver}"',
        f"graphroot = {json.dumps(str(graphroot))}",
        f"runroot = {json.dumps(str(run / 'storage'))}", ""]))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    engine = _write_once(root, "containers", "\n".join([
        "[containers]",
        # podman asks runc for nofile=1048576 by default, above this host's hard limit, and runc fails with
        # "error setting rlimit type 7"; nproc is bounded the same way (pid_max is 32768 here).
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]',
        # A rootful default is a netavark bridge: iptables rules and a podman0 link on the shared host, and
        # published ports DNAT to a 10.88.x address. slirp4netns keeps the network in user space and publishes
        # 127.0.0.1:PORT through rootlessport, which connects to the port inside the container.
        'netns = "slirp4netns"',
        'log_driver = "k8s-file"',  # no journald here
        "[engine]",
        'runtime = "runc"',  # crun failed on this host's hybrid cgroup (v1 + unified) layout; runc works
        'cgroup_manager = "cgroupfs"',  # no systemd running: the systemd manager cannot start a container
        'events_logger = "file"',
        f"events_logfile_path = {json.dumps(str(run / 'events.log'))}",
        f"tmp_dir = {json.dumps(str(run / 'libpod'))}",
        # File locks in tmp_dir, not the host-wide /dev/shm/libpod_lock that any other podman store shares.
        'lock_type = "file"',
        f"image_copy_tmp_dir = {json.dumps(str(root / 'tmp'))}",
        "[network]",
        f"network_config_dir = {json.dumps(str(root / 'networks'))}", ""]))
    # Only fully qualified names: a short name would otherwise be looked up on registries this host cannot reach.
    registries = _write_once(root, "registries", 'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n')
    setup = PodmanSetup(root, driver, {"CONTAINERS_CONF": str(engine), "CONTAINERS_STORAGE_CONF": str(storage),
                                       "CONTAINERS_REGISTRIES_CONF": str(registries)})
    _remove_orphans(setup)
    return setup


def _storage_driver(root: Path) -> str:
    """overlay (shares the base layers, fast to start) unless the kernel lacks it or root is itself on overlayfs."""
    chosen = os.environ.get("EDGEPACK_TEST_STORAGE_DRIVER")
    if chosen in ("overlay", "vfs"):
        return chosen
    filesystems = Path("/proc/filesystems").read_text()
    return "overlay" if "\toverlay\n" in filesystems and _filesystem_of(root) != "overlay" else "vfs"


def _filesystem_of(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point, fs_type = fields[4], fields[fields.index("-") + 1]
        if (str(path) + "/").startswith(mount_point.rstrip("/") + "/") and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def _forget_state_of_an_earlier_boot(run: Path) -> None:
    """/run is not always a tmpfs (it is not on this machine): a reboot must empty the runtime state all the
    same, so podman finds no 'alive' file and resets its containers' states, as after any reboot."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    marker = run / "boot_id"
    if marker.exists() and marker.read_text().strip() != boot_id:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    marker.write_text(boot_id + "\n")


def _write_once(root: Path, kind: str, text: str) -> Path:
    """Named by content: runs with other limits get their own file, and a file in use never changes."""
    path = root / f"{kind}.{hashlib.sha256(text.encode()).hexdigest()[:12]}.conf"
    if not path.exists():
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(text)
        os.replace(temp, path)
    return path


def _remove_orphans(setup: PodmanSetup) -> None:
    """Containers whose test process died (a killed run); --timeout has stopped them, they are only left over."""
    listed = podman("ps", "-a", "--filter", f"label={OWNER_LABEL}", "--format", "json", setup=setup, timeout_s=60)
    orphans = [entry["Id"] for entry in json.loads(listed.stdout or "[]")
               if not _alive(int((entry.get("Labels") or {}).get(OWNER_LABEL, "0") or 0))]
    if orphans:
        podman("rm", "-f", "-t", "0", "--ignore", *orphans, setup=setup, timeout_s=120, check=False)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def podman_env() -> dict[str, str]:
    """The environment for podman, skopeo and buildah commands: this process's, with the private configuration."""
    return {**os.environ, **podman_setup().env}


def _tool_run(command: list[str], env: Mapping[str, str], timeout_s: float, check: bool,
              **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, check=False, env=dict(env), capture_output=True, text=True, timeout=timeout_s,
                              **kwargs)
    except subprocess.TimeoutExpired as err:
        raise ContainerError(f"{' '.join(command[:4])} ... did not finish within {timeout_s:.0f} s") from err
    if check and done.returncode != 0:
        raise ContainerError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def podman(*args: str, timeout_s: float = 120, check: bool = True, setup: PodmanSetup | None = None,
           **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **(setup or podman_setup()).env}
    return _tool_run(["podman", *args], env, timeout_s, check, **kwargs)


def skopeo(*args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return _tool_run(["skopeo", *args], podman_env(), timeout_s, check)


def _container_name() -> str:
    return f"edgepack-test-{uuid.uuid4().hex[:12]}"


def _bounded(timeout_s: float) -> list[str]:
    """podman's own --timeout: conmon kills the container then, even when this process is gone."""
    return ["--pull=never", "--label", f"{OWNER_LABEL}={os.getpid()}", "--timeout", str(max(1, math.ceil(timeout_s)))]


def podman_run(image: str, *command: str, timeout_s: float = 60,
               run_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run a command in a fresh container and return its output; the container is removed."""
    name = _container_name()
    try:
        return podman("run", "--rm", "--name", name, *_bounded(timeout_s), *run_args, image, *command,
                      timeout_s=timeout_s + 30, check=False)
    finally:
        podman("rm", "-f", "-t", "0", "--ignore", name, timeout_s=60, check=False)


# --- one builder at a time ---------------------------------------------------------------------------

@contextmanager
def locked(path: Path, timeout_s: float = 900) -> Iterator[None]:
    """An exclusive lock between processes; the wait is bounded (a base image build takes minutes at most)."""
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ContainerError(f"{path} stayed locked for {timeout_s:.0f} s by another test run") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- a container serving HTTP on a published port ----------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def podman_run_detached(image: str | os.PathLike, *command: str, port: int = 8080,
                        env: Mapping[str, str] | None = None, timeout_s: float = 300, user: str | None = None,
                        ready_path: str = "/", ready_timeout_s: float = 60, ready_status: int | None = None,
                        run_args: Sequence[str] = ()) -> Iterator[str]:
    """Run ``image`` detached with ``port`` published on 127.0.0.1 and yield its base URL once ``ready_path``
    answers: any HTTP status, or ``ready_status`` when given (a readiness check says 503 until the model is loaded).
    ``image``: a local image name, an archive file (podman load), an OCI layout folder (a Path, or a str path
    starting with / or .), or an ``oci:``/``oci-archive:``/``docker-archive:`` reference.
    The container is always removed, and an image loaded here too; its logs are printed when anything fails."""
    image_ref, forget_image = _local_image(image)
    name = _container_name()
    try:
        url = _start_detached(name, image_ref, command, port, env or {}, timeout_s, user, run_args)
        try:
            _wait_for_http(name, url + ready_path, ready_timeout_s, ready_status)
            yield url
        except BaseException:
            _print_logs(name)
            raise
    finally:
        podman("rm", "-f", "-t", "0", "--ignore", name, timeout_s=60, check=False)
        forget_image()


def _start_detached(name: str, image: str, command: Sequence[str], port: int, env: Mapping[str, str],
                    timeout_s: float, user: str | None, run_args: Sequence[str]) -> str:
    options = [*_bounded(timeout_s), *(["--user", user] if user else []),
               *[arg for key, value in env.items() for arg in ("--env", f"{key}={value}")], *run_args]
    for _ in range(3):
        host_port = free_port()  # free a moment ago; another process may take it first, hence the retries
        started = podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{host_port}:{port}", *options, image,
                         *command, check=False)
        if started.returncode == 0:
            return f"http://127.0.0.1:{host_port}"
        podman("rm", "-f", "-t", "0", "--ignore", name, timeout_s=60, check=False)
        if "address already in use" not in started.stderr:
            raise ContainerError(f"podman run {image} failed (exit {started.returncode}): {started.stderr.strip()}")
    raise ContainerError(f"podman run {image}: no free port on 127.0.0.1 after 3 tries")


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


def http_get(url: str, timeout_s: float = 10) -> tuple[int, bytes]:
    """(status, body) of a GET, an error status included, never through a proxy."""
    try:
        with _DIRECT.open(url, timeout=timeout_s) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_for_http(name: str, url: str, timeout_s: float, status: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            answered, _ = http_get(url, timeout_s=2)
            if status is None or answered == status:
                return  # it answered; any other status is the test's business
            last = f"last answer {answered}"
        except (urllib.error.URLError, HTTPException, OSError):
            pass  # rootlessport accepts before the server listens, then drops the connection
        state = podman("container", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name,
                       timeout_s=30, check=False).stdout.split()
        if not state or state[0] not in ("created", "configured", "initialized", "running"):
            ended = f"ended ({state[0]}, exit {state[1]})" if len(state) == 2 else "is gone"
            raise ContainerError(f"container {name} {ended} before {url} answered")
        if time.monotonic() > deadline:
            raise ContainerError(f"{url} did not answer{'' if status is None else f' {status}'} within "
                                 f"{timeout_s:.0f} s ({last})")
        time.sleep(0.2)


def _print_logs(name: str) -> None:
    logs = podman("logs", "--tail", "200", name, timeout_s=30, check=False)
    print(f"--- last logs of container {name} ---\n{logs.stdout}{logs.stderr}--- end of logs ---")


def _local_image(image: str | os.PathLike) -> tuple[str, Callable[[], None]]:
    """A reference podman can run without pulling, and how to forget what was brought in for it."""
    if isinstance(image, str) and image.startswith(("/", "./", "../")):
        image = Path(image)
    if isinstance(image, os.PathLike) and Path(image).is_file():
        return _load_archive(Path(image))
    if isinstance(image, os.PathLike):
        image = f"oci:{image}"
    if image.split(":", 1)[0] in ("oci", "oci-archive", "docker-archive"):
        name = f"localhost/edgepack-test-run-{uuid.uuid4().hex[:12]}:latest"
        skopeo("copy", "--quiet", image, f"containers-storage:{name}", timeout_s=600)

        def untag() -> None:  # the image goes with its last name, unless a container of another run uses it
            podman("rmi", "--ignore", name, timeout_s=120, check=False)

        return name, untag
    return image, lambda: None


def _load_archive(archive: Path) -> tuple[str, Callable[[], None]]:
    listed = podman("images", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}", "--no-trunc", timeout_s=60).stdout
    before = {word.removeprefix("sha256:") for line in listed.splitlines() for word in line.split()}
    loaded = podman("load", "-i", str(archive), timeout_s=600)
    names = [name.strip() for line in loaded.stdout.splitlines() if line.startswith("Loaded image")
             for name in line.split(":", 1)[1].split(",")]
    if not names:
        raise ContainerError(f"podman load {archive} named no image: {loaded.stdout}{loaded.stderr}")
    image_id = podman("image", "inspect", "--format", "{{.Id}}", names[0], timeout_s=60).stdout.strip()

    def forget() -> None:
        # Only what the load added: its new names, then the image if it is new and nothing else names or runs it.
        new_names = [name for name in names if name not in before and not name.startswith("sha256:")]
        if new_names:
            podman("untag", image_id, *new_names, timeout_s=60, check=False)
        if image_id not in before:
            podman("rmi", "--ignore", image_id, timeout_s=120, check=False)

    return image_id, forget


# --- fixtures (registered by conftest.py) -----------------------------------------------------------

@pytest.fixture(name="podman_env")
def podman_env_fixture(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The podman environment, also set in os.environ for this test, so code under test that runs podman,
    skopeo or buildah uses the private store and configuration."""
    for key, value in podman_setup().env.items():
        monkeypatch.setenv(key, value)
    return podman_env()


@pytest.fixture(name="python_base_layout", scope="session")
def python_base_layout_fixture() -> tuple[Path, str]:
    from python_base import python_base_layout

    return python_base_layout()
