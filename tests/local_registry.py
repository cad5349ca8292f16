"""A local OCI registry for the tests: Debian's docker-registry on 127.0.0.1 (plain HTTP), started
per test by the ``local_registry`` fixture (registered by conftest.py) or by ``run_local_registry``."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path

import pytest

from containers import INSTALL_HINT, ContainerError, free_port, http_get, tool


@contextmanager
def run_local_registry(folder: Path, ready_timeout_s: float = 20) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1, storing in ``folder``; yields ``127.0.0.1:PORT`` (plain HTTP)."""
    binary = tool("docker-registry")
    if not binary:
        pytest.skip(f"docker-registry not installed ({INSTALL_HINT})")
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = free_port()
        config = folder / "registry.yml"  # JSON is YAML
        config.write_text(json.dumps({
            "version": "0.1", "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(folder / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex}}, indent=2))
        log_path = folder / "registry.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            if _registry_ready(process, port, ready_timeout_s, log_path):
                yield f"127.0.0.1:{port}"
                return
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    raise ContainerError(f"docker-registry found no free port on 127.0.0.1 after 3 tries: {log_path.read_text()}")


def _registry_ready(process: subprocess.Popen, port: int, timeout_s: float, log: Path) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            if "address already in use" in log.read_text():
                return False
            raise ContainerError(f"docker-registry exited (exit {process.returncode}): {log.read_text()[-2000:]}")
        try:
            if http_get(f"http://127.0.0.1:{port}/v2/", timeout_s=2)[0] == 200:
                return True
        except (urllib.error.URLError, HTTPException, OSError):
            pass
        if time.monotonic() > deadline:
            raise ContainerError(f"docker-registry did not answer /v2/ within {timeout_s:.0f} s: {log.read_text()}")
        time.sleep(0.1)


@pytest.fixture(name="local_registry")
def local_registry_fixture(tmp_path: Path) -> Iterator[str]:
    with run_local_registry(tmp_path / "registry") as address:
        yield address
