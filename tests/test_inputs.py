"""Profiles and sample data: validated on load, with errors that name the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.bench.profiles import all_profiles, host_arch, load_profile_file, resolve_profile
from edgepack.convert.base import LoadOptions
from edgepack.convert.opsets import support_for
from edgepack.convert.sklearn import SklearnConverter
from edgepack.errors import InputError, UnsupportedHere
from edgepack.samples import Generated, generate, read_sample
from edgepack.signature import TensorInfo

TABLE = (TensorInfo("X", "float32", ("?", 2)),)


def test_builtin_profiles_and_aliases():
    names = {p.name for p in all_profiles()}
    assert {"cloud-cpu", "edge-1core", "edge-arm64-4c-4gb"} <= names
    assert resolve_profile("edge").name == "edge-1core"
    assert resolve_profile("cloud").name == "cloud-cpu"
    edge = resolve_profile("edge-1core")
    assert edge.cpus == 1 and edge.onnxruntime.threads == 1 and edge.memory_mb


def test_unknown_profile_key_is_named(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name="x"\ndescription="d"\nkind="edge"\narch="x86_64"\ncpu=2\n[onnxruntime]\nversion="1.17"\n')
    with pytest.raises(InputError, match=r"p.toml: cpu: unknown key"):
        load_profile_file(path)
    path.write_text('name="x"\ndescription="d"\nkind="edge"\narch="x86_64"\n[onnxruntime]\nversion="1.17"\nthreads=-1\n')
    with pytest.raises(InputError, match=r"onnxruntime.threads"):
        load_profile_file(path)
    path.write_text("name = [")
    with pytest.raises(InputError, match="not valid TOML"):
        load_profile_file(path)


def test_other_architecture_is_never_benchmarked_here():
    other = resolve_profile("edge-arm64-4c-4gb")
    if host_arch() == "aarch64":
        pytest.skip("this host is aarch64")
    with pytest.raises(UnsupportedHere, match="only on the device"):
        other.require_runnable_here()


def test_opset_table():
    assert support_for("1.17") == (20, 4, 9)
    assert support_for("1.17.3")[0] == 20
    assert support_for("1.40")[0] >= 22
    with pytest.raises(InputError, match="older than edgepack supports"):
        support_for("1.10")
    with pytest.raises(InputError, match="MAJOR.MINOR"):
        support_for("latest")


def test_csv_sample_names_features(tmp_path):
    (tmp_path / "s.csv").write_text("age,height\n1,2.5\n3,4\n")
    sample = read_sample(tmp_path / "s.csv", TABLE)
    assert sample.feature_names == ("age", "height") and sample.arrays["X"].dtype == np.float32
    assert sample.arrays["X"].shape == (2, 2) and sample.count == 2


@pytest.mark.parametrize("name, content, message", [
    ("s.csv", "a,b\n1,x\n", "non-numeric cell"),
    ("s.csv", "a,b\n1,2\n3\n", "different numbers of columns"),
    ("s.txt", "1,2\n", "must be .npz, .npy or .csv"),
    ("s.npy", b"garbage", "not a readable .npy"),
])
def test_bad_sample_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        read_sample(path, TABLE)


def test_nan_and_shapes_are_refused(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(InputError, match="NaN"):
        read_sample(tmp_path / "nan.npy", TABLE)
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    with pytest.raises(InputError, match="holds no examples"):
        read_sample(tmp_path / "empty.npy", TABLE)
    with pytest.raises(InputError, match="no such sample file"):
        read_sample(tmp_path / "none.npy", TABLE)


def test_generated_rows_shape():
    unknown = (TensorInfo("input"),)
    assert generate(unknown, Generated.parse(("64",), ())).arrays["input"].shape == (256, 64)
    assert generate(unknown, Generated.parse(("1,8,8",), ())).arrays["input"].shape == (256, 1, 8, 8)
    with pytest.raises(InputError, match="not NAME=DIMS or DIMS"):
        Generated.parse(("a",), ())


def test_pickle_needs_the_flag(data_dir, tmp_path):
    import joblib
    import skops.io as sio

    joblib.dump(sio.load(data_dir / "regressor.skops"), tmp_path / "m.joblib")
    with pytest.raises(InputError, match="loading it can run arbitrary code"):
        SklearnConverter().load(tmp_path / "m.joblib", LoadOptions())
    assert SklearnConverter().load(tmp_path / "m.joblib", LoadOptions(allow_pickle=True)).file_format == "pickle"
