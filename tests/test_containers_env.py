"""The container test environment of tests/containers.py works here: podman with a private store, the Python
base image made with debootstrap (as a podman image and an OCI layout), containers serving on a published port,
and a local registry that skopeo pushes to and inspects."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import containers
import python_base
from containers import (
    ContainerError,
    http_get,
    podman,
    podman_run,
    podman_run_detached,
    skopeo,
)
from local_registry import run_local_registry
from python_base import BASE_IMAGE


def _our_containers() -> list[str]:
    listed = podman("ps", "-a", "--filter", f"label={containers.OWNER_LABEL}={os.getpid()}", "--format", "{{.Names}}")
    return listed.stdout.split()


def test_podman_uses_the_private_configuration_without_warnings(podman_env):
    info = podman("info", "--format", "json")
    assert "level=warning" not in info.stderr and "WARN" not in info.stderr, info.stderr
    facts = json.loads(info.stdout)
    root = containers.podman_setup().root
    assert facts["store"]["graphRoot"].startswith(str(root))
    run_root = facts["store"]["runRoot"]
    assert run_root.startswith("/run/edgepack-ctr/") and len(run_root) <= 50  # podman 4.3's limit
    assert facts["store"]["configFile"] == podman_env["CONTAINERS_STORAGE_CONF"]
    assert facts["host"]["ociRuntime"]["name"] == "runc"
    assert (facts["host"]["cgroupManager"], facts["host"]["eventLogger"]) == ("cgroupfs", "file")
    # The fixture also set the variables for code under test that runs podman itself.
    assert os.environ["CONTAINERS_CONF"] == podman_env["CONTAINERS_CONF"]


@pytest.mark.slow
def test_base_image_runs_python_with_bounded_limits(python_base_layout):
    started = time.monotonic()
    done = podman_run(BASE_IMAGE, "python3", "-c", "import resource, sys; print(sys.version); "
                      "print(*(resource.getrlimit(getattr(resource, 'RLIMIT_' + n))[1] for n in ('NOFILE', 'NPROC')))",
                      timeout_s=60)
    assert done.returncode == 0, done.stderr
    version, limits = done.stdout.splitlines()
    assert version.startswith("3.11.")
    nofile, nproc = map(int, limits.split())
    assert nofile == resource.getrlimit(resource.RLIMIT_NOFILE)[1] and nproc <= 32768
    # Not the 20 s of conmon's timeout that a failed cleanup (a runroot over 50 characters) costs each run.
    assert time.monotonic() - started < 10
    assert _our_containers() == []  # --rm


@pytest.mark.slow
def test_base_image_is_built_once_and_recorded(python_base_layout):
    layout, tag = python_base_layout
    record = python_base.base_image_record()
    assert tag == "3.11" and record["tag"] == tag and record["python"].startswith("3.11.")
    assert 30e6 < record["layout_bytes"] < record["image_bytes"] < 250e6  # trimmed: no apt lists, docs, caches
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == record["manifest_digest"]
    assert not list(layout.parent.parent.glob(f".{layout.parent.name}.*"))  # no half-built copy left
    started = time.monotonic()
    assert python_base.python_base_layout() == (layout, tag)
    assert time.monotonic() - started < 1
    image = podman("image", "inspect", BASE_IMAGE, "--format", "{{json .Config}}")
    config = json.loads(image.stdout)
    assert "LANG=C.UTF-8" in config["Env"] and config["Cmd"] == ["python3"]
    trimmed = podman_run(BASE_IMAGE, "find", "/var/lib/apt/lists", "/var/cache/apt", "/usr/share/man", "/dev",
                         "-mindepth", "1", "-not", "-path", "/dev/*", timeout_s=60)
    assert trimmed.returncode == 0 and trimmed.stdout == "", trimmed.stdout[:2000] + trimmed.stderr


@pytest.mark.slow
def test_http_server_in_the_base_image_answers_through_the_published_port(python_base_layout):
    with podman_run_detached(BASE_IMAGE, "python3", "-m", "http.server", "8080", port=8080, user="65532:65532",
                             env={"PYTHONUNBUFFERED": "1"}, timeout_s=120) as url:
        assert url.startswith("http://127.0.0.1:")
        status, body = http_get(url + "/etc/")
        assert status == 200 and b"os-release" in body
        who = podman("ps", "--filter", f"label={containers.OWNER_LABEL}={os.getpid()}", "--format", "{{.Names}}")
        assert len(who.stdout.split()) == 1
    assert _our_containers() == []


@pytest.mark.slow
def test_archive_is_loaded_run_and_forgotten(python_base_layout, tmp_path):
    # A docker-load-able tar of a new image (one more config line on the base), as the image writer makes.
    name = f"localhost/edgepack-test-archive:{os.getpid()}"
    (tmp_path / "Containerfile").write_text(f"FROM {BASE_IMAGE}\nENV MARK=from-the-archive\n")
    podman("build", "--quiet", "--pull=never", "-t", name, str(tmp_path), timeout_s=300)
    image_id = podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    podman("save", "--quiet", "-o", str(tmp_path / "image.tar"), name, timeout_s=300)
    podman("rmi", name)
    serve = 'echo "$MARK" > /tmp/mark && cd /tmp && exec python3 -m http.server 9000'
    with podman_run_detached(tmp_path / "image.tar", "sh", "-c", serve, port=9000, user="65532",
                             timeout_s=120) as url:
        assert http_get(url + "/mark") == (200, b"from-the-archive\n")
    assert _our_containers() == []
    assert podman("image", "exists", image_id, check=False).returncode == 1  # loaded here, so removed here
    assert podman("image", "exists", BASE_IMAGE, check=False).returncode == 0  # its layers stay with the base


@pytest.mark.slow
def test_oci_layout_folder_runs_and_its_copy_is_untagged(python_base_layout):
    layout, _ = python_base_layout
    before = set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    with podman_run_detached(layout, "python3", "-m", "http.server", "8080", timeout_s=120) as url:
        assert http_get(url + "/")[0] == 200
    assert set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()) == before


@pytest.mark.slow
def test_a_container_that_dies_fails_at_once_with_its_logs(python_base_layout, capsys):
    started = time.monotonic()
    dies = podman_run_detached(BASE_IMAGE, "python3", "-c", "print('boom before serving'); raise SystemExit(3)",
                               ready_timeout_s=60)
    with pytest.raises(ContainerError, match=r"ended \(\w+, exit 3\) before"), dies:
        pytest.fail("the container never served")
    assert time.monotonic() - started < 30
    assert "boom before serving" in capsys.readouterr().out
    assert _our_containers() == []


@pytest.mark.slow
def test_podman_timeout_ends_a_detached_container_on_its_own(python_base_layout):
    """What bounds a container whose test process was killed: conmon enforces --timeout, then runs podman's
    cleanup ('exited', not 'stopped': the cleanup works with this configuration)."""
    name = f"edgepack-test-timeout-{os.getpid()}"
    try:
        podman("run", "-d", "--name", name, *containers._bounded(2), BASE_IMAGE, "sleep", "600")
        deadline = time.monotonic() + 30
        while podman("container", "inspect", "--format", "{{.State.Status}}", name).stdout.strip() != "exited":
            assert time.monotonic() < deadline, "--timeout did not stop the container, or it was not cleaned up"
            time.sleep(0.5)
    finally:
        podman("rm", "-f", "-t", "0", "--ignore", name, check=False)


def test_skopeo_inspects_the_base_layout(python_base_layout):
    layout, tag = python_base_layout
    facts = json.loads(skopeo("inspect", f"oci:{layout}:{tag}").stdout)
    architecture = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    assert (facts["Os"], facts["Architecture"]) == ("linux", architecture)
    assert facts["Digest"] == python_base.base_image_record()["manifest_digest"] and len(facts["Layers"]) == 1


def test_registry_answers_and_stops(tmp_path):
    with run_local_registry(tmp_path / "registry") as address:
        status, body = http_get(f"http://{address}/v2/")
        assert status == 200 and json.loads(body) == {}
    with pytest.raises(OSError):
        http_get(f"http://{address}/v2/", timeout_s=2)


@pytest.mark.slow
def test_base_image_goes_through_the_local_registry(python_base_layout, local_registry):
    layout, tag = python_base_layout
    remote = f"docker://{local_registry}/edgepack/python:{tag}"
    skopeo("copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", remote)
    facts = json.loads(skopeo("inspect", "--tls-verify=false", remote).stdout)
    assert facts["Name"] == f"{local_registry}/edgepack/python" and tag in facts["RepoTags"]
    assert facts["Digest"] == python_base.base_image_record()["manifest_digest"]  # the same bytes, pushed as is


def test_the_build_lock_keeps_a_second_process_out(tmp_path):
    lock = tmp_path / ".lock"
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import containers\n"
             "try:\n    with containers.locked(Path(sys.argv[2]), timeout_s=1): print('got it')\n"
             "except containers.ContainerError as err: print(err)\n")
    repository = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repository, os.environ.get("PYTHONPATH", "")])}
    with containers.locked(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(Path(__file__).parent), str(lock)], env=env,
                              check=False, capture_output=True, text=True, timeout=60)
    assert "stayed locked for 1 s by another test run" in held.stdout, held.stderr
    free = subprocess.run([sys.executable, "-c", probe, str(Path(__file__).parent), str(lock)], env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert free.stdout.strip() == "got it", free.stderr


def test_a_missing_tool_is_a_skip_reason_naming_it(monkeypatch):
    monkeypatch.setattr(containers, "tool", lambda name: None if name == "skopeo" else f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert containers._why_no_podman() == "skopeo not installed (.ci/run installs it)"


def test_an_unreachable_mirror_skips_with_debootstraps_reason(podman_env, tmp_path):
    """In a store of its own (a fresh process, another cache): the build fails at once and says why."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import _pytest.outcomes, containers, python_base\n"
             "try:\n    python_base.python_base_layout()\n"
             "except _pytest.outcomes.Skipped as skip:\n    print(skip.msg)\n"
             "print(containers.podman_setup().env['CONTAINERS_STORAGE_CONF'])\n")
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache"),
           "EDGEPACK_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
    for name in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF"):
        env.pop(name)
    done = subprocess.run([sys.executable, "-c", probe, str(Path(__file__).parent)], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    reason, storage_conf = done.stdout.splitlines()[-2:]
    assert reason.startswith("debootstrap of bookworm from http://127.0.0.1:9/debian failed (exit 1): "), done
    assert "127.0.0.1:9" in reason.split(": ", 1)[1]  # debootstrap's own last line names what it could not get
    assert not list((tmp_path / "cache" / "test-containers").glob(".base-python-*"))  # the half-made tree is gone
    run_root = next(line for line in Path(storage_conf).read_text().splitlines() if line.startswith("runroot"))
    shutil.rmtree(Path(json.loads(run_root.split("=", 1)[1])).parent)  # its /run/edgepack-ctr/<hash> folder
