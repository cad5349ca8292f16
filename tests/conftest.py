"""Tiny real models made in the tests: fitted estimators, saved with skops, and their sample rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgepack.spec import BuildSpec

FEATURES = 6

# podman_env and python_base_layout (tests/containers.py), local_registry (tests/local_registry.py):
# the container test environment.
pytest_plugins = ["containers", "local_registry"]


@pytest.fixture(autouse=True)
def _own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: what a command writes beside it by default (edgepack.lock,
    dist/) never lands in the repository or reaches another test."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, FEATURES)).astype(np.float32)
    classes = (rows[:, 0] + rows[:, 1] * rows[:, 2] > 0).astype(int) + (rows[:, 3] > 1).astype(int)
    target = rows @ np.arange(1, FEATURES + 1, dtype=np.float32) + 0.5
    np.save(root / "sample.npy", rows)
    # lbfgs keeps no optimizer object, so every type in these files is on skops' default trust list.
    classifier = MLPClassifier(hidden_layer_sizes=(64, 64), solver="lbfgs", max_iter=300, random_state=0)
    sio.dump(classifier.fit(rows, classes), root / "classifier.skops")
    sio.dump(Ridge().fit(rows, target), root / "regressor.skops")
    pipeline = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs",
                                                             max_iter=300, random_state=0))
    sio.dump(pipeline.fit(rows, classes), root / "pipeline.skops")
    return root


@pytest.fixture
def spec_for(data_dir: Path, tmp_path: Path):
    """A fast BuildSpec for one of the tiny models (short benchmarks, output in the test's folder)."""

    def make(model_file: str, **overrides) -> BuildSpec:
        fields = {"model": data_dir / model_file, "sample": data_dir / "sample.npy", "out": tmp_path / "dist",
                  "bench_time_s": 0.2, **overrides}
        return BuildSpec(**fields)

    return make


@pytest.fixture(scope="session")
def built_bundle(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle of the classifier, shared by the tests that only read it."""
    from edgepack.pipeline import build

    out = tmp_path_factory.mktemp("dist")
    spec = BuildSpec(model=data_dir / "classifier.skops", sample=data_dir / "sample.npy", out=out,
                     bench_time_s=0.2)
    return build(spec).bundle


@pytest.fixture(scope="module")
def bundle_dir(built_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``built_bundle`` unpacked, once per test module (a module may change its copy)."""
    from edgepack.runtime.bundle import extract_archive

    return extract_archive(built_bundle, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def rows(data_dir: Path) -> np.ndarray:
    return np.load(data_dir / "sample.npy")
