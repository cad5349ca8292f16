"""Peer servers for ``serve_load.py``: each a small file run from its own virtual environment.

Every peer serves the same ``model.onnx`` at ``POST /v2/models/NAME/infer`` (v2 JSON in and out)
with one onnxruntime intra-op thread, as edgepack's ``edge-1core`` bundle does. A peer's venv is
made once under ``~/.cache/edgepack/bench-venvs/<name>`` and reused while its requirements are the
same; a peer that fails to install says why and is skipped by the caller.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VENV_ROOT = Path(os.environ.get("EDGEPACK_BENCH_VENVS", Path.home() / ".cache" / "edgepack" / "bench-venvs"))
INSTALL_TIMEOUT_S = 1200

# Shared by every peer: one intra-op thread, the v2 datatype of each output.
_SESSION = '''
import numpy as np
import onnxruntime as ort

_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
_options.inter_op_num_threads = 1
SESSION = ort.InferenceSession(MODEL_PATH, _options, providers=["CPUExecutionProvider"])
INPUT = SESSION.get_inputs()[0].name
DATATYPES = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64", np.dtype("int64"): "INT64",
             np.dtype("int32"): "INT32", np.dtype("bool"): "BOOL"}
OUTPUTS = [o.name for o in SESSION.get_outputs()]
'''

FASTAPI = '''
"""A hand-written FastAPI v2 infer endpoint: parse, run on the event loop, answer. No validation."""
import os, sys
import orjson, uvicorn
from fastapi import FastAPI, Request, Response

MODEL_PATH, NAME, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
''' + _SESSION + '''
app = FastAPI()


@app.get("/v2/health/ready")
async def ready():
    return {"ready": True}


@app.post(f"/v2/models/{NAME}/infer")
async def infer(request: Request):
    body = orjson.loads(await request.body())
    item = body["inputs"][0]
    values = SESSION.run(None, {INPUT: np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])})
    outputs = [{"name": n, "datatype": DATATYPES[v.dtype], "shape": list(v.shape), "data": v.reshape(-1).tolist()}
               for n, v in zip(OUTPUTS, values)]
    return Response(orjson.dumps({"model_name": NAME, "outputs": outputs}), media_type="application/json")


uvicorn.run(app, host="127.0.0.1", port=PORT, loop="uvloop", http="httptools", log_level="warning",
            access_log=False)
'''

KSERVE = '''
"""KServe's Python ModelServer with a kserve.Model whose predict runs onnxruntime."""
import sys

MODEL_PATH, NAME, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
# KServe parses sys.argv when imported. Its per-request latency log is off and the access log
# and KServe's per-request trace lines are quietened, as no other server here logs per request to the console.
sys.argv = [sys.argv[0], "--http_port", str(PORT), "--grpc_port", str(PORT + 1), "--workers", "1",
            "--enable_grpc", "false", "--enable_latency_logging", "false"]
import logging
import uuid
import kserve
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
''' + _SESSION + '''

class Forest(Model):
    def __init__(self, name):
        super().__init__(name)
        self.ready = True

    def predict(self, payload, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        values = SESSION.run(None, {INPUT: x})
        outputs = [InferOutput(name=n, shape=list(v.shape), datatype=DATATYPES[v.dtype], data=v.reshape(-1).tolist())
                   for n, v in zip(OUTPUTS, values)]
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=outputs)


server = ModelServer(http_port=PORT, grpc_port=PORT + 1, workers=1, enable_grpc=False, enable_docs_url=False,
                     enable_latency_logging=False)
logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
logging.getLogger("uvicorn.access").disabled = True
logging.getLogger("kserve.trace").disabled = True
server.start([Forest(NAME)])
'''

BENTOML = '''
"""A BentoML 1.4 service: one API at the v2 infer route, onnxruntime in the service class."""
import os
import bentoml

MODEL_PATH, NAME = os.environ["EP_MODEL_PATH"], os.environ["EP_MODEL_NAME"]
''' + _SESSION + '''

@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Forest:
    @bentoml.api(route=f"/v2/models/{NAME}/infer")
    def infer(self, inputs: list) -> dict:
        item = inputs[0]
        values = SESSION.run(None, {INPUT: np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])})
        return {"model_name": NAME, "outputs": [{"name": n, "datatype": DATATYPES[v.dtype], "shape": list(v.shape),
                                                 "data": v.reshape(-1).tolist()} for n, v in zip(OUTPUTS, values)]}
'''


@dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]
    source: str
    ready_path: str

    def python(self) -> Path:
        return VENV_ROOT / self.name / "bin" / "python"

    def command(self, folder: Path, model: Path, model_name: str, port: int) -> tuple[list[str], dict[str, str]]:
        """The command line (without pinning) and extra environment to serve ``model`` on ``port``."""
        script = folder / f"peer_{self.name}.py"
        script.write_text(self.source)
        if self.name == "bentoml":
            bentoml = str(self.python().parent / "bentoml")
            return ([bentoml, "serve", f"{script.stem}:Forest", "--host", "127.0.0.1", "--port", str(port)],
                    {"EP_MODEL_PATH": str(model), "EP_MODEL_NAME": model_name, "BENTOML_DO_NOT_TRACK": "true"})
        return [str(self.python()), str(script), str(model), model_name, str(port)], {}


PEERS = {
    "fastapi": Peer("fastapi", ("fastapi", "uvicorn[standard]", "orjson"), FASTAPI, "/v2/health/ready"),
    "kserve": Peer("kserve", ("kserve",), KSERVE, "/v2/health/ready"),
    "bentoml": Peer("bentoml", ("bentoml>=1.4,<1.5",), BENTOML, "/readyz"),
}


def ensure_venv(peer: Peer, log) -> str | None:
    """Make (or reuse) the peer's venv; None when it is ready, else why it is not."""
    import onnxruntime  # the same onnxruntime as edgepack's, so the model runs the same code

    folder = VENV_ROOT / peer.name
    wanted = "\n".join([*peer.requirements, f"onnxruntime=={onnxruntime.__version__}", "numpy"])
    stamp = folder / ".edgepack-requirements"
    if stamp.is_file() and stamp.read_text() == wanted and peer.python().is_file():
        return None
    log(f"installing {peer.name} into {folder} (once; pip install {' '.join(wanted.splitlines())})")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, text=True)
        subprocess.run([str(peer.python()), "-m", "pip", "install", "-q", *wanted.splitlines()], check=True,
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.CalledProcessError as err:
        return f"installing {peer.name} failed: {(err.stderr or err.stdout or '').strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        return f"installing {peer.name} took over {INSTALL_TIMEOUT_S} s"
    stamp.write_text(wanted)
    return None
