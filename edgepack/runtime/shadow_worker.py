"""The shadow candidate's own process: ``python -m <runtime>.shadow_worker BUNDLE --stats-fd N [--log-dir D ...]``.

Why a process: in a thread of the server, the candidate's Python work per pair (compare, record,
metrics) holds the GIL the event loop needs, and on a server with one core the primary's p99 rose
by ~80%. In its own process under SCHED_IDLE the kernel hands the core to the server whenever it
wants it.

Why it does all of a pair's work itself: each frame the server decoded or line it wrote for a pair
was GIL work beside its event loop (p99 +5-20% at c=1 with a sender and a receiver thread). Now the
server's share of a pair is one frame encoded and written to a non-blocking pipe after the answer
went out. This process runs the candidate, compares, writes the pair's ``role: shadow`` line to
its own log (``shadow.jsonl`` beside the server's ``predictions.jsonl``, rotated the same way) and
then counts it in a small shared memory block (``Stats``) that the server reads when /metrics is
scraped and to know how many pairs are still waiting: nothing comes back per pair.

Frames from the server: a 4-byte big-endian length, a JSON header, then the raw bytes of the arrays
the header lists (name, dtype, shape; strings travel inside the header as JSON): the request's id,
its inputs and the primary's outputs. On its stdout this process writes one frame, saying it is
ready (or why it is not). It exits when its input closes, after finishing what it read: also when
the server is killed, since a dead parent closes the pipe.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import tempfile
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

NICE = 19
_LENGTH = struct.Struct(">I")


class Stats:
    """Counts shared by the worker (the only writer) and the server: float64 slots in a memory
    block both map. Slots: pairs done, candidate errors, rows agreed, rows disagreed, the sum of
    the candidate's run seconds, its ``shadow.jsonl``'s health (1 while it cannot be written, lines
    dropped, failed attempts), then the run-time histogram's buckets (``metrics.LATENCY_BUCKETS_S``,
    then one above them all). A reader may see one pair's counts half updated; never a torn value."""

    DONE, ERRORS, AGREED, DISAGREED, RUN_SUM, LOG_FAILING, LOG_DROPPED, LOG_ERRORS, BUCKETS = range(9)

    def __init__(self, fd: int, buckets: tuple[float, ...]) -> None:
        self.fd = fd
        self.buckets = buckets
        size = 8 * (self.BUCKETS + len(buckets) + 1)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self.slots = memoryview(self._map).cast("d")

    @classmethod
    def create(cls, buckets: tuple[float, ...]) -> Stats:
        """A new, zeroed block, in memory where the OS allows (memfd), else in an unlinked temp file."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("edgepack-shadow-stats", getattr(os, "MFD_CLOEXEC", 0))
        else:
            fd = os.dup(tempfile.TemporaryFile().fileno())
        return cls(fd, buckets)

    def record(self, run_s: float | None, rows: int | None, agreed: int | None) -> None:
        """One pair: ``run_s`` None when the candidate failed."""
        slots = self.slots
        if run_s is None:
            slots[self.ERRORS] += 1
        else:
            slots[self.RUN_SUM] += run_s
            slots[self.BUCKETS + bisect_left(self.buckets, run_s)] += 1
            if rows is not None and agreed is not None:
                slots[self.AGREED] += agreed
                slots[self.DISAGREED] += rows - agreed
        slots[self.DONE] += 1  # last: a pair counted done has its other counts (and its log line)

    def record_log(self, healthy: bool, dropped: int, errors: int) -> None:
        slots = self.slots
        slots[self.LOG_FAILING], slots[self.LOG_DROPPED], slots[self.LOG_ERRORS] = (not healthy), dropped, errors

    @property
    def done(self) -> int:
        return int(self.slots[self.DONE])


def encode_frame(header: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]] | None = None) -> bytes:
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
    return b"".join([_LENGTH.pack(len(head)), head, *blobs])


def write_frame(stream: BinaryIO, header: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    stream.write(encode_frame(header, arrays))
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


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shadow_worker")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--stats-fd", type=int, required=True)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--log-max-mb", type=float, default=64.0)
    parser.add_argument("--log-keep", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from .errors import EdgepackError
    from .metrics import LATENCY_BUCKETS_S
    from .models import ModelSpec, ServedModel
    from .prediction_log import SHADOW_LOG_NAME, PredictionLog, now, outputs_field
    from .shadow import compare

    args = _args(argv)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    try:
        manifest = json.loads((args.bundle / "manifest.json").read_text())  # verified by the server before it started this
        spec = ModelSpec.from_bundle(args.bundle, manifest, 1)
        model = ServedModel(spec, "thread")
        log = PredictionLog(args.log_dir, 0, args.log_max_mb, args.log_keep, SHADOW_LOG_NAME) if args.log_dir else None
    except EdgepackError as err:
        write_frame(sink, {"ready": False, "error": err.one_line()})
        return int(err.exit_code)
    stats = Stats(args.stats_fd, LATENCY_BUCKETS_S)
    _yield_to_the_server()
    write_frame(sink, {"ready": True, "warm_run_s": model.warm_run_s})
    failures = Failures(f"{spec.name} {spec.version}")
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
            run_s = None
            failures.failed(record["candidate"]["error"])
        else:
            failures.answered()
            run_s = time.perf_counter() - started
            record["candidate"] = {"version": spec.version, "run_ms": run_s * 1000, **outputs_field(outputs)}
            record["status"] = "ok"
            record.update(compare(primary, outputs))
        if log is not None:  # a log that cannot be written drops the line, counts it and says so once
            log.write(record)
            stats.record_log(log.healthy, log.dropped, log.errors)
        stats.record(run_s, record.get("rows"), record.get("agreed_rows"))


class Failures:
    """The candidate's failures said on stderr once per change, never once per pair (each is counted
    in ``edgepack_shadow_errors_total`` and its ``shadow`` line): once when it starts failing, once
    when it has answered ``RECOVERED_AFTER`` pairs in a row again (a candidate failing on some inputs
    only stays "failing" rather than flapping a line per pair)."""

    RECOVERED_AFTER = 100

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False
        self.count = 0  # failures in the current spell
        self.answered_in_a_row = 0

    def failed(self, error: str) -> None:
        self.count += 1
        self.answered_in_a_row = 0
        if not self.failing:
            self.failing = True
            print(f"shadow: the candidate {self.what} fails ({error}); each failure is counted in "
                  "edgepack_shadow_errors_total and shadow.jsonl, and said here again only once it answers",
                  file=sys.stderr, flush=True)

    def answered(self) -> None:
        if not self.failing:
            return
        self.answered_in_a_row += 1
        if self.answered_in_a_row >= self.RECOVERED_AFTER:
            print(f"shadow: the candidate {self.what} answers again ({self.RECOVERED_AFTER} pairs in a row) after "
                  f"{self.count} failure{'' if self.count == 1 else 's'}", file=sys.stderr, flush=True)
            self.failing, self.count, self.answered_in_a_row = False, 0, 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
