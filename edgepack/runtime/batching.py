"""Requests that are ready at the same time share one ``session.run``.

Why: with many clients, a small model's own run is not what a request mostly costs. Each run
pays onnxruntime's fixed cost and, worse, a cold cache: between two requests the HTTP stack has
evicted the model (a 30-feature random forest's trees), so one row takes ~50 µs in a busy server
against ~10 µs in a tight loop, while 16 rows in one run take ~30 µs. A request that runs on the
event loop therefore waits for the end of the loop's current round of callbacks; every request
that became ready in that round and asks for the same thing (same outputs, same shapes past the
first axis) joins one run of up to ``max_batch`` requests, and each gets back its own rows.
Nothing waits on a timer: a lone request runs one loop iteration later, on its own.

A model is batched only when a two-row run proved that its outputs have one row per input row and
that row *i* of a two-row run is row *i* of a one-row run (``rows_are_independent``). A batch that
fails is run again one request at a time, so a bad request fails alone.
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
    except InferenceFailed:
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


class _Waiting:
    __slots__ = ("names", "feed", "rows", "future", "key")

    def __init__(self, names: list[str] | None, feed: dict[str, np.ndarray], future: asyncio.Future) -> None:
        self.names = names
        self.feed = feed
        self.future = future
        first = next(iter(feed.values()))
        self.rows = first.shape[0]
        # Requests with equal keys can be stacked along axis 0.
        self.key = (tuple(names) if names else None,
                    tuple((name, array.dtype.str, array.shape[1:]) for name, array in feed.items()))


class Batcher:
    """Collects the requests of one loop iteration and runs them together (see the module's doc)."""

    def __init__(self, run: Run, max_batch: int) -> None:
        self._run = run
        self.max_batch = max_batch
        self._waiting: list[_Waiting] = []

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """The request's outputs, the seconds its run took and how many requests that run served."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._run_waiting)
        self._waiting.append(_Waiting(names, feed, future))
        return await future

    def _run_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        while waiting:
            key = waiting[0].key
            batch = [item for item in waiting if item.key == key][:self.max_batch]
            chosen = set(map(id, batch))
            waiting = [item for item in waiting if id(item) not in chosen]
            self._run_batch(batch)

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
                    _answer(item, ({name: array[start:stop] for name, array in outputs.items()}, run_s, len(batch)))
                    start = stop
                return
        for item in batch:
            started = time.perf_counter()
            try:
                outputs = self._run(item.names, item.feed)
            except Exception as err:  # noqa: BLE001 - InferenceFailed (a 500) or a bug: this request's alone
                if not item.future.done():
                    item.future.set_exception(err)
            else:
                _answer(item, (outputs, time.perf_counter() - started, 1))


def _answer(item: _Waiting, result: Any) -> None:
    if not item.future.done():  # a client that went away cancelled its request's task
        item.future.set_result(result)
