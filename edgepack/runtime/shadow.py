"""Shadow mode: the primary answers; a candidate runs the same input off the request's path.

The candidate lives in its own process (``shadow_worker``, SCHED_IDLE), so its work never holds
the GIL the server's event loop needs. The route hands each answered request's input and the
primary's outputs to a bounded queue and returns at once: the primary's answer never waits for the
candidate. When the queue is full the shadow work is dropped and counted (flooding must slow
nothing but the shadow). A sender thread writes the queue to the worker's pipe; a receiver thread
reads back one record per pair, writes it as a ``role: shadow`` line to the prediction log, and
counts it; a candidate failure is caught there, counted and logged, never seen by the client.
"""

from __future__ import annotations

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
from .models import Answer, ModelSpec, SingleRoute
from .prediction_log import PredictionLog

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
    """The primary's route, plus a candidate in a worker process fed from a bounded queue. Only the
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
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._process: subprocess.Popen | None = None
        self._sender = threading.Thread(target=self._send, name="shadow-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="shadow-receive", daemon=True)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.candidate is not None

    def load(self) -> None:
        """The candidate's process starts first: it loads while the primary does."""
        self._process = _start_worker(self.candidate_spec.root)
        super().load()
        from .shadow_worker import read_frame

        first = read_frame(self._process.stdout)  # type: ignore[arg-type]
        if first is None or not first[0].get("ready"):
            self._process.wait(timeout=30)
            why = first[0].get("error") if first else f"it exited with code {self._process.returncode}"
            raise UnsupportedHere(f"--shadow {self.candidate_spec.name} {self.candidate_spec.version}: the candidate "
                                  f"could not be loaded: {why}", "check the candidate bundle with edgepack verify")
        self.candidate = Candidate(self.candidate_spec, first[0]["warm_run_s"])
        metrics, labels = self.metrics, (self.name, self.candidate_spec.version)
        for counter in (metrics.shadow_requests, metrics.shadow_dropped, metrics.shadow_errors):
            counter.inc(*labels, amount=0)
        for result in ("agree", "disagree"):
            metrics.shadow_agreement.inc(*labels, result, amount=0)
        metrics.shadow_latency.start(*labels)
        self._sender.start()
        self._receiver.start()

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray], request_id: str = "",
                    key: str | None = None, version: str | None = None) -> Answer:
        answer = await super().infer(names, feed)
        try:
            self._queue.put_nowait((request_id, feed, answer, time.monotonic()))
            shadow = "queued"
        except queue.Full:
            self.metrics.shadow_dropped.inc(self.name, self.candidate_spec.version)
            shadow = "dropped"
        return Answer(answer.version, answer.outputs, answer.run_s, {"shadow": shadow}, answer.batch)

    def _send(self) -> None:
        from .shadow_worker import write_frame

        pipe = self._process.stdin  # type: ignore[union-attr]
        try:
            while True:
                item = self._queue.get()
                if item is STOP:
                    return
                request_id, feed, answer, queued_at = item
                write_frame(pipe, {"id": request_id, "model": self.name, "version": answer.version,
                                   "run_ms": answer.run_s * 1000, "queued_at": queued_at},
                            {"inputs": feed, "primary": answer.outputs})
        except (BrokenPipeError, ValueError):  # the worker died (the receiver says so) or the pipe closed
            pass
        finally:
            try:
                pipe.close()  # the worker answers what it read, then exits
            except OSError:
                pass

    def _receive(self) -> None:
        from .shadow_worker import read_frame

        while True:
            try:
                frame = read_frame(self._process.stdout)  # type: ignore[arg-type, union-attr]
            except (EOFError, OSError, ValueError) as err:
                frame, why = None, f"{type(err).__name__}: {err}"
            else:
                why = "it exited"
            if frame is None:
                code = self._process.wait()  # type: ignore[union-attr]
                if code != 0:
                    print(f"shadow: the candidate's process stopped ({why}, code {code}); shadow runs stop, "
                          "the primary goes on", file=sys.stderr, flush=True)
                return
            record = frame[0]
            if self.log is not None:
                self.log.write(record)
            self._update(record)  # after the line: a count on /metrics means its line is written

    def _update(self, record: dict[str, Any]) -> None:
        """On the receiver thread, the only writer of these series (created in ``load``, so that a
        scrape on the loop never sees a dict change size): waking the event loop for each pair
        would cost the primary more than the counts are worth."""
        metrics, labels = self.metrics, (self.name, self.candidate_spec.version)
        metrics.shadow_requests.inc(*labels)
        if record["status"] != "ok":
            metrics.shadow_errors.inc(*labels)
            return
        metrics.shadow_latency.observe(record["candidate"]["run_ms"] / 1000, *labels)
        if "rows" in record:
            metrics.shadow_agreement.inc(*labels, "agree", amount=record["agreed_rows"])
            metrics.shadow_agreement.inc(*labels, "disagree", amount=record["rows"] - record["agreed_rows"])

    def close(self) -> None:
        super().close()
        stop_worker(self._queue, self._sender)
        if self._receiver.is_alive():
            self._receiver.join(timeout=10)  # the pairs in hand are answered and written
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


@dataclass(frozen=True)
class Candidate:
    """What the server knows of a shadow candidate running in its worker process."""

    spec: ModelSpec
    warm_run_s: float


def _start_worker(bundle: Path) -> subprocess.Popen:
    """``python -m <this package>.shadow_worker BUNDLE``, importable wherever this runtime is
    (a bundle's ``runtime/`` or the installed ``edgepack.runtime``)."""
    package_root = Path(__file__).resolve().parents[__package__.count(".") + 1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", f"{__package__}.shadow_worker", str(bundle)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=1 << 16)
