"""The PyTorch converter on the digits CNN example and tiny nets made here: real torch, real onnxruntime."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch", reason="the torch extra is not installed: "
                                            "pip install torch==2.13.0 && pip install -e '.[torch]'")

from cli_checks import assert_one_line_error  # noqa: E402
from edgepack.cli import app  # noqa: E402
from edgepack.convert.base import LoadOptions  # noqa: E402
from edgepack.convert.registry import converter_for  # noqa: E402
from edgepack.convert.torch import DYNAMO, TORCHSCRIPT, TorchConverter, missing_torch_error  # noqa: E402
from edgepack.errors import ExitCode, UnsupportedHere  # noqa: E402
from edgepack.pipeline import build  # noqa: E402
from edgepack.runtime.session import create_session  # noqa: E402
from edgepack.samples import read_sample  # noqa: E402
from edgepack.spec import BuildSpec  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CNN = EXAMPLES / "digits_cnn.py:make_model"
CNN_WEIGHTS = EXAMPLES / "digits_cnn.pt"
CNN_SCRIPTED = EXAMPLES / "digits_cnn_ts.pt"
IMAGES = EXAMPLES / "digits_images.npy"
runner = CliRunner()

TINY_NET = '''
import torch
from torch import nn


def make_net(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))


def make_wide_net() -> nn.Module:
    return make_net(width=32)


def broken():
    raise ValueError("no config file next to the model")


def not_a_model():
    return {"weights": 1}


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_net()

    def forward(self, x):
        return self.body(x), x.sum(1)


class UntraceableNet(nn.Module):
    """Stands for code torch.export cannot trace (the TorchScript tracer does not set is_exporting)."""

    def __init__(self):
        super().__init__()
        self.body = make_net()

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise NotImplementedError("torch.export cannot trace this model")
        return self.body(x)


class FixedBatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_net()

    def forward(self, x):
        return self.body(x.view(2, 6))  # only ever a batch of 2
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nets.py with a 2-layer net and broken factories, its weights, table rows and bad files."""
    root = tmp_path_factory.mktemp("torch-models")
    (root / "nets.py").write_text(TINY_NET)
    sys.path.insert(0, str(root))
    try:
        import nets
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    net = nets.make_net()
    torch.save(net.state_dict(), root / "net.pt")
    torch.save(nets.PairNet().state_dict(), root / "pair.pt")
    torch.save(nets.FixedBatchNet().state_dict(), root / "fixed.pt")
    torch.save(nets.UntraceableNet().state_dict(), root / "untraceable.pt")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, which users still ship
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), root / "net_ts.pt")
    torch.save(net, root / "whole_model.pt")  # a pickle of the module: must never be loaded
    torch.save({"model": net.state_dict(), "epoch": 3}, root / "checkpoint.pt")
    (root / "syntax_error.py").write_text("def make_net(:\n")
    np.save(root / "rows.npy", np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32))
    return root


def _manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as archive:
        name = next(n for n in archive.getnames() if n.endswith("/manifest.json"))
        return json.load(archive.extractfile(name))


def _bundled_model(bundle: Path, folder: Path) -> Path:
    with tarfile.open(bundle) as archive:
        name = next(n for n in archive.getnames() if n.endswith("/model.onnx"))
        (folder / "model.onnx").write_bytes(archive.extractfile(name).read())
    return folder / "model.onnx"


def _cnn_reference(images: np.ndarray) -> np.ndarray:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from digits_cnn import make_model
    finally:
        sys.path.remove(str(EXAMPLES))
    model = make_model()
    model.load_state_dict(torch.load(CNN_WEIGHTS, weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).numpy()


def test_example_cnn_builds_from_module_and_weights(tmp_path):
    result = build(BuildSpec(model=CNN, weights=CNN_WEIGHTS, sample=IMAGES, quantize="auto", bench_time_s=0.2,
                             out=tmp_path / "dist"))
    assert result.parity.passed and [d.kind for d in result.parity.outputs] == ["unknown"]
    assert result.parity.outputs[0].max_abs < 1e-4
    manifest = _manifest(result.bundle)
    source = manifest["source"]
    assert source["framework"] == "pytorch" and source["converter"] == DYNAMO
    assert source["file"] == "digits_cnn.py:make_model" and source["estimator"] == "DigitsCNN"
    # The hash of both files: sha256 of their two hex digests, module first, one per line.
    module_digest = hashlib.sha256((EXAMPLES / "digits_cnn.py").read_bytes()).hexdigest()
    weights_digest = hashlib.sha256(CNN_WEIGHTS.read_bytes()).hexdigest()
    assert source["sha256"] == hashlib.sha256(f"{module_digest}\n{weights_digest}\n".encode()).hexdigest()
    assert {"torch", "onnxscript", "onnx"} <= set(source["versions"])
    assert manifest["inputs"][0]["name"] == "input" and manifest["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    # The chosen variant classifies the held-out digits like the original on every image.
    validation = np.load(EXAMPLES / "digits_images_validation.npz")
    session, _ = create_session(_bundled_model(result.bundle, tmp_path))
    logits = session.run(None, {"input": validation["X"]})[0]
    reference = _cnn_reference(validation["X"])
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99
    assert (reference.argmax(1) == validation["y"]).mean() > 0.95


def test_torchscript_file_builds_like_the_module(tmp_path):
    result = build(BuildSpec(model=CNN_SCRIPTED, sample=IMAGES, quantize="none", bench_time_s=0.2,
                             out=tmp_path / "dist", target="cloud", image=False))
    assert result.parity.passed
    source = result.manifest.source
    assert source.format == "torchscript" and source.converter == TORCHSCRIPT and source.estimator == "DigitsCNN"
    assert source.sha256 == hashlib.sha256(CNN_SCRIPTED.read_bytes()).hexdigest()
    model = onnx.load(_bundled_model(result.bundle, tmp_path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    images = np.load(IMAGES)[:20]
    session, _ = create_session(tmp_path / "model.onnx")
    np.testing.assert_allclose(session.run(None, {"input": images})[0], _cnn_reference(images), atol=1e-4)


# The opsets of edgepack's profiles (edge-arm64: 19, edge-1core: 20, cloud-cpu: 21) and one below
# what the dynamo exporter writes natively.
@pytest.mark.parametrize("opset, exporter", [(17, TORCHSCRIPT), (19, DYNAMO), (20, DYNAMO), (21, DYNAMO)])
def test_tiny_net_exports_at_the_target_opset(tiny, opset, exporter):
    converter = TorchConverter()
    source = converter.load(Path(f"{tiny / 'nets.py'}:make_net"), LoadOptions(weights=tiny / "net.pt"))
    sample = read_sample(tiny / "rows.npy", source.inputs)
    model = converter.convert(source, sample, {"": opset, "ai.onnx.ml": 3})
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert {p.key: p.value for p in model.metadata_props}["edgepack.converter"] == exporter
    assert [i.name for i in model.graph.input] == ["input"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 6
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 64):
        rows = sample.arrays["input"][:batch]
        [expected] = source.predict({"input": rows})
        np.testing.assert_allclose(session.run(None, {"input": rows})[0], expected, rtol=1e-5, atol=1e-5)


def test_tiny_net_builds_through_the_cli(tiny, tmp_path):
    args = ["build", f"{tiny / 'nets.py'}:make_net", "--weights", str(tiny / "net.pt"), "--sample",
            str(tiny / "rows.npy"), "--out", str(tmp_path), "--bench-time", "0.2", "--quiet", "--json",
            "--quantize", "int8-dynamic"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the exporters' chatter must not reach stdout
    assert summary["parity"]["passed"] and summary["name"] == "nets"
    assert Path(summary["bundle"]).is_file()
    manifest = _manifest(Path(summary["bundle"]))
    assert manifest["inputs"][0]["shape"] == ["batch", 6] and manifest["source"]["converter"] == DYNAMO
    int8 = next(v for v in summary["variants"] if v["name"] == "int8-dynamic")
    assert int8["verdict"] != "skipped", int8["reason"]


def test_without_onnxscript_the_torchscript_exporter_is_used(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    converter = TorchConverter()
    source = converter.load(Path(f"{tiny / 'nets.py'}:make_net"), LoadOptions(weights=tiny / "net.pt"))
    assert source.converter == TORCHSCRIPT and "onnxscript" not in source.versions
    model = converter.convert(source, read_sample(tiny / "rows.npy", source.inputs), {"": 20, "ai.onnx.ml": 3})
    assert {p.key: p.value for p in model.metadata_props}["edgepack.converter"] == TORCHSCRIPT


def test_dynamo_failure_falls_back_to_the_torchscript_exporter(tiny):
    converter = TorchConverter()
    source = converter.load(Path(f"{tiny / 'nets.py'}:UntraceableNet"), LoadOptions(weights=tiny / "untraceable.pt"))
    sample = read_sample(tiny / "rows.npy", source.inputs)
    model = converter.convert(source, sample, {"": 20, "ai.onnx.ml": 3})
    assert {p.key: p.value for p in model.metadata_props}["edgepack.converter"] == TORCHSCRIPT
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, sample.arrays)[0], source.predict(sample.arrays)[0],
                               rtol=1e-5, atol=1e-5)


def test_without_torch_the_error_says_how_to_install(monkeypatch):
    error = missing_torch_error()
    assert isinstance(error, UnsupportedHere) and error.exit_code == ExitCode.UNSUPPORTED_HERE
    assert "pip install torch==2.13.0" in error.one_line() and ".[torch]" in error.one_line()
    assert "\n" not in error.one_line()
    monkeypatch.setitem(sys.modules, "torch", None)  # as if the extra were not installed
    with pytest.raises(UnsupportedHere) as caught:
        TorchConverter().load(CNN_SCRIPTED, LoadOptions())
    assert caught.value.one_line() == error.one_line()


@pytest.mark.parametrize("path, claimed", [
    ("model.pt", True), ("model.PTH", True), ("model.ts", True), ("dir/nets.py:make_net", True),
    ("nets.py", True), ("model.skops", False), ("model.onnx", False), ("model.pt:make_net", False),
])
def test_claims(path, claimed):
    assert TorchConverter().claims(Path(path)) is claimed


def test_registry_picks_the_torch_converter():
    assert converter_for(CNN).name == "pytorch"
    assert converter_for(CNN_SCRIPTED).name == "pytorch"


def _bad_cases(tiny: Path) -> list[tuple[list[str], int, str]]:
    nets, rows = tiny / "nets.py", str(tiny / "rows.npy")
    images = str(IMAGES)
    return [
        # a state dict given as MODEL
        ([str(CNN_WEIGHTS), "-s", images], 3,
         "digits_cnn.pt is a state dict (weights only), not a TorchScript model (pass the module that builds "
         "the network with it: module.py:factory --weights digits_cnn.pt)"),
        ([f"{nets}:make_nte", "--weights", str(tiny / "net.pt"), "-s", rows], 3,
         "nets.py has no function make_nte (name one of make_net, make_wide_net, broken, not_a_model, PairNet"),
        ([f"{nets}:broken", "--weights", str(tiny / "net.pt"), "-s", rows], 3,
         "broken() in nets.py raised ValueError: no config file next to the model"),
        ([f"{nets}:not_a_model", "--weights", str(tiny / "net.pt"), "-s", rows], 3, "returned a dict, not a torch.nn.Module"),
        ([f"{nets}:make_wide_net", "--weights", str(tiny / "net.pt"), "-s", rows], 3,
         "net.pt does not fit the model make_wide_net() builds: sizes differ: 0.weight file 16x6 vs model 32x6"),
        ([str(CNN), "--weights", str(tiny / "net.pt"), "-s", images], 3,
         "net.pt does not fit the model make_model() builds: missing features.0.weight"),
        ([f"{nets}:make_net", "--weights", str(tiny / "missing.pt"), "-s", rows], 3, "missing.pt: no such weights file"),
        ([f"{nets}:make_net", "-s", rows], 3, "nets.py:make_net needs its trained weights"),
        ([str(nets), "-s", rows], 3, "nets.py: name the function in it that builds the model"),
        ([f"{tiny / 'syntax_error.py'}:make_net", "--weights", str(tiny / "net.pt"), "-s", rows], 3,
         "importing syntax_error.py failed: SyntaxError"),
        ([f"{nets}:make_net", "--weights", str(tiny / "whole_model.pt"), "-s", rows], 3, "never unpickles"),
        ([f"{nets}:make_net", "--weights", str(tiny / "checkpoint.pt"), "-s", rows], 3,
         "checkpoint.pt is not a state dict: it holds a dict with non-tensor entries (model, epoch)"),
        ([f"{nets}:make_net", "--weights", str(tiny / "net_ts.pt"), "-s", rows], 3, "is a TorchScript model, not a state dict"),
        ([str(tiny / "net_ts.pt"), "--weights", str(tiny / "net.pt"), "-s", rows], 3, "--weights is for module.py:factory models"),
        ([str(tiny / "whole_model.pt"), "-s", rows], 3, "whole_model.pt is a pickled torch.save file, not TorchScript"),
        ([str(CNN), "--weights", str(CNN_WEIGHTS), "-s", rows], 3, "DigitsCNN cannot take the sample (input [2, 6] float32)"),
        ([f"{nets}:FixedBatchNet", "--weights", str(tiny / "fixed.pt"), "-s", rows], 4,
         "the exported FixedBatchNet does not take a batch of 1"),
    ]


def test_bad_inputs_give_one_line_and_their_exit_code(tiny, tmp_path):
    for args, code, text in _bad_cases(tiny):
        result = runner.invoke(app, ["build", *args, "--quiet", "--out", str(tmp_path / "out")])
        assert_one_line_error(result, code, text, args)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
