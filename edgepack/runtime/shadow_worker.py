"""The shadow candidate's own process: ``python -m <runtime>.shadow_worker CANDIDATE_BUNDLE_DIR``.

Why a process: in a thread of the server, the candidate's Python work per pair (compare, record,
metrics) holds the GIL the event loop needs, and on a server with one core the primary's p99 rose
by ~80%. In its own process under SCHED_IDLE the kernel hands the core to the server whenever it
wants it, and the server's share of a pair is a frame written and a frame read; the p99 cost fell
to ~7% at c=1 (benchmarks/serve_load.py).

Frames on both pipes: a 4-byte big-endian length, a JSON header, then the raw bytes of the arrays
the header lists (name, dtype, shape; strings travel inside the header as JSON). The parent sends
one frame per request (its id, inputs and the primary's outputs); this process answers one frame
per pair: the shadow log record, as ``shadow.ShadowRoute`` writes it. The first frame it sends says
it is ready (or why it is not). It exits when its input closes, after answering what it read:
also when the server is killed, since a dead parent closes the pipe.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

NICE = 19
_LENGTH = struct.Struct(">I")


def write_frame(stream: BinaryIO, header: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """``arrays`` groups named arrays (e.g. "inputs", "primary"); their layout goes in the header."""
    blobs: list[bytes] = []
    if arrays:
        layout: dict[str, list] = {}
        for group, named in arrays.items():
            layout[group] = []
            for name, array in named.items():
                if array.dtype.kind in "OUS":
                    layout[group].append([name, "json", list(array.shape), array.tolist()])
                    continue
                array = np.ascontiguousarray(array)
                layout[group].append([name, array.dtype.str, list(array.shape)])
                blobs.append(array.tobytes())
        header = {**header, "arrays": layout}
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    stream.write(b"".join([_LENGTH.pack(len(head)), head, *blobs]))
    stream.flush()


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]] | None:
    """The next frame; None at the end of the stream."""
    prefix = stream.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        return None
    header = orjson.loads(_exact(stream, _LENGTH.unpack(prefix)[0]))
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for group, entries in header.pop("arrays", {}).items():
        arrays[group] = {}
        for entry in entries:
            name, dtype, shape = entry[0], entry[1], tuple(entry[2])
            if dtype == "json":
                arrays[group][name] = np.array(entry[3], dtype=object).reshape(shape)
                continue
            kind = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[group][name] = np.frombuffer(_exact(stream, count * kind.itemsize), dtype=kind).reshape(shape)
    return header, arrays


def _exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the pipe closed inside a frame")
    return data


def _yield_to_the_server() -> None:
    """SCHED_IDLE where Linux has it, else nice 19; after loading, so that the server's start does
    not wait on a starved loader. Why not nice alone: a nice-19 task that sleeps between pairs wakes
    with a fresh share and may finish its slice before the server's next request gets the core;
    the scheduler preempts a SCHED_IDLE task at once for any normal one. Linux schedules threads
    one by one: this one runs the candidate (one onnxruntime thread: the caller's)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except (AttributeError, OSError):
        pass


def main(argv: list[str]) -> int:
    from .errors import EdgepackError
    from .models import ModelSpec, ServedModel
    from .prediction_log import now, outputs_field
    from .shadow import compare

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    root = Path(argv[0])
    try:
        manifest = json.loads((root / "manifest.json").read_text())  # verified by the server before it started this
        spec = ModelSpec.from_bundle(root, manifest, 1)
        model = ServedModel(spec, "thread")
    except EdgepackError as err:
        write_frame(sink, {"ready": False, "error": err.one_line()})
        return int(err.exit_code)
    _yield_to_the_server()
    write_frame(sink, {"ready": True, "warm_run_s": model.warm_run_s})
    while True:
        frame = read_frame(source)
        if frame is None:
            return 0
        header, arrays = frame
        primary = arrays["primary"]
        record: dict[str, Any] = {"id": header["id"], "time": now(), "model": header["model"], "role": "shadow",
                                  "primary": {"version": header["version"], "run_ms": header["run_ms"],
                                              **outputs_field(primary)},
                                  "queued_ms": (time.monotonic() - header["queued_at"]) * 1000}
        started = time.perf_counter()
        try:
            outputs = model.run(None, arrays["inputs"])
        except Exception as err:  # noqa: BLE001 - InferenceFailed or anything else: reported, never raised
            record["candidate"] = {"version": spec.version, "run_ms": (time.perf_counter() - started) * 1000,
                                   "error": getattr(err, "message", None) or f"{type(err).__name__}: {err}"}
            record["status"] = "error"
        else:
            record["candidate"] = {"version": spec.version, "run_ms": (time.perf_counter() - started) * 1000,
                                   **outputs_field(outputs)}
            record["status"] = "ok"
            record.update(compare(primary, outputs))
        write_frame(sink, record)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
