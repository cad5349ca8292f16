"""Inference sessions and their inputs, configured the same way here and on a device."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import InputError

# ONNX tensor type strings as onnxruntime reports them, mapped to numpy dtypes.
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


def session_options(threads: int | None, inter_threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # onnxruntime's default of 0 means "all cores"; a profile's thread count is an upper bound.
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = inter_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def create_session(
    model: Path | bytes, threads: int | None = None, inter_threads: int = 1,
    providers: list[str] | None = None,
) -> tuple[ort.InferenceSession, float]:
    """Returns the session and how long creating it took, in seconds."""
    wanted = providers or ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    source = str(model) if isinstance(model, Path) else model
    started = time.perf_counter()
    session = ort.InferenceSession(source, session_options(threads, inter_threads), providers=usable)
    return session, time.perf_counter() - started


def numpy_dtype(onnx_type: str) -> Any:
    if onnx_type not in _ORT_TO_NUMPY:
        raise InputError(f"input type {onnx_type} is not supported", "use numeric tensor inputs")
    return _ORT_TO_NUMPY[onnx_type]


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def make_feed(
    session: ort.InferenceSession, sample: dict[str, np.ndarray] | None, batch: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], str]:
    """A batch for every model input: rows of the sample when given, else seeded random data."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        dtype = numpy_dtype(spec.type)
        if sample is not None:
            if spec.name not in sample:
                raise InputError(f"sample data has no input named {spec.name!r}", "rebuild the bundle")
            rows = sample[spec.name]
            reps = -(-batch // len(rows))
            feed[spec.name] = np.ascontiguousarray(np.concatenate([rows] * reps)[:batch], dtype=dtype)
            continue
        shape = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1)
                 for i, d in enumerate(spec.shape)]
        feed[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feed, ("sample" if sample is not None else "random")


def peak_rss_mb() -> float | None:
    """This process's peak resident memory, in MiB."""
    # VmHWM starts afresh at exec; ru_maxrss does not, so a child started by a big parent would
    # report the parent's memory.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
