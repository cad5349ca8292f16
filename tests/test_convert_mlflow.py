"""MLflow model folders as input, on folders written by the real mlflow package (mlflow-skinny)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

mlflow = pytest.importorskip("mlflow", reason="the dev extra is not installed: pip install -e '.[dev]'")

import mlflow.onnx  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import mlflow.sklearn  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from cli_checks import assert_one_line_error  # noqa: E402
from edgepack.cli import app  # noqa: E402
from edgepack.convert.base import LoadOptions  # noqa: E402
from edgepack.convert.registry import MLFLOW, converter_for  # noqa: E402
from edgepack.errors import ExitCode, InputError  # noqa: E402
from edgepack.samples import read_sample  # noqa: E402
from edgepack.signature import TensorInfo  # noqa: E402

runner = CliRunner()
ROWS = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
TOKENS = np.random.default_rng(1).integers(0, 10, size=(12, 5))
NO_REQUIREMENTS: dict[str, Any] = {"pip_requirements": []}  # skips mlflow's slow requirement inference


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    """Where the module's MLflow folders and runs live: the tracking store in tmp, never ./mlruns."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store for opt-ins only
        yield folder


def _onnx_model() -> onnx.ModelProto:
    """features[batch, 8] -> Relu(x W1 + b) W2 -> scores[batch, 3]; W1 is past mlflow's 1 KB external-data size."""
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 40)), ("b1", (40,)), ("w2", (40, 3)))]
    nodes = [helper.make_node("MatMul", ["features", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["scores"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def onnx_logged(root: Path) -> dict[str, Any]:
    """An ONNX model logged under a run, with a named signature and an input example."""
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 8), "features")]))
    with mlflow.start_run() as run:
        info = mlflow.onnx.log_model(_onnx_model(), name="model", signature=signature,
                                     input_example={"features": ROWS[:16]}, **NO_REQUIREMENTS)
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    return {"folder": folder, "run_id": run.info.run_id, "model_uuid": info.model_uuid}


@pytest.fixture(scope="module")
def sklearn_folders(root: Path) -> dict[str, Path]:
    classifier = LogisticRegression().fit(ROWS[:, :4], (ROWS[:, 0] > 0).astype(int))
    folders = {form: root / f"sklearn-{form}" for form in ("skops", "cloudpickle")}
    for form, folder in folders.items():
        mlflow.sklearn.save_model(classifier, folder, serialization_format=form, input_example=ROWS[:24, :4],
                                  **NO_REQUIREMENTS)
    import pandas as pd

    table = pd.DataFrame(ROWS[:, :4].astype(np.float64), columns=["age", "height", "weight", "score"])
    folders["dataframe"] = root / "sklearn-dataframe"
    mlflow.sklearn.save_model(LogisticRegression().fit(table, ROWS[:, 1] > 0), folders["dataframe"],
                              serialization_format="skops", input_example=table.head(8), **NO_REQUIREMENTS)
    return folders


@pytest.fixture(scope="module")
def torch_folders(root: Path) -> dict[str, Path]:
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    import mlflow.pytorch

    class TokenNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(tokens).mean(1))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    folders = {form: root / f"torch-{form}" for form in ("torchscript", "pickle", "pt2")}
    # TorchScript (mlflow's "pickle" format of a ScriptModule is torch.jit.save): int64 token ids, named by the signature.
    tokens = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, 5), "token_ids")]))
    mlflow.pytorch.save_model(torch.jit.script(TokenNet().eval()), folders["torchscript"], serialization_format="pickle",
                              signature=tokens, input_example={"token_ids": TOKENS}, **NO_REQUIREMENTS)
    mlflow.pytorch.save_model(net, folders["pickle"], serialization_format="pickle", input_example=ROWS[:16],
                              **NO_REQUIREMENTS)
    mlflow.pytorch.save_model(net, folders["pt2"], serialization_format="pt2", input_example=ROWS[:16],
                              **NO_REQUIREMENTS)
    return folders


def _build(folder: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["build", str(folder), "--out", str(out), "--quantize", "none", "--bench-time", "0.2",
                               "--no-lock", "--quiet", "--json", *extra])


def _built_manifest(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    with tarfile.open(json.loads(result.stdout)["bundle"]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/manifest.json"))
        return json.load(archive.extractfile(member))  # type: ignore[arg-type]


def test_onnx_flavor_builds_with_its_signature_example_and_run(onnx_logged, tmp_path):
    manifest = _built_manifest(_build(onnx_logged["folder"], tmp_path))
    source = manifest["source"]
    assert source["format"] == "mlflow onnx" and source["converter"] == "onnx (as given)"
    assert source["provenance"]["run_id"] == onnx_logged["run_id"]
    assert source["provenance"]["model_uuid"] == onnx_logged["model_uuid"]
    assert manifest["inputs"][0]["name"] == "features" and manifest["inputs"][0]["shape"] == ["batch", 8]
    # No --sample: the input example (16 rows) was the sample.
    assert manifest["parity"]["data"] == "input_example.npz" and manifest["parity"]["samples"] == 16


def test_the_mlmodel_file_itself_is_accepted(onnx_logged):
    folder = onnx_logged["folder"]
    assert converter_for(folder) is MLFLOW and converter_for(folder / "MLmodel") is MLFLOW
    by_file = MLFLOW.load(folder / "MLmodel", LoadOptions())
    assert by_file.inputs == MLFLOW.load(folder, LoadOptions()).inputs == (TensorInfo("features", "float32", ("batch", 8)),)


def test_sklearn_skops_flavor_builds_from_its_example(sklearn_folders, tmp_path):
    manifest = _built_manifest(_build(sklearn_folders["skops"], tmp_path))
    assert manifest["source"]["format"] == "mlflow skops" and manifest["source"]["framework"] == "scikit-learn"
    assert manifest["inputs"][0]["shape"] == ["batch", 4] and manifest["parity"]["samples"] == 24
    assert set(manifest["source"]["provenance"]) >= {"model_uuid", "mlflow_version"}  # saved outside a run: no run_id


def test_sklearn_pickle_needs_allow_pickle(sklearn_folders, tmp_path):
    folder = sklearn_folders["cloudpickle"]
    refused = _build(folder, tmp_path)
    assert_one_line_error(refused, ExitCode.BAD_INPUT, "model.pkl is a pickle (serialization_format cloudpickle)")
    assert "--allow-pickle" in refused.stderr
    source = MLFLOW.load(folder, LoadOptions(allow_pickle=True))
    assert source.file_format == "mlflow pickle" and source.estimator == "LogisticRegression"
    assert source.inputs == (TensorInfo("X", "float32", ("?", 4)),)


def test_a_column_signature_is_one_table(sklearn_folders):
    signature = yaml.safe_load((sklearn_folders["dataframe"] / "MLmodel").read_text())["signature"]
    assert [column["type"] for column in json.loads(signature["inputs"])] == ["double"] * 4  # mlflow's, from the frame
    source = MLFLOW.load(sklearn_folders["dataframe"], LoadOptions())
    assert source.inputs == (TensorInfo("X", "float32", ("?", 4)),)
    assert source.default_sample is not None
    sample = read_sample(source.default_sample, source.inputs)
    assert sample.arrays["X"].shape == (8, 4) and sample.arrays["X"].dtype == np.float32


def test_pytorch_torchscript_takes_the_signatures_names_and_dtypes(torch_folders, tmp_path):
    manifest = _built_manifest(_build(torch_folders["torchscript"], tmp_path))  # no --allow-pickle: TorchScript
    assert manifest["source"]["format"] == "mlflow torchscript"
    # The module's forward says `tokens` and records no dtype; the signature says token_ids, int64.
    [tokens] = manifest["inputs"]
    assert (tokens["name"], tokens["dtype"], tokens["shape"]) == ("token_ids", "int64", ["batch", 5])
    assert manifest["parity"]["samples"] == len(TOKENS)


def test_pytorch_pt2_builds_with_allow_pickle(torch_folders, tmp_path):
    refused = _build(torch_folders["pt2"], tmp_path)
    assert_one_line_error(refused, ExitCode.BAD_INPUT, "data/model.pt2 is a torch.export archive")
    manifest = _built_manifest(_build(torch_folders["pt2"], tmp_path, "--allow-pickle"))
    assert manifest["source"]["format"] == "mlflow pt2" and manifest["inputs"][0]["shape"] == ["batch", 8]
    assert manifest["parity"]["samples"] == 16


def test_pytorch_pickled_module_needs_allow_pickle(torch_folders, tmp_path):
    assert_one_line_error(_build(torch_folders["pickle"], tmp_path), ExitCode.BAD_INPUT,
                          "data/model.pth is a pickled torch module: loading it can run arbitrary code")
    source = MLFLOW.load(torch_folders["pickle"], LoadOptions(allow_pickle=True))
    assert source.file_format == "mlflow pickle" and source.estimator == "Sequential"
    assert source.inputs == (TensorInfo("input", "float32", ("?", 8)),)


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - mlflow's signature
        return model_input


def test_an_unsupported_flavor_is_refused(root, tmp_path):
    folder = root / "pyfunc"
    if not folder.exists():
        mlflow.pyfunc.save_model(folder, python_model=_Echo(), **NO_REQUIREMENTS)
    assert_one_line_error(_build(folder, tmp_path), ExitCode.BAD_INPUT,
                          "edgepack reads the onnx, sklearn, pytorch flavors; this model has python_function")


def _rewrite_signature(folder: Path, inputs: str) -> None:
    description = yaml.safe_load((folder / "MLmodel").read_text())
    description["signature"]["inputs"] = inputs
    (folder / "MLmodel").write_text(yaml.safe_dump(description))


BROKEN = [  # (how the folder is broken, what the one error line says)
    (lambda f: (f / "MLmodel").write_text("flavors: [onnx\n  data: {"), "MLmodel is not valid YAML"),
    (lambda f: (f / "MLmodel").write_text("just a sentence\n"), "MLmodel lists no flavors"),
    (lambda f: (f / "MLmodel").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"), "MLmodel is not a text file"),
    (lambda f: (f / "model.onnx").unlink(), "model.onnx: no such file (the ONNX file MLmodel names)"),
    (lambda f: (f / "input_example.json").write_text("{not json"), "input_example.json is not valid JSON"),
    (lambda f: _rewrite_signature(f, '[{"type": "tensor"'), "the signature's inputs are not valid JSON"),
    (lambda f: _rewrite_signature(f, '[{"type": "tensor", "name": "pixels", "tensor-spec": {"dtype": "float32", '
                                     '"shape": [-1, 8]}}]'), "names input 'pixels', which model.onnx does not have"),
    (lambda f: (f / "MLmodel").unlink(), "not a file"),
]


@pytest.mark.parametrize(("breaks", "message"), BROKEN, ids=[message for _, message in BROKEN])
def test_a_broken_folder_is_one_line_exit_3(onnx_logged, tmp_path, breaks, message):
    folder = tmp_path / "model"
    shutil.copytree(onnx_logged["folder"], folder)
    breaks(folder)
    assert_one_line_error(_build(folder, tmp_path / "dist"), ExitCode.BAD_INPUT, message)


def test_a_signature_that_contradicts_the_model_is_refused(sklearn_folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sklearn_folders["skops"], folder)
    _rewrite_signature(folder, '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 5]}}]')
    with pytest.raises(InputError, match=r"gives input 'X' the shape \[\?, 5\], model.skops \[\?, 4\]"):
        MLFLOW.load(folder, LoadOptions())
