"""Shadow mode: the primary answers; a candidate runs the same input off the request's path.

The route hands each answered request's input and the primary's outputs to a bounded queue read
by one worker thread, and returns at once: the primary's answer never waits for the candidate.
When the queue is full the shadow work is dropped and counted (flooding must slow nothing but the
shadow). The worker runs the candidate, compares, and writes one ``role: shadow`` line to the
prediction log per pair; a candidate failure is caught, counted and logged there, never seen by
the client. Metrics are updated on the event loop's thread (``call_soon_threadsafe``), because
``metrics`` is lock-free by design.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .models import Answer, ModelSpec, ServedModel, SingleRoute
from .prediction_log import PredictionLog, now, outputs_field

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


class ShadowRoute(SingleRoute):
    """The primary's route, plus a candidate fed from a bounded queue. Only the primary is addressable."""

    mode = "shadow"

    def __init__(self, spec: ModelSpec, candidate: ModelSpec, placement: str, metrics: Any,
                 log: PredictionLog | None, queue_size: int = DEFAULT_QUEUE) -> None:
        super().__init__(spec, placement)
        if queue_size < 1:
            raise InputError(f"--shadow-queue {queue_size}: expected at least 1", "e.g. --shadow-queue 64")
        check_signatures(spec, candidate)
        self.candidate_spec = candidate
        self.candidate: ServedModel | None = None
        self.metrics = metrics
        self.log = log
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = threading.Thread(target=self._work, name="shadow", daemon=True)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.candidate is not None

    def load(self) -> None:
        super().load()
        # "thread" placement: the candidate only ever runs in the worker, never on the loop.
        self.candidate = ServedModel(self.candidate_spec, "thread")
        self._worker.start()

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray], request_id: str = "",
                    key: str | None = None, version: str | None = None) -> Answer:
        answer = await super().infer(names, feed)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        try:
            self._queue.put_nowait((request_id, feed, answer, time.perf_counter()))
            shadow = "queued"
        except queue.Full:
            self.metrics.shadow_dropped.inc(self.name, self.candidate_spec.version)
            shadow = "dropped"
        return Answer(answer.version, answer.outputs, answer.run_s, shadow)

    def _work(self) -> None:
        work_off_path(self._queue, self._pair, "shadow")

    def _pair(self, request_id: str, feed: dict[str, np.ndarray], answer: Answer, queued_at: float) -> None:
        candidate = self.candidate_spec
        record: dict[str, Any] = {"id": request_id, "time": now(), "model": self.name, "role": "shadow",
                                  "primary": {"version": answer.version, "run_ms": answer.run_s * 1000,
                                              **outputs_field(answer.outputs)},
                                  "queued_ms": (time.perf_counter() - queued_at) * 1000}
        started = time.perf_counter()
        try:
            outputs = self.candidate.run(None, feed)  # type: ignore[union-attr] - loaded before the worker starts
        except Exception as err:  # noqa: BLE001 - InferenceFailed or anything else: counted, never raised
            run_s = time.perf_counter() - started
            record["candidate"] = {"version": candidate.version, "run_ms": run_s * 1000,
                                   "error": getattr(err, "message", None) or f"{type(err).__name__}: {err}"}
            record["status"] = "error"
            agreement = None
        else:
            run_s = time.perf_counter() - started
            record["candidate"] = {"version": candidate.version, "run_ms": run_s * 1000, **outputs_field(outputs)}
            record["status"] = "ok"
            agreement = compare(answer.outputs, outputs)
            record.update(agreement)
        if self.log is not None:
            self.log.write(record)
        self._update(run_s, agreement)  # after the line: a count on /metrics means its line is written

    def _update(self, run_s: float, agreement: dict[str, Any] | None) -> None:
        metrics, name, version = self.metrics, self.name, self.candidate_spec.version

        def apply() -> None:
            metrics.shadow_requests.inc(name, version)
            if agreement is None:
                metrics.shadow_errors.inc(name, version)
                return
            metrics.shadow_latency.observe(run_s, name, version)
            if "rows" in agreement:
                metrics.shadow_agreement.inc(name, version, "agree", amount=agreement["agreed_rows"])
                metrics.shadow_agreement.inc(name, version, "disagree",
                                             amount=agreement["rows"] - agreement["agreed_rows"])

        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop closed while the server stops: the counts go with it
            pass

    def close(self) -> None:
        super().close()
        if self._worker.is_alive():
            try:
                self._queue.put(STOP, timeout=1)
            except queue.Full:
                pass
            self._worker.join(timeout=5)  # finish the pair in hand so its line is written
        if self.candidate is not None:
            self.candidate.close()
