"""Phased mode: the candidate answers a growing share of requests, promoted or rolled back on gates.

Routing is sticky: a request's key (the ``key_header`` header, else a hash of its inputs) maps to
a fixed point in 0..100 for this rollout, and the candidate answers when that point is below the
step's weight. Weights only grow, so a user who reached the candidate stays on it at the next step.

The candidate's outcomes feed ``rollout_state.Rollout`` on the event loop's thread (every decision
and admin action happens there, so the state needs no lock). A request the candidate fails on is
answered by the primary: the failure counts against the candidate's error gate, not against the
user. An input onnxruntime refuses in both models is the input's fault: the client gets the 400,
and the candidate is not charged with it. Agreement is measured off the request's path: for a
sample of the candidate's requests a worker thread runs the primary on the same input and compares.

Gates count what the client was sent: a request's outcome is recorded when the server knows the
status it sends (``RoutedAnswer.settle``, called by the app just before the answer goes out), so
a 5xx sent for a request is an error of the route that owned it, primary or candidate, whatever
produced it after the model ran. While the prediction log or the state file cannot be written,
the rollout's evidence is incomplete and a complete step is held, not promoted (a failing gate
still rolls back); the hold is shown in ``status()`` and said on stderr once per change.

The state file is written at once, with fsync, on every decision (before the next request is
routed by it) and otherwise twice a second when counts changed, from a thread, so a restart after
kill -9 resumes the same step with at most half a second of counts lost. A write that fails is
retried by that thread; it never fails a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InferenceFailed, InputError, RequestError
from .files import write_atomic
from .models import Answer, InputRejected, ModelSpec, OutOfMemory, ServedModel, SingleRoute
from .prediction_log import PredictionLog, digest, now, outputs_field
from .rollout_state import COMPLETE, ROLLED_BACK, Rollout, state_bytes, state_path
from .shadow import check_signatures, compare, labels, stop_worker, work_off_path

FLUSH_S = 0.5
DEFAULT_CHECK_QUEUE = 64


@dataclass(frozen=True)
class RoutedAnswer(Answer):
    """An answer whose outcome the rollout records once the status sent for it is known."""

    settle: Callable[[int], None] | None = None  # called with the HTTP status sent to the client


def bucket(salt: str, key: str) -> float:
    """A point in [0, 100) fixed by the rollout's salt and the request's key."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, key=salt.encode())
    return int.from_bytes(h.digest(), "big") / 2**64 * 100


def row_agreement(primary: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tolerance: float) -> tuple[int, int]:
    """(rows, rows agreeing): by label for classifiers, else every float output within ``tolerance``
    (absolute and relative) of the primary's, row by row."""
    mine, theirs = labels(primary), labels(candidate)
    if mine is not None and theirs is not None and mine.shape == theirs.shape:
        return int(mine.size), int(np.count_nonzero(mine == theirs))
    rows, agree = 0, None
    for name, value in primary.items():
        other = candidate.get(name)
        if other is None or other.shape != value.shape or value.ndim == 0:
            continue
        close = np.isclose(other.astype(np.float64), value.astype(np.float64), rtol=tolerance, atol=tolerance)
        per_row = close.reshape(close.shape[0], -1).all(axis=1)
        rows = per_row.size
        agree = per_row if agree is None else agree & per_row
    return (rows, int(np.count_nonzero(agree))) if agree is not None else (0, 0)


class PhasedRoute(SingleRoute):
    """The primary and the candidate, both loaded; ``rollout`` decides who answers."""

    mode = "phased"

    def __init__(self, spec: ModelSpec, candidate: ModelSpec, placement: str, metrics: Any,
                 log: PredictionLog | None, rollout: Rollout, state_dir: Path,
                 queue_size: int = DEFAULT_CHECK_QUEUE, max_batch: int = 1) -> None:
        super().__init__(spec, placement, max_batch)
        check_signatures(spec, candidate, "--phased")
        self.candidate_spec = candidate
        self.candidate: ServedModel | None = None
        self.metrics = metrics
        self.log = log
        self.rollout = rollout
        self.state_dir = state_dir
        self.key_header = rollout.spec.key_header.lower().encode("latin-1")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checks: queue.Queue = queue.Queue(maxsize=queue_size)
        self._checker = threading.Thread(target=self._check_worker, name="rollout-check", daemon=True)
        self._flusher = threading.Thread(target=self._flush_worker, name="rollout-state", daemon=True)
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        # Bumped (on the loop) by every change of the state: it orders snapshots, so that one taken
        # before a decision is never written over the decision's.
        self._changes = 0
        self._saved_changes = -1  # the changes the file on disk holds
        self._state_error: str | None = None  # why the last write of the state file failed, until one succeeds
        self._held: str | None = None  # the hold last said on stderr

    @property
    def ready(self) -> bool:
        return self.model is not None and self.candidate is not None

    @property
    def versions(self) -> list[str]:
        return [self.spec.version, self.candidate_spec.version]

    def load(self) -> None:
        super().load()
        self.candidate = ServedModel(self.candidate_spec, self.placement, self.max_batch)
        self._persist(*self._snapshot())
        self._log_event({"event": "serve", "reason": "server started", "state": self.rollout.state,
                         "step": self.rollout.step + 1, "weight": self.rollout.weight,
                         "spec": self.rollout.spec.to_json(), "primary": self.rollout.primary,
                         "candidate": self.rollout.candidate})
        self._gauges()
        self._checker.start()
        self._flusher.start()

    # -- requests ------------------------------------------------------------------------------

    def routes_to_candidate(self, key: str) -> bool:
        weight = self.rollout.weight
        return weight >= 100 or (weight > 0 and bucket(self.rollout.salt, key) < weight)

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray], request_id: str = "",
                    key: str | None = None, version: str | None = None) -> Answer:
        if self.model is None or self.candidate is None:
            raise RequestError(f"model {self.name} is still loading", "retry once /v2/health/ready answers 200", 503)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        rollout = self.rollout
        step = rollout.step + 1
        if version is not None:  # /v2/models/NAME/versions/V/infer: that version answers, outside the gates
            pinned = self.candidate if version == self.candidate_spec.version else self.model
            outputs, run_s, batch = await pinned.infer(names, feed)
            variant = "candidate" if pinned is self.candidate else "primary"
            return Answer(pinned.spec.version, outputs, run_s, {"variant": variant, "step": step, "pinned": True}, batch)
        if not self.routes_to_candidate(key if key is not None else digest(feed)):
            try:
                outputs, run_s, batch = await self.model.infer(names, feed)
            except InputRejected:
                self._primary_sent(400)
                raise
            except InferenceFailed as err:
                self._primary_sent(503 if isinstance(err, OutOfMemory) else 500)
                raise
            return RoutedAnswer(self.spec.version, outputs, run_s, {"variant": "primary", "step": step}, batch,
                                settle=self._primary_sent)
        started = time.perf_counter()
        try:
            outputs, run_s, batch = await self.candidate.infer(names, feed)
        except InferenceFailed as err:
            latency_ms = (time.perf_counter() - started) * 1000
            # The user gets the primary's answer; the candidate's failure is counted and logged, unless
            # the primary refuses the input too: then it is the input's fault and the client's 400.
            try:
                outputs, run_s, batch = await self.model.infer(names, feed)
            except InputRejected:
                if not isinstance(err, InputRejected):
                    self._candidate_failed(latency_ms)
                raise
            except BaseException:
                self._candidate_failed(latency_ms)
                raise
            self._candidate_failed(latency_ms)  # counted already: the status sent does not change that
            return Answer(self.spec.version, outputs, run_s,
                          {"variant": "primary", "step": step, "fallback": err.message}, batch)
        latency_ms = (time.perf_counter() - started) * 1000
        if rollout.state != COMPLETE and random.random() < rollout.spec.agreement_sample:
            try:
                self._checks.put_nowait((request_id, feed, outputs))
            except queue.Full:
                rollout.counts.checks_dropped += 1
                self._changes += 1
        return RoutedAnswer(self.candidate_spec.version, outputs, run_s, {"variant": "candidate", "step": step}, batch,
                            settle=functools.partial(self._candidate_sent, latency_ms))

    def _primary_sent(self, status: int) -> None:
        """A request the primary owned, with the status it was sent."""
        failed = status >= 500
        self.metrics.rollout_requests.inc(self.name, "primary", "error" if failed else "ok")
        if self.rollout.state != COMPLETE:
            self.rollout.record_primary(failed)
            self._changes += 1

    def _candidate_sent(self, latency_ms: float, status: int) -> None:
        """A request the candidate answered, with the status it was sent: a 5xx is its error."""
        if status >= 500:
            self._candidate_failed(latency_ms)
            return
        self._candidate_outcome(True, latency_ms)
        self.metrics.rollout_requests.inc(self.name, "candidate", "ok")

    def _candidate_failed(self, latency_ms: float) -> None:
        self._candidate_outcome(False, latency_ms)
        self.metrics.rollout_requests.inc(self.name, "candidate", "error")

    def _candidate_outcome(self, ok: bool, latency_ms: float) -> None:
        if self.rollout.state == COMPLETE:
            return  # the rollout is over: nothing left to gate
        self._changes += 1
        decision = self.rollout.record_candidate(ok, latency_ms, time.time(), self._hold())
        if decision is not None:
            self._decided(decision)

    def _hold(self) -> str | None:
        """Why the rollout's evidence is incomplete now (a complete step then waits), else None.
        On the loop; says a change of it on stderr once."""
        hold = None
        if self.log is not None and not self.log.healthy:
            hold = f"the prediction log {self.log.path} cannot be written"
        elif self._state_error is not None:
            hold = f"the state file cannot be written ({self._state_error})"
        if hold != self._held:
            self._held = hold
            what = f"held: {hold}; no promotion until it clears" if hold else "no longer held"
            print(f"rollout {self.name} {self.candidate_spec.version}: {what}", file=sys.stderr, flush=True)
        return hold

    # -- agreement checks, off the request's path ----------------------------------------------

    def _check_worker(self) -> None:
        work_off_path(self._checks, self._check, "rollout check")

    def _check(self, request_id: str, feed: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> None:
        try:
            primary = self.model.run(list(candidate), feed)  # type: ignore[union-attr]
        except InferenceFailed:
            return  # the primary fails on it too: no evidence either way
        rows, agreed = row_agreement(primary, candidate, self.rollout.spec.agreement_tolerance)
        if self.log is not None:
            record = {"id": request_id, "time": now(), "model": self.name, "role": "check",
                      "primary": {"version": self.spec.version, **outputs_field(primary)},
                      "candidate": {"version": self.candidate_spec.version, **outputs_field(candidate)},
                      "rows": rows, "agreed_rows": agreed}
            record.update({k: v for k, v in compare(primary, candidate).items() if k.endswith("diff")})
            self.log.write(record)
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._checked, rows, agreed)
        except RuntimeError:  # the loop closed while the server stops
            pass

    def _checked(self, rows: int, agreed: int) -> None:
        self.metrics.rollout_agreement.inc(self.name, "agree", amount=agreed)
        self.metrics.rollout_agreement.inc(self.name, "disagree", amount=rows - agreed)
        if self.rollout.state == COMPLETE:
            return
        self._changes += 1
        decision = self.rollout.record_check(rows, agreed, time.time(), self._hold())
        if decision is not None:
            self._decided(decision)

    # -- decisions and the state file ----------------------------------------------------------

    def _decided(self, decision: dict[str, Any]) -> None:
        """On the loop: the state is on disk before the next request is routed by it (when it cannot
        be written, the flusher retries it and the rollout holds meanwhile)."""
        self._changes += 1
        self._persist_or_report(*self._snapshot())
        self._log_event(decision)
        self.metrics.rollout_decisions.inc(self.name, decision["event"])
        self._gauges()
        print(f"rollout {self.name} {self.candidate_spec.version}: {decision['event']} -> "
              f"{self.rollout.state} at step {decision['step']} ({decision['weight']:g}%): {decision['reason']}",
              file=sys.stderr, flush=True)

    def _log_event(self, entry: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write({"id": "", "time": now(), "model": self.name, "role": "rollout", **entry})

    def _gauges(self) -> None:
        rollout, metrics = self.rollout, self.metrics
        metrics.rollout_step.set(rollout.step + 1, self.name)
        metrics.rollout_weight.set(rollout.weight, self.name)
        for state in ("running", ROLLED_BACK, COMPLETE):
            metrics.rollout_state.set(1 if rollout.state == state else 0, self.name, state)

    def _snapshot(self) -> tuple[int, bytes]:
        """(the changes it covers, the state file's content); on the loop (or before it runs)."""
        return self._changes, state_bytes(self.rollout.to_json())

    def _persist(self, changes: int, payload: bytes) -> None:
        with self._write_lock:
            if changes <= self._saved_changes:  # this state, or a newer one, is already on disk
                return
            write_atomic(state_path(self.state_dir), payload)
            self._saved_changes = changes

    def _persist_or_report(self, changes: int, payload: bytes) -> None:
        """``_persist``, with a failure said once per change of state rather than raised."""
        try:
            self._persist(changes, payload)
        except OSError as err:
            if self._state_error is None:
                print(f"rollout: cannot write the state in {self.state_dir} ({err.strerror or err}); "
                      "retrying twice a second, no promotion until it is written", file=sys.stderr, flush=True)
            self._state_error = err.strerror or str(err)
            return
        if self._state_error is not None:
            self._state_error = None
            print(f"rollout: writing the state in {self.state_dir} again", file=sys.stderr, flush=True)

    def _flush_worker(self) -> None:
        while not self._stop.wait(FLUSH_S):
            loop = self._loop
            if loop is None:
                continue
            done: concurrent.futures.Future = concurrent.futures.Future()
            try:
                loop.call_soon_threadsafe(self._tick, done)
            except RuntimeError:  # the loop is closed: close() writes the last state
                return
            snapshot = None
            while not self._stop.is_set():  # a stopped loop never runs the tick
                try:
                    snapshot = done.result(timeout=0.1)
                    break
                except concurrent.futures.TimeoutError:
                    continue
            if snapshot is not None:
                self._persist_or_report(*snapshot)

    def _tick(self, done: concurrent.futures.Future) -> None:
        """On the loop: a step may be complete by time alone; then hand over a snapshot if needed."""
        try:
            decision = self.rollout.evaluate(time.time(), self._hold())
            if decision is not None:
                self._decided(decision)
            done.set_result(self._snapshot() if self._changes > self._saved_changes else None)
        except BaseException as err:  # noqa: BLE001 - the flusher waits on this future
            done.set_exception(err)

    # -- operators -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {**self.rollout.status(time.time()), "held": self._hold()}

    def steer(self, action: str, reason: str) -> dict[str, Any]:
        """``promote`` or ``rollback`` from an operator; 409 when there is nothing to do."""
        try:
            decision = self.rollout.steer(action, time.time(), reason)
        except InputError as err:
            raise RequestError(err.message, err.hint, 409) from None
        self._decided(decision)
        return self.status()

    def close(self) -> None:
        super().close()
        self._stop.set()
        if self._flusher.is_alive():
            self._flusher.join(timeout=5)
        stop_worker(self._checks, self._checker)
        if self.candidate is not None:
            self.candidate.close()
        self._persist_or_report(*self._snapshot())  # the loop has stopped: nothing changes the state any more
