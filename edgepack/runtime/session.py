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
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
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


def quiet_run() -> ort.RunOptions:
    """Run options that keep onnxruntime from logging a failed run to stderr: the caller turns the
    exception, which carries the same reason, into its one-line error."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def numpy_dtype(onnx_type: str) -> Any:
    if onnx_type not in _ORT_TO_NUMPY:
        raise InputError(f"input type {onnx_type} is not supported", "use numeric tensor inputs")
    return _ORT_TO_NUMPY[onnx_type]


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def is_symbolic(dim: Any) -> bool:
    """A dimension the model leaves open: a name, an unnamed one (None, "?", -1)."""
    return not isinstance(dim, int) or dim < 0


def _named(dim: Any) -> bool:
    return isinstance(dim, str) and dim not in ("", "?")


def batch_axes(shapes: dict[str, list[Any]]) -> dict[str, int | None]:
    """For each input, the axis that holds its rows (the batch), or None where it has none.

    The rule, the same on the build side and on a device: an open first dimension is the batch
    (the convention of every exporter); an input whose first dimension is fixed (a recurrent
    state shaped [2, batch, 128]) has its batch where a dimension carries the same name as some
    input's first one; scalars and fully fixed inputs have none.
    """
    names = {shape[0] for shape in shapes.values() if shape and _named(shape[0])}
    axes: dict[str, int | None] = {}
    for name, shape in shapes.items():
        if not shape:
            axes[name] = None
        elif is_symbolic(shape[0]):
            axes[name] = 0
        else:
            axes[name] = next((axis for axis, dim in enumerate(shape) if _named(dim) and dim in names), None)
    return axes


def rows_of(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int | None:
    """How many rows a feed holds along its inputs' batch axes (None: no input has one)."""
    sizes = {feed[name].shape[axis] for name, axis in axes.items() if axis is not None and name in feed}
    return sizes.pop() if len(sizes) == 1 else None


def resize_rows(feed: dict[str, np.ndarray], axes: dict[str, int | None], batch: int) -> dict[str, np.ndarray]:
    """``feed`` with ``batch`` rows along each input's batch axis: its rows repeated or cut."""
    have = rows_of(feed, axes)
    if have == batch:
        return feed
    if batch == 1 and all(axes.get(name) is None for name in feed):
        return feed  # a graph with no batch axis at all (fixed shapes): one feed is one example
    fixed = [name for name, axis in axes.items() if axis is None and feed[name].ndim > 0]
    if have is None or fixed:
        why = (f"input {fixed[0]!r} (shape {list(feed[fixed[0]].shape)}) has no batch axis edgepack can find"
               if fixed else "the inputs' batch axes disagree on the number of rows")
        raise InputError(f"cannot make a batch of {batch}: {why}",
                         f"benchmark this model at the batch its sample has ({have or 1})")
    resized = {}
    for name, array in feed.items():
        axis = axes.get(name)
        if axis is None:
            resized[name] = array
            continue
        reps = -(-batch // array.shape[axis])
        resized[name] = np.ascontiguousarray(np.take(np.concatenate([array] * reps, axis=axis), range(batch), axis=axis))
    return resized


def make_feed(
    session: ort.InferenceSession, sample: dict[str, np.ndarray] | None, batch: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], str]:
    """A batch for every model input: rows of the sample when given, else seeded random data.

    Rows go along each input's batch axis (``batch_axes``); inputs without one (a scalar sample
    rate, a fixed-size state) are passed as the sample gives them.
    """
    specs = session.get_inputs()
    axes = batch_axes({spec.name: list(spec.shape) for spec in specs})
    if sample is not None:
        missing = [spec.name for spec in specs if spec.name not in sample]
        if missing:
            raise InputError(f"sample data has no input named {missing[0]!r}", "rebuild the bundle")
        feed = {spec.name: np.asarray(sample[spec.name], dtype=numpy_dtype(spec.type)) for spec in specs}
        return resize_rows(feed, axes, batch), "sample"
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        dtype = numpy_dtype(spec.type)
        shape = [batch if axis == axes[spec.name] else (d if isinstance(d, int) and d > 0 else 1)
                 for axis, d in enumerate(spec.shape)]
        feed[spec.name] = random_values(rng, shape, dtype)
    return feed, "random"


def random_values(rng: np.random.Generator, shape: list[int], dtype: Any) -> np.ndarray:
    """Seeded values of a dtype: normal floats; 0/1 for integers and booleans (a safe index for any
    embedding or lookup); text as "0"/"1"."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    ones = rng.integers(0, 2, size=shape)
    if dtype is np.str_:
        return ones.astype(str)
    return ones.astype(dtype)


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
