"""CPU quota and memory limits through real cgroups: throttling, out-of-memory verdicts, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepack.bench.isolation import (
    CgroupLimits,
    Hierarchy,
    availability,
    isolate,
    own_cgroups,
)
from edgepack.bench.profiles import load_profile_file
from edgepack.cli import app
from edgepack.errors import InputError

_BLOCKED = {c: state for c, state in availability().items() if not state.startswith("cgroup v")}
needs_cgroups = pytest.mark.skipif(bool(_BLOCKED), reason="cgroup limits cannot be set here: " + "; ".join(
    f"{c}: {state}" for c, state in _BLOCKED.items()))

# Spins for about a second of wall time; prints CPU seconds and wall seconds it got.
_BUSY = ("import time\nwall, cpu = time.monotonic(), time.process_time()\n"
         "while time.monotonic() - wall < 1.5: pass\n"
         "print(time.process_time() - cpu, time.monotonic() - wall)")
_GREEDY = "block = b'x' * (200 << 20)\nprint(len(block))"  # every byte written: 200 MB really resident

EDGE_1CORE = '''name = "tiny"
description = "test profile"
kind = "edge"
arch = "x86_64"
cpus = 1
memory_mb = 48
{extra}
[onnxruntime]
version = "1.17"
threads = 1
'''


def _leftovers() -> list[Path]:
    """Cgroups this test process made and did not remove."""
    found: list[Path] = []
    for where in own_cgroups().values():
        if isinstance(where, Hierarchy):
            found += where.own.glob(f"edgepack-{os.getpid()}-*")
    return found


@pytest.fixture(autouse=True)
def _no_cgroup_left_behind():
    yield
    assert _leftovers() == []


@needs_cgroups
def test_cpu_quota_throttles_a_busy_child():
    with isolate(CgroupLimits(cpu_quota=0.2)) as cage:
        assert cage.enforced["cpu_quota"].startswith("cgroup v") and "0.2 core(s)" in cage.enforced["cpu_quota"]
        assert cage.not_enforced == {"memory": "the profile sets no memory limit"}
        done = subprocess.run(cage.wrap([sys.executable, "-c", _BUSY]), check=False, capture_output=True, text=True, timeout=60)
        stat = dict(line.split() for line in (cage.groups[0] / "cpu.stat").read_text().splitlines())
    assert done.returncode == 0, done.stderr
    cpu_s, wall_s = map(float, done.stdout.split())
    # Load from others only lowers the CPU share; 0.2 cores plus one period of slack stays far below 0.5.
    assert cpu_s / wall_s < 0.5, (cpu_s, wall_s)
    assert int(stat["nr_throttled"]) > 0, stat


@needs_cgroups
def test_a_child_over_the_memory_limit_is_killed_and_said_to_be():
    with isolate(CgroupLimits(memory_mb=48)) as cage:
        assert "48 MB" in cage.enforced["memory"]
        done = subprocess.run(cage.wrap([sys.executable, "-c", _GREEDY]), check=False, capture_output=True, text=True, timeout=60)
        assert cage.out_of_memory(done.returncode), (done.returncode, done.stderr)
    assert done.stdout == ""


@needs_cgroups
def test_a_child_under_the_memory_limit_runs_and_is_not_called_out_of_memory():
    with isolate(CgroupLimits(memory_mb=256)) as cage:
        done = subprocess.run(cage.wrap([sys.executable, "-c", _GREEDY]), check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not cage.out_of_memory(done.returncode), done.stderr


@needs_cgroups
def test_cgroups_are_removed_when_the_block_fails():
    with pytest.raises(RuntimeError), isolate(CgroupLimits(cpu_quota=0.5, memory_mb=64)) as cage:
        assert len(cage.groups) >= 1 and all(group.is_dir() for group in cage.groups)
        raise RuntimeError("the benchmark failed")
    assert not any(group.exists() for group in cage.groups)


def test_no_limits_make_no_cgroup():
    with isolate(CgroupLimits()) as cage:
        assert cage.groups == [] and cage.wrap(["true"]) == ["true"]
    assert cage.report() == {"cpu_quota": "not enforced (the profile sets no CPU quota)",
                             "memory": "not enforced (the profile sets no memory limit)"}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop it")
def test_without_write_access_each_limit_says_why_it_is_not_enforced():
    probe = ("import json; from edgepack.bench.isolation import CgroupLimits, isolate\n"
             "with isolate(CgroupLimits(cpu_quota=0.5, memory_mb=64)) as cage: print(json.dumps(cage.report()))")
    # The unprivileged user may not read the checkout or the venv (a clone in a mode-700 folder):
    # give it a world-readable copy of the package and the base interpreter (isolation needs only
    # the standard library).
    readable = Path(tempfile.mkdtemp(prefix="edgepack-nobody-"))
    try:
        shutil.copytree(Path(__file__).resolve().parent.parent / "edgepack", readable / "edgepack",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for folder in [readable, *(p for p in readable.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        for file in (p for p in readable.rglob("*") if p.is_file()):
            file.chmod(0o644)
        interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", interpreter, "-I", "-c",
                               f"import sys; sys.path.insert(0, {str(readable)!r}); {probe}"],
                              check=False, capture_output=True, text=True, timeout=60, cwd=readable)
    finally:
        shutil.rmtree(readable)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for limit in ("cpu_quota", "memory"):
        assert report[limit].startswith("not enforced (") and "not root" in report[limit], report


@needs_cgroups
def test_bench_reports_memory_and_cpu_quota_as_enforced_on_edge_1core(built_bundle):
    result = CliRunner().invoke(app, ["bench", str(built_bundle), "--profile", "edge-1core", "--json",
                                      "--bench-time", "0.2"])
    assert result.exit_code == 0, result.output
    limits = json.loads(result.stdout)["limits"]
    assert limits["memory"].startswith("enforced (cgroup v") and "512 MB" in limits["memory"], limits
    assert limits["cpu_quota"].startswith("enforced (cgroup v") and "1 core(s)" in limits["cpu_quota"], limits
    assert limits["cpu_affinity"].startswith("enforced") and limits["threads"].startswith("enforced")


@needs_cgroups
@pytest.mark.parametrize("processes", [1, 3])
def test_a_model_over_the_profile_memory_is_an_out_of_memory_verdict(tmp_path, processes):
    """A 128 MB weight under a 48 MB profile: exit code 6 and one line, not a crash."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.bench.runner import BenchSettings, bench_onnx
    from edgepack.errors import BudgetExceeded

    weight = numpy_helper.from_array(np.ones(32 << 20, dtype=np.float32), "weight")
    graph = helper.make_graph([helper.make_node("Add", ["x", "weight"], ["y"])], "big", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [32 << 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32 << 20])], [weight])
    model = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    profile = tmp_path / "tiny.toml"
    profile.write_text(EDGE_1CORE.format(extra=""))
    with pytest.raises(BudgetExceeded) as caught:
        bench_onnx(model, None, load_profile_file(profile), BenchSettings.timed(0.1, processes=processes))
    assert int(caught.value.exit_code) == 6 and "\n" not in caught.value.one_line()
    assert str(caught.value) == "the model needs more than 48 MB: out of memory under tiny's 48 MB limit"


@pytest.mark.parametrize("extra, message", [
    ("cpu_share = 0.5", "cpu_share: unknown key"),
    ("cpu_quota = 2.0", "cpu_quota 2 is more than the 1 core(s) of cpus"),
    ("cpu_quota = 0", "cpu_quota: Input should be greater than 0"),
])
def test_bad_profile_keys_are_rejected(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(EDGE_1CORE.format(extra=extra))
    with pytest.raises(InputError) as caught:
        load_profile_file(path)
    assert message in str(caught.value)


def test_cpu_quota_defaults_to_cpus_and_can_be_a_fraction(tmp_path):
    path = tmp_path / "half.toml"
    path.write_text(EDGE_1CORE.format(extra=""))
    assert load_profile_file(path).quota_cores() == 1.0
    path.write_text(EDGE_1CORE.format(extra="cpu_quota = 0.5"))
    assert load_profile_file(path).quota_cores() == 0.5


def test_runtime_records_the_launchers_word_and_refuses_unknown_limits(tmp_path):
    from edgepack.runtime.bench import Limits, apply_limits

    alone = apply_limits(Limits(memory_mb=512, cpu_quota=0.5)).applied
    assert alone["memory"].startswith("not enforced (512 MB is recorded")
    assert alone["cpu_quota"].startswith("not enforced (0.5 core(s) is recorded")
    told = apply_limits(Limits(memory_mb=512, outside=(("memory", "enforced (cgroup v1 test)"),))).applied
    assert told["memory"] == "enforced (cgroup v1 test)"
    refused = subprocess.run([sys.executable, "-m", "edgepack.runtime.bench", "--model", str(tmp_path / "m.onnx"),
                              "--enforced", "disk=yes"], check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "expected LIMIT=TEXT" in json.loads(refused.stderr)["error"]
