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

Faults never reach the caller. A log that cannot be written (the folder read-only, the disk full,
the file deleted or moved away by an operator or a log shipper) drops its lines and counts them;
``write`` returns False and raises nothing, so an answer never depends on the log. One line goes
to stderr when the log starts failing and one when it is written again (never one per request),
and the ``healthy``/``dropped``/``errors`` figures feed ``/metrics``. The file is reopened with
backoff (0.1 s doubling to 5 s); about once a second an open file is checked against its path, so
a deleted or renamed file is replaced by a new one at the path. The descriptor is only ever the
one this object opened: closed, it is set to None at once, so its number (which the kernel hands
to the next socket) is never written to or closed again. A line a full disk cut short is
truncated away, so no torn line is left behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
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
RETRY_FIRST_S = 0.1  # after a failure, the first reopen is tried this much later, then twice as late
RETRY_MAX_S = 5.0
CHECK_S = 1.0  # how often an open file is checked for having been deleted or moved away


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
        # A folder unwritable at the start is the operator's to fix: the server refuses to start.
        try:
            self._fd: int | None = self._open()
        except OSError as err:
            raise InputError(f"--log-dir {self.folder}: cannot write {self.name} ({err.strerror})",
                             "choose a writable folder") from None
        self._size = os.fstat(self._fd).st_size  # a restart appends to the file it left
        self.healthy = True  # False from a failed write until a line is written again
        self.dropped = 0  # lines dropped because the log could not be written, in all
        self.errors = 0  # failed attempts to write, rotate or reopen, in all
        self._dropped_since = 0  # lines dropped in the current failing spell
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0  # monotonic time before which no reopen is tried
        self._checked_at = time.monotonic()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def sampled(self) -> bool:
        return self.sample_rate > 0 and random.random() < self.sample_rate

    def write(self, record: dict[str, Any]) -> bool:
        """Append one line; it is in the kernel's hands when this returns True. False: the log
        cannot be written now, and the line was dropped and counted (never an exception)."""
        line = orjson.dumps(record, option=_DUMP)
        with self._lock:
            clock = time.monotonic()
            try:
                if self._fd is not None and clock - self._checked_at >= CHECK_S:
                    self._checked_at = clock
                    if self._moved_away():
                        self._close_fd()
                if self._fd is None:
                    if clock < self._retry_at:
                        return self._drop()
                    self._fd = self._open()
                    self._size = os.fstat(self._fd).st_size
                    self._checked_at = clock
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._append(line)
            except OSError as err:
                self._failed(err, clock)
                return self._drop()
            if not self.healthy:
                self._recovered()
            return True

    def _append(self, line: bytes) -> None:
        fd, size = self._fd, len(line)
        written = 0
        try:
            written = os.write(fd, line)  # type: ignore[arg-type]
            while written < size:  # short writes only on a full disk or a signal; finish the line
                written += os.write(fd, line[written:])  # type: ignore[arg-type]
        except OSError:
            if written:  # a line cut short by a full disk: take it back, leave no torn line
                try:
                    os.ftruncate(fd, max(0, os.fstat(fd).st_size - written))  # type: ignore[arg-type]
                except OSError:
                    pass
            raise
        self._size += size

    def _moved_away(self) -> bool:
        """The open file was deleted, or another file (or none) is at the path now. Its size is
        read again too (a log shipper may have truncated it)."""
        mine = os.fstat(self._fd)  # type: ignore[arg-type]
        self._size = mine.st_size
        if mine.st_nlink == 0:
            return True
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (there.st_ino, there.st_dev) != (mine.st_ino, mine.st_dev)

    def _rotate(self) -> None:
        """Rename the full file away, then open a new one. The old descriptor stays open (and in
        use) until the new one is open, so a failure at any point leaves either a working file or
        none (``_fd`` None), never a closed number."""
        parts = [self.folder / f"{self.name}.{n}" for n in range(1, self.keep)]
        if parts:
            for older, newer in zip(reversed(parts[1:]), reversed(parts[:-1])):
                if newer.exists():
                    os.replace(newer, older)  # overwrites (drops) the oldest part
            os.replace(self.path, parts[0])
        else:
            os.unlink(self.path)
        try:
            fd = self._open()
        except OSError:
            self._close_fd()  # the full file is renamed away: nothing more goes into it
            raise
        self._close_fd()
        self._fd, self._size = fd, 0

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None  # forgotten before it is closed: its number is never used again
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _drop(self) -> bool:
        self.dropped += 1
        self._dropped_since += 1
        return False

    def _failed(self, err: OSError, clock: float) -> None:
        self.errors += 1
        self._close_fd()  # the next write reopens (after the backoff): a deleted file is replaced by a new one
        self._retry_at = clock + self._retry_s
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        if self.healthy:
            self.healthy = False
            self._dropped_since = 0
            _report(f"prediction log: cannot write {self.path} ({err.strerror or err}); answers go on, its lines "
                    f"are dropped and counted (edgepack_prediction_log_dropped_lines_total) until it can be written "
                    f"again; retrying every {RETRY_MAX_S:g} s at most")

    def _recovered(self) -> None:
        self.healthy = True
        self._retry_s = RETRY_FIRST_S
        _report(f"prediction log: writing {self.path} again; {self._dropped_since} line"
                f"{'' if self._dropped_since == 1 else 's'} dropped while it could not be written")

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def _report(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed or gone: the metrics still say it
        pass


def now() -> float:
    """Unix time in seconds, rounded to the microsecond: from integer nanoseconds, 4x cheaper than
    ``round(time.time(), 6)`` (whose float has less than a microsecond's resolution anyway)."""
    return (time.time_ns() + 500) // 1000 / 1e6
