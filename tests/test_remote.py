"""``edgepack bench --ssh`` against a real OpenSSH server started here on 127.0.0.1, as this user.

The "device" is this machine, so the remote Python is this test's interpreter (it has numpy and
onnxruntime). Only 127.0.0.0/8 addresses are ever targeted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.bench.profiles import resolve_profile
from edgepack.bench.remote import (
    DeviceAuthError,
    DeviceUnreachable,
    RemoteSettings,
    SshTarget,
    bench_on_device,
)
from edgepack.bench.runner import BenchSettings
from edgepack.cli import app
from edgepack.errors import ExitCode

runner = CliRunner()
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
if not (os.access(SSHD, os.X_OK) and shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen")):
    pytest.skip("openssh-server not installed (.ci/run installs it)", allow_module_level=True)

DEVICE = 9
assert int(ExitCode.DEVICE) == DEVICE


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgepack-test", "-f", str(path)],
                   check=True, timeout=30)
    return path


class Sshd:
    def __init__(self, root: Path) -> None:
        self.root, self.port, self.user = root, _free_port(), os.environ.get("USER") or _whoami()
        host_key = _keygen(root / "host_key")
        self.key = _keygen(root / "client_key")
        self.wrong_key = _keygen(root / "wrong_key")
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {host_key}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", f"PidFile {root / 'sshd.pid'}", "StrictModes no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "",
        ]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        self.log = open(root / "sshd.log", "w")
        self.process = subprocess.Popen([os.path.abspath(SSHD), "-D", "-e", "-f", str(self.config)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not listen: {(root / 'sshd.log').read_text()}") from None
                time.sleep(0.05)

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def own_known_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test trusts the test server's host key on first use, in its own file."""
    path = tmp_path / "known_hosts"
    monkeypatch.setenv("EDGEPACK_KNOWN_HOSTS", str(path))
    return path


def _bench(sshd: Sshd, bundle: Path, *extra: str, key: Path | None = None,
           python: str = sys.executable) -> tuple[object, float]:
    args = ["bench", str(bundle), "--ssh", sshd.target, "--identity", str(key or sshd.key),
            "--remote-python", python, "--bench-time", "0.2", *extra]
    started = time.monotonic()
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    return result, time.monotonic() - started


def _remote_folders() -> set[str]:
    """Work folders on the "device": sshd gives its sessions no TMPDIR, so they go in /tmp."""
    return {path.name for path in Path("/tmp").glob("edgepack-bench.*")}


def test_device_run_is_measured_there_and_merged_with_the_emulated_profile(sshd, built_bundle, own_known_hosts):
    before = _remote_folders()
    result, _ = _bench(sshd, built_bundle, "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert set(comparison) == {"device", "emulated"}
    device, emulated = comparison["device"], comparison["emulated"]
    assert device["measured_on"] == f"device {sshd.user}@127.0.0.1"
    assert emulated["measured_on"] == "this host, emulating edge-1core"
    for report in (device, emulated):
        assert report["p50_ms"] > 0 and report["p99_ms"] >= report["p50_ms"] and report["profile"] == "edge-1core"
    env = device["environment"]
    assert env["cpu_model"] and env["machine"] and env["onnxruntime"]
    assert device["device"] == {"ssh": sshd.target, "python": sys.executable}
    assert device["limits"]["cpu_affinity"].startswith("enforced")  # the profile's limits, applied on the device
    assert "on the device" in device["bundle"]["verified"]
    recorded = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(own_known_hosts)],
                              check=False, capture_output=True, text=True, timeout=30)
    assert recorded.returncode == 0  # accepted on first use, into edgepack's own file
    assert _remote_folders() == before  # the work folder is gone


def test_human_output_shows_both_rows(sshd, built_bundle):
    result, _ = _bench(sshd, built_bundle)
    assert result.exit_code == 0, result.output
    for text in (f"device {sshd.user}@127.0.0.1", "this host, emulating edge-1core", "p50 ms", "p99 ms",
                 "onnxruntime", "device/emulated p50"):
        assert text in result.stdout


def test_another_architecture_shows_the_device_alone(sshd, built_bundle):
    result, _ = _bench(sshd, built_bundle, "--profile", "edge-arm64-4c-4gb", "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert comparison["emulated"] is None and comparison["device"]["p50_ms"] > 0


def test_wrong_key_is_an_auth_error_at_once(sshd, built_bundle):
    result, seconds = _bench(sshd, built_bundle, key=sshd.wrong_key)
    assert_one_line_error(result, DEVICE, "authentication failed")
    assert "authorized_keys" in result.stderr and seconds < 10


def test_closed_port_is_refused_at_once(built_bundle):
    args = ["bench", str(built_bundle), "--ssh", f"root@127.0.0.1:{_free_port()}"]
    started = time.monotonic()
    result = runner.invoke(app, args)
    assert_one_line_error(result, DEVICE, "connection refused")
    assert time.monotonic() - started < 10


def test_silent_port_times_out_instead_of_hanging(built_bundle):
    """A listener that never speaks SSH: ConnectTimeout bounds the handshake too."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        target = SshTarget.parse(f"root@127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(DeviceUnreachable, match="timed out") as caught:
            bench_on_device(built_bundle, target, resolve_profile("edge-1core"), BenchSettings.timed(0.2),
                            RemoteSettings(python=sys.executable, connect_timeout_s=2))
    assert time.monotonic() - started < 15
    assert caught.value.exit_code == DEVICE and caught.value.hint


def test_tampered_bundle_is_refused_before_copying(sshd, built_bundle, tmp_path, own_known_hosts):
    tampered = tmp_path / "tampered.tar.gz"
    raw = bytearray(built_bundle.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    result, _ = _bench(sshd, tampered)
    assert_one_line_error(result, int(ExitCode.INTEGRITY), "tampered.tar.gz")
    assert not own_known_hosts.exists()  # no connection was made


def _python_without_onnxruntime(tmp_path: Path) -> str:
    system = Path("/usr/bin/python3")
    if system.is_file() and subprocess.run([system, "-c", "import onnxruntime"], check=False, capture_output=True,
                                           timeout=60).returncode != 0:
        return str(system)
    # The system Python has it: a bare virtual environment of this interpreter has neither module.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    return str(tmp_path / "bare" / "bin" / "python")


@pytest.mark.parametrize("case, text", [
    ("missing", "no such Python"),
    ("no-onnxruntime", "cannot import"),
])
def test_remote_python_must_exist_and_have_the_runtime_deps(sshd, built_bundle, tmp_path, case, text):
    python = "/nonexistent/python3" if case == "missing" else _python_without_onnxruntime(tmp_path)
    before = _remote_folders()
    result, seconds = _bench(sshd, built_bundle, python=python)
    assert_one_line_error(result, DEVICE, text, case)
    assert "--remote-python" in result.stderr and seconds < 30
    assert _remote_folders() == before


def _wrapper(tmp_path: Path, body: str) -> str:
    """A remote "python" that changes the device before running the real one, to make the run fail there."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\ncase "$*" in *runtime.bench*) {body};; esac\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_bundle_altered_on_the_device_fails_its_verification_there(sshd, built_bundle, tmp_path):
    python = _wrapper(tmp_path, "echo stray > stray.txt")
    before = _remote_folders()
    result, _ = _bench(sshd, built_bundle, python=python)
    assert_one_line_error(result, int(ExitCode.INTEGRITY), "stray.txt is not listed in SHA256SUMS")
    assert f"on {sshd.target}" in result.stderr
    assert _remote_folders() == before  # removed on failure too


def test_remote_benchmark_failure_shows_its_one_line_error(sshd, built_bundle, tmp_path):
    python = _wrapper(tmp_path, 'set -- "$@" --model missing.onnx')
    result, _ = _bench(sshd, built_bundle, python=python)
    assert_one_line_error(result, DEVICE, f"the benchmark on {sshd.target} failed: missing.onnx: no such model file")


def test_auth_error_from_the_core_names_its_type(sshd, built_bundle):
    target = SshTarget.parse(sshd.target, sshd.wrong_key)
    with pytest.raises(DeviceAuthError):
        bench_on_device(built_bundle, target, resolve_profile("edge-1core"), BenchSettings.timed(0.2),
                        RemoteSettings(python=sys.executable))


@pytest.mark.parametrize("spec", ["", "user@", "-oProxyCommand=x", "user@host:0", "user@host:99999", "a b@host"])
def test_bad_targets_are_input_errors(built_bundle, spec):
    result = runner.invoke(app, ["bench", str(built_bundle), "--ssh", spec])
    assert_one_line_error(result, int(ExitCode.BAD_INPUT), "is not user@host[:port]", spec)


def test_targets_parse():
    assert SshTarget.parse("pi@10.0.0.7").address == "pi@10.0.0.7"
    assert SshTarget.parse("pi@box:2222").port == 2222
    assert SshTarget.parse("box").login == "box"
    six = SshTarget.parse("pi@[::1]:2200")
    assert (six.host, six.port, six.address) == ("::1", 2200, "pi@[::1]:2200")


def test_a_bundle_with_wheels_needs_only_python_on_the_device(sshd, tmp_path):
    """An --arch bundle brings numpy and onnxruntime: a bare Python on the device is enough."""
    from edgepack.package.wheels import WheelFetchError
    from edgepack.pipeline import build
    from edgepack.spec import BuildSpec

    examples = Path(__file__).resolve().parents[1] / "examples"
    if os.uname().machine != "x86_64":
        pytest.skip("the device here is this host: needs x86_64 to run x86_64 wheels")
    try:
        bundle = build(BuildSpec(model=examples / "digits_mlp.skops", sample=examples / "digits_sample.npy",
                                 out=tmp_path / "dist", quantize="none", bench_time_s=0.2, arch="x86_64",
                                 python_version=f"{sys.version_info.major}.{sys.version_info.minor}")).bundle
    except WheelFetchError as err:
        pytest.skip(f"cannot fetch wheels: {err.one_line()}")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    result, _ = _bench(sshd, bundle, "--json", "--processes", "2", python=str(tmp_path / "bare" / "bin" / "python"))
    assert result.exit_code == 0, result.output
    device = json.loads(result.stdout)["device"]
    assert device["measured_on"].startswith("device ") and device["interval"].startswith("between 2 processes")
    from edgepack.runtime.bundle import verify_archive

    carried = verify_archive(bundle).manifest["wheels"]["versions"]
    assert device["environment"]["onnxruntime"] == carried["onnxruntime"] and device["p50_ms"] > 0
