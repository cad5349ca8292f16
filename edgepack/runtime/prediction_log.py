"""The prediction log: one JSON line per answered inference request (``predictions.jsonl``); the
shadow worker writes one per shadow pair to its own ``shadow.jsonl`` the same way.

Durability: each line is serialised whole and handed to the kernel with a single ``os.write`` on
an ``O_APPEND`` descriptor before the response is sent. A line in the page cache survives the
server being killed (even ``kill -9``), so a client that got an answer has its line; it does not
survive a power cut (no fsync: that would cost milliseconds per request). One ``write`` of a
complete line means a killed server leaves no partial line behind, and O_APPEND keeps lines whole
when the event loop and a worker thread (phased agreement checks) write at once. A lock orders
writes and rotation.

Rotation by size: when the current file would pass ``max_bytes``, it is renamed (atomic) to
``predictions.jsonl.1`` after shifting older parts up, the oldest beyond ``keep`` files removed,
and a fresh file opened. A reader sees every line in exactly one file at any time.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import InputError

LOG_NAME = "predictions.jsonl"
SHADOW_LOG_NAME = "shadow.jsonl"  # the shadow worker's lines, written by its own process
# Outputs with more values than this are logged as a digest: a log line stays a few KB at most.
MAX_LOGGED_VALUES = 256
DEFAULT_SAMPLE_RATE = 0.01
DEFAULT_MAX_MB = 64.0
DEFAULT_KEEP = 5
_DUMP = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


# (name, dtype, shape) -> the bytes digest() hashes before a tensor's data: the same few per
# server, and formatting them (dtype.str is a property) is a third of a one-row digest's cost.
_HEADERS: dict[tuple[str, np.dtype, tuple[int, ...]], bytes] = {}
_MAX_HEADERS = 1024


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: equal inputs, equal digests."""
    h = hashlib.sha256()
    for name in sorted(arrays) if len(arrays) > 1 else arrays:
        array = np.ascontiguousarray(arrays[name])
        key = (name, array.dtype, array.shape)
        header = _HEADERS.get(key)
        if header is None:
            if len(_HEADERS) >= _MAX_HEADERS:  # many batch sizes or names: start over, stay bounded
                _HEADERS.clear()
            header = _HEADERS[key] = f"{name}:{array.dtype.str}:{array.shape};".encode()
        h.update(header)
        # A contiguous array is hashed through the buffer protocol: its bytes, without tobytes()'s copy.
        h.update(array if array.dtype.kind not in "UO" else orjson.dumps(array.tolist()))
    return h.hexdigest()


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: array.tolist() for name, array in arrays.items()}


def outputs_field(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The outputs themselves when small, else their digest (the ``outputs_sha256`` key)."""
    field: dict[str, Any] = {}
    add_outputs(field, outputs)
    return field


def add_outputs(record: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
    """``outputs_field`` set in ``record`` itself: no dict made and merged per request."""
    size = 0
    for array in outputs.values():
        size += array.size
    if size <= MAX_LOGGED_VALUES:
        record["outputs"] = {name: array.tolist() for name, array in outputs.items()}
    else:
        record["outputs_sha256"] = digest(outputs)


class PredictionLog:
    def __init__(self, folder: Path, sample_rate: float = DEFAULT_SAMPLE_RATE, max_mb: float = DEFAULT_MAX_MB,
                 keep: int = DEFAULT_KEEP, name: str = LOG_NAME) -> None:
        if not 0 <= sample_rate <= 1:
            raise InputError(f"--log-sample-rate {sample_rate:g}: expected a share within 0..1", "e.g. 0.01")
        if max_mb <= 0:
            raise InputError(f"--log-max-mb {max_mb:g}: expected a positive size", "e.g. --log-max-mb 64")
        if keep < 1:
            raise InputError(f"--log-keep {keep}: expected at least 1 file", "e.g. --log-keep 5")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"--log-dir {folder}: cannot create it ({err.strerror})", "choose a writable folder") from None
        self.folder = folder
        self.name = name
        self.path = folder / name
        self.sample_rate = sample_rate
        self.max_bytes = int(max_mb * 2**20)
        self.keep = keep
        self._lock = threading.Lock()
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size  # a restart appends to the file it left

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise InputError(f"--log-dir {self.folder}: cannot write {self.name} ({err.strerror})",
                             "choose a writable folder") from None

    def sampled(self) -> bool:
        return self.sample_rate > 0 and random.random() < self.sample_rate

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; it is in the kernel's hands when this returns."""
        line = orjson.dumps(record, option=_DUMP)
        size = len(line)
        with self._lock:
            if self._size and self._size + size > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, line)
            while written < size:  # short writes only on a full disk or a signal; finish the line
                written += os.write(self._fd, line[written:])
            self._size += size

    def _rotate(self) -> None:
        os.close(self._fd)
        parts = [self.folder / f"{self.name}.{n}" for n in range(1, self.keep)]
        if parts:
            for older, newer in zip(reversed(parts[1:]), reversed(parts[:-1])):
                if newer.exists():
                    os.replace(newer, older)  # overwrites (drops) the oldest part
            os.replace(self.path, parts[0])
        else:
            os.unlink(self.path)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def now() -> float:
    """Unix time in seconds, rounded to the microsecond: from integer nanoseconds, 4x cheaper than
    ``round(time.time(), 6)`` (whose float has less than a microsecond's resolution anyway)."""
    return (time.time_ns() + 500) // 1000 / 1e6
