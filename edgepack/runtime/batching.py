"""Requests that are ready at the same time share one ``session.run``.

Why: with many clients, a small model's own run is not what a request mostly costs. Each run
pays onnxruntime's fixed cost and, worse, a cold cache: between two requests the HTTP stack has
evicted the model (a 30-feature random forest's trees), so one row takes ~50 µs in a busy server
against ~10 µs in a tight loop, while 16 rows in one run take ~30 µs. A request that runs on the
event loop therefore waits for the end of the loop's current round of callbacks; every request
that became ready in that round and asks for the same thing (same outputs, same shapes past the
first axis) joins one run of up to ``max_batch`` requests, and each gets back its own rows.
Nothing waits on a timer, and a request waits at all only when ``BACKLOG`` says the HTTP server
has parsed other requests whose handling has not begun: a lone request (concurrency 1) runs at once.

A model is batched only when a two-row run proved that its outputs have one row per input row and
that row *i* of a two-row run is row *i* of a one-row run (``rows_are_independent``). A batch that
fails is run again one request at a time, so a bad request fails alone: a request onnxruntime refuses
(``models.InputRejected``, a 400) costs the others of its batch nothing but a second run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np

from .errors import InferenceFailed

DEFAULT_MAX_BATCH = 32

Run = Callable[[list[str] | None, dict[str, np.ndarray]], dict[str, np.ndarray]]


def rows_are_independent(run: Run, feed: dict[str, np.ndarray]) -> bool:
    """Whether ``run`` answers a stack of feeds with the stack of its answers: every input and
    output has rows along axis 0, and two rows together give what each gives alone."""
    if not feed or any(array.ndim == 0 or array.shape[0] != 1 for array in feed.values()):
        return False
    try:
        one = run(None, feed)
        two = run(None, {name: np.concatenate([array, array]) for name, array in feed.items()})
    except InferenceFailed:  # two rows refused (InputRejected is one too): not a batchable model
        return False
    for name, alone in one.items():
        both = two.get(name)
        if both is None or alone.ndim == 0 or alone.shape[0] != 1 or both.shape != (2, *alone.shape[1:]):
            return False
        for row in both:
            if alone.dtype.kind == "f":
                if not np.allclose(row, alone[0], rtol=1e-4, atol=1e-6, equal_nan=True):
                    return False
            elif not np.array_equal(row, alone[0]):
                return False
    return True


class Backlog:
    """Requests the HTTP server has parsed whose handling has not begun yet. More than zero means
    other requests are ready in this loop iteration: only then is a round worth waiting for.
    ``http_protocol`` counts arrivals; the app counts starts. One per process, like the loop."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = 0

    def arrived(self) -> None:
        self.waiting += 1

    def started(self) -> None:
        if self.waiting:  # a server that counts no arrivals (h11) leaves it at 0
            self.waiting -= 1


BACKLOG = Backlog()


class _Waiting:
    __slots__ = ("names", "feed", "rows", "future", "key", "outcome")

    def __init__(self, names: list[str] | None, feed: dict[str, np.ndarray], future: asyncio.Future | None) -> None:
        self.names = names
        self.feed = feed
        self.future = future  # None for the round's leader, which runs the round itself
        self.outcome: Any = None  # the leader's result, or the exception its run raised
        first = next(iter(feed.values()))
        self.rows = first.shape[0]
        # Requests with equal keys can be stacked along axis 0.
        self.key = (tuple(names) if names else None,
                    tuple((name, array.dtype.str, array.shape[1:]) for name, array in feed.items()))

    def answer(self, outcome: Any) -> None:
        if self.future is None:
            self.outcome = outcome
        elif not self.future.done():  # a client that went away cancelled its request's task
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)


class Batcher:
    """Collects the requests of one loop iteration and runs them together (see the module's doc).

    The first request of a round leads it: it yields to the loop once, so that the other requests
    ready in this iteration join, then runs them all and goes on with its own answer at once; the
    others wait on futures."""

    def __init__(self, run: Run, max_batch: int, backlog: Backlog = BACKLOG) -> None:
        self._run = run
        self.max_batch = max_batch
        self.backlog = backlog
        self._waiting: list[_Waiting] = []

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """The request's outputs, the seconds its run took and how many requests that run served."""
        if self._waiting:
            item = _Waiting(names, feed, asyncio.get_running_loop().create_future())
            self._waiting.append(item)
            return await item.future  # type: ignore[misc]
        if not self.backlog.waiting:  # nobody else is ready: run now, alone
            return self._timed(names, feed)
        item = _Waiting(names, feed, None)
        self._waiting.append(item)
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:  # the leader is gone: the round's others still get their answers
            self._waiting.remove(item)
            if self._waiting:
                asyncio.get_running_loop().call_soon(self._run_round)
            raise
        self._run_round()
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        return item.outcome

    def _run_round(self) -> None:
        waiting, self._waiting = self._waiting, []
        groups: dict[tuple, list[_Waiting]] = {}
        for item in waiting:
            groups.setdefault(item.key, []).append(item)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                self._run_batch(group[start:start + self.max_batch])

    def _timed(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        started = time.perf_counter()
        return self._run(names, feed), time.perf_counter() - started, 1

    def _run_batch(self, batch: list[_Waiting]) -> None:
        if len(batch) > 1:
            feed = {name: np.concatenate([item.feed[name] for item in batch]) for name in batch[0].feed}
            started = time.perf_counter()
            try:
                outputs = self._run(batch[0].names, feed)
            except Exception:  # noqa: BLE001 - run them one by one: only the request at fault fails
                pass
            else:
                run_s = time.perf_counter() - started
                start = 0
                for item in batch:
                    stop = start + item.rows
                    item.answer(({name: array[start:stop] for name, array in outputs.items()}, run_s, len(batch)))
                    start = stop
                return
        for item in batch:
            try:
                item.answer(self._timed(item.names, item.feed))
            except Exception as err:  # noqa: BLE001 - a refused input (400), InferenceFailed (500), a bug: its own
                item.answer(err)
