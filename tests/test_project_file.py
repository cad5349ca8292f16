"""edgepack.toml: build options, bench defaults and budgets from a project file; flags still win."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app

runner = CliRunner()


@pytest.fixture
def project(data_dir, tmp_path, monkeypatch):
    """A project folder holding its model and sample, with edgepack.toml written by each test."""
    for name in ("classifier.skops", "sample.npy"):
        shutil.copy(data_dir / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)

    def write(text: str) -> Path:
        path = tmp_path / "edgepack.toml"
        path.write_text(text)
        return path

    return write


BUILD = """
[build]
model = "classifier.skops"
sample = "sample.npy"
out = "bundles"
quantize = "none"
bench_time = 0.2
"""


def test_build_takes_everything_from_the_project_file(project, tmp_path):
    project(BUILD)
    result = runner.invoke(app, ["build", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["bundle"]).parent.resolve() == tmp_path / "bundles" and summary["variant"] == "fp32"
    shown = runner.invoke(app, ["build", "--out", "shown"])
    assert shown.exit_code == 0 and "options from edgepack.toml" in shown.stderr
    renamed = runner.invoke(app, ["build", "--json", "--quiet", "--name", "other", "--out", "elsewhere"])
    assert renamed.exit_code == 0, renamed.output
    assert Path(json.loads(renamed.stdout)["bundle"]).name.startswith("other-")
    assert (tmp_path / "elsewhere").is_dir()


def test_budgets_from_the_file_apply_and_flags_override_them(project):
    project(BUILD + "[budgets]\nmax_memory_mb = 1\n")
    assert_one_line_error(runner.invoke(app, ["build", "--quiet"]), 6, "exceeds the budget of 1 MB")
    allowed = runner.invoke(app, ["build", "--quiet", "--max-memory-mb", "4096"])
    assert allowed.exit_code == 0, allowed.output


def test_bench_defaults_from_the_file(project, built_bundle):
    project("[bench]\nprofile = \"cloud-cpu\"\nbatch = \"1,4\"\nprocesses = 1\nbench_time = 0.2\n"
            "[budgets]\nmax_p99_ms = 10000\n")
    result = runner.invoke(app, ["bench", str(built_bundle), "--json"])
    assert result.exit_code == 0, result.output
    configs = json.loads(result.stdout)["results"]
    assert [(c["batch"], c["profile"]) for c in configs] == [(1, "cloud-cpu"), (4, "cloud-cpu")]
    one = runner.invoke(app, ["bench", str(built_bundle), "--json", "--batch", "2"])
    assert one.exit_code == 0 and json.loads(one.stdout)["batch"] == 2


def test_config_elsewhere_resolves_paths_from_its_own_folder(project, tmp_path, monkeypatch):
    config = project(BUILD)
    away = tmp_path / "away"
    away.mkdir()
    monkeypatch.chdir(away)
    result = runner.invoke(app, ["build", "--json", "--quiet", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["bundle"]).parent == tmp_path / "bundles"


@pytest.mark.parametrize("text, message", [
    ("[biuld]\nmodel = \"m\"\n", "edgepack.toml: biuld: unknown key"),
    ("[build]\nmodle = \"m\"\n", "edgepack.toml: build.modle: unknown key"),
    ("[budgets]\nmax_p99_ms = -1\n", "edgepack.toml: budgets.max_p99_ms: Input should be greater than 0"),
    ("[bench]\nprocesses = \"many\"\n", "edgepack.toml: bench.processes:"),
    ("[build\n", "edgepack.toml: not valid TOML"),
])
def test_bad_project_files_are_one_line_errors(project, text, message):
    project(text)
    assert_one_line_error(runner.invoke(app, ["build", "--quiet"]), 3, message, text)


def test_no_model_anywhere_is_a_usage_error(project):
    project("[build]\nsample = \"sample.npy\"\n")
    assert_one_line_error(runner.invoke(app, ["build", "--quiet"]), 2, "missing MODEL")


def test_a_missing_config_file_is_named(tmp_path):
    result = runner.invoke(app, ["build", "--config", str(tmp_path / "nope.toml")])
    assert_one_line_error(result, 3, "nope.toml: cannot read project file")
