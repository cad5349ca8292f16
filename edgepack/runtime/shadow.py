"""Shadow mode: the primary answers; a candidate runs the same input off the request's path.

The candidate lives in its own process (``shadow_worker``, SCHED_IDLE), which also compares, logs
and counts each pair, so the server's share of a pair is small and on its event loop: once a
request's answer has gone out, one frame (the request's id, inputs and the primary's outputs) is
written to the worker's non-blocking pipe. The queue is the pairs sent that the worker has not
finished, read from the counts it shares (``shadow_worker.Stats``): when ``queue_size`` are
waiting, the pair is dropped and counted (flooding must slow nothing but the shadow). A candidate
failure is caught, logged and counted by the worker, never seen by the client. No thread of the
server wakes per pair: the GIL stays with the event loop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError, UnsupportedHere
from .metrics import LATENCY_BUCKETS_S
from .models import Answer, ModelSpec, SingleRoute
from .prediction_log import SHADOW_LOG_NAME, PredictionLog
from .shadow_worker import Stats, encode_frame, read_frame

DEFAULT_QUEUE = 64
SHADOW_NICE = 10
STOP = object()  # put on a worker's queue to end it


def check_signatures(primary: ModelSpec, candidate: ModelSpec, flag: str = "--shadow") -> None:
    if primary.signature.inputs != candidate.signature.inputs:
        def text(spec: ModelSpec) -> str:
            return ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in spec.signature.inputs.values())

        raise InputError(f"{flag} {candidate.name} {candidate.version} takes {text(candidate)}, the primary "
                         f"{primary.name} takes {text(primary)}", "give a candidate built for the same inputs")


def labels(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """A classifier's labels, one per row: its first integer output, else the argmax of its first
    float output of shape [rows, classes]; None for a model that gives neither (a regressor)."""
    for array in outputs.values():
        if array.dtype.kind in "iu" and array.ndim >= 1 and array.size == array.shape[0]:
            return array.reshape(-1)
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            return np.argmax(array, axis=1)
    return None


def compare(primary: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """Agreement of two models' outputs on the same rows: labels agreeing per row, and the largest
    and mean absolute difference over the float outputs both give."""
    result: dict[str, Any] = {}
    mine, theirs = labels(primary), labels(candidate)
    if mine is not None and theirs is not None and mine.shape == theirs.shape:
        result["rows"] = int(mine.size)
        result["agreed_rows"] = int(np.count_nonzero(mine == theirs))
    diffs = [np.abs(primary[name].astype(np.float64) - candidate[name].astype(np.float64))
             for name in primary if name in candidate and primary[name].dtype.kind == "f"
             and primary[name].shape == candidate[name].shape]
    if diffs:
        result["max_abs_diff"] = float(max(d.max() for d in diffs))
        result["mean_abs_diff"] = float(sum(d.sum() for d in diffs) / sum(d.size for d in diffs))
    return result


def work_off_path(items: queue.Queue, handle: Callable[..., None], label: str) -> None:
    """A worker thread's loop: ``handle(*item)`` for each item until ``STOP``, at nice 10. Linux
    nices threads one by one: the thread (and the single onnxruntime thread of a model it runs)
    then yields the CPU to the event loop whenever both want it on a busy host. A bug costs one
    item, never the worker."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
    except (AttributeError, OSError):
        pass
    while True:
        item = items.get()
        if item is STOP:
            return
        try:
            handle(*item)
        except Exception as err:  # noqa: BLE001 - see above
            print(f"{label}: internal error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def stop_worker(items: queue.Queue, worker: threading.Thread) -> None:
    """End a thread that reads ``items`` until ``STOP``, once it has finished what it holds."""
    if worker.is_alive():
        try:
            items.put(STOP, timeout=1)
        except queue.Full:  # a stuck worker: it is a daemon, and goes with the process
            pass
        worker.join(timeout=5)


class ShadowRoute(SingleRoute):
    """The primary's route, plus a candidate in a worker process fed through a pipe. Only the
    primary is addressable."""

    mode = "shadow"

    def __init__(self, spec: ModelSpec, candidate: ModelSpec, placement: str, metrics: Any,
                 log: PredictionLog | None, queue_size: int = DEFAULT_QUEUE, max_batch: int = 1) -> None:
        super().__init__(spec, placement, max_batch)
        if queue_size < 1:
            raise InputError(f"--shadow-queue {queue_size}: expected at least 1", "e.g. --shadow-queue 64")
        check_signatures(spec, candidate)
        self.candidate_spec = candidate
        self.candidate: Candidate | None = None
        self.metrics = metrics
        self.log = log
        self.queue_size = queue_size
        self._process: subprocess.Popen | None = None
        self._stats: Stats | None = None  # the worker's counts, once loaded
        self._sent = 0  # pairs written (or being written) to the worker
        self._pipe = -1  # the worker's stdin, non-blocking
        self._pending = bytearray()  # frame bytes the pipe could not take yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher = threading.Thread(target=self._watch, name="shadow-watch", daemon=True)
        self._closing = False

    @property
    def ready(self) -> bool:
        return self.model is not None and self.candidate is not None

    def load(self) -> None:
        """The candidate's process starts first: it loads while the primary does."""
        self._stats = Stats.create(LATENCY_BUCKETS_S)
        self._process = _start_worker(self.candidate_spec.root, self._stats.fd, self.log)
        super().load()
        first = read_frame(self._process.stdout)  # type: ignore[arg-type]
        if first is None or not first[0].get("ready"):
            self._process.wait(timeout=30)
            why = first[0].get("error") if first else f"it exited with code {self._process.returncode}"
            raise UnsupportedHere(f"--shadow {self.candidate_spec.name} {self.candidate_spec.version}: the candidate "
                                  f"could not be loaded: {why}", "check the candidate bundle with edgepack verify")
        self.candidate = Candidate(self.candidate_spec, first[0]["warm_run_s"])
        self._pipe = self._process.stdin.fileno()  # type: ignore[union-attr]
        os.set_blocking(self._pipe, False)
        metrics, labels = self.metrics, (self.name, self.candidate_spec.version)
        metrics.shadow_dropped.inc(*labels, amount=0)
        metrics.collectors.append(self._collect)
        self._collect()
        self._watcher.start()

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray], request_id: str = "",
                    key: str | None = None, version: str | None = None) -> Answer:
        answer = await super().infer(names, feed)
        if self._sent - self._stats.done >= self.queue_size:
            self.metrics.shadow_dropped.inc(self.name, self.candidate_spec.version)
            shadow = "dropped"
        else:
            self._sent += 1
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            # After this step of the request's task, which sends its answer: the frame costs the answer nothing.
            self._loop.call_soon(self._send, request_id, feed, answer, time.monotonic())
            shadow = "queued"
        return Answer(answer.version, answer.outputs, answer.run_s, {"shadow": shadow}, answer.batch)

    def _send(self, request_id: str, feed: dict[str, np.ndarray], answer: Answer, queued_at: float) -> None:
        frame = encode_frame({"id": request_id, "model": self.name, "version": answer.version,
                              "run_ms": answer.run_s * 1000, "queued_at": queued_at},
                             {"inputs": feed, "primary": answer.outputs})
        if self._pending:  # frames go in order: after what is already waiting
            self._pending += frame
            return
        try:
            written = os.write(self._pipe, frame)
        except BlockingIOError:
            written = 0
        except OSError:  # the worker is gone (the watcher says so); its pairs stay unfinished, so later ones drop
            return
        if written < len(frame):
            self._pending += frame[written:]
            self._loop.add_writer(self._pipe, self._drain)  # type: ignore[union-attr]

    def _drain(self) -> None:
        try:
            written = os.write(self._pipe, self._pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._pending)
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self._pipe)  # type: ignore[union-attr]

    def _collect(self) -> None:
        """Copy the worker's counts into the shadow series: when /metrics is scraped, not per pair."""
        metrics, labels, slots = self.metrics, (self.name, self.candidate_spec.version), self._stats.slots
        metrics.shadow_requests.values[labels] = slots[Stats.DONE]
        metrics.shadow_errors.values[labels] = slots[Stats.ERRORS]
        metrics.shadow_agreement.values[(*labels, "agree")] = slots[Stats.AGREED]
        metrics.shadow_agreement.values[(*labels, "disagree")] = slots[Stats.DISAGREED]
        metrics.shadow_latency.series[labels] = [*slots[Stats.BUCKETS:], slots[Stats.RUN_SUM]]
        if self.log is not None:
            metrics.record_log(SHADOW_LOG_NAME, not slots[Stats.LOG_FAILING], slots[Stats.LOG_DROPPED],
                               slots[Stats.LOG_ERRORS])

    def _watch(self) -> None:
        """Wait for the worker's end, and say so if it was not asked to stop."""
        process = self._process
        process.stdout.read()  # type: ignore[union-attr]  # nothing more comes until it exits
        code = process.wait()  # type: ignore[union-attr]
        if code != 0 and not self._closing:
            print(f"shadow: the candidate's process stopped (code {code}); shadow runs stop, the primary goes on",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        super().close()
        self._closing = True
        if self._process is not None:
            try:
                self._process.stdin.close()  # type: ignore[union-attr]  # the worker finishes what it read, then exits
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if self._stats is not None:
            self._collect()  # the last counts stay readable


@dataclass(frozen=True)
class Candidate:
    """What the server knows of a shadow candidate running in its worker process."""

    spec: ModelSpec
    warm_run_s: float


def _start_worker(bundle: Path, stats_fd: int, log: PredictionLog | None) -> subprocess.Popen:
    """``python -m <this package>.shadow_worker BUNDLE ...``, importable wherever this runtime is
    (a bundle's ``runtime/`` or the installed ``edgepack.runtime``); it logs beside ``log``."""
    package_root = Path(__file__).resolve().parents[__package__.count(".") + 1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", f"{__package__}.shadow_worker", str(bundle), "--stats-fd", str(stats_fd)]
    if log is not None:
        command += ["--log-dir", str(log.folder), "--log-max-mb", repr(log.max_bytes / 2**20), "--log-keep", str(log.keep)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=(stats_fd,))
