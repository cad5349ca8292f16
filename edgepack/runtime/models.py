"""What the HTTP layer talks to: a registry of model names, each behind a route to loaded models.

The app asks the registry for a route by name and calls ``route.infer``; it never touches a
session. ``SingleRoute`` has one model answer; ``shadow.ShadowRoute`` adds a candidate run off
the request's path; ``phased.PhasedRoute`` offers the same face (``infer``, ``metadata``, ``ready``,
``load``) and decides per request which model answers; ``Answer.version`` tells the client which did.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import Batcher, rows_are_independent
from .errors import InferenceFailed, InputError, IntegrityError, RequestError, UnsupportedHere
from .v2 import PLATFORM, Signature

# Where inference runs (benchmarks/serve_latency.py measures it): session.run releases the GIL,
# but the hop to a thread and back costs 50-100 us at concurrency 1, more than a tiny model's
# whole run, while at concurrency 16 the CPU per request differs by a few percent either way. So
# "auto" runs a request on the event loop when its expected run time (the warm-up's, scaled by the
# input's size) is below a budget, and in a thread above it. With one worker (one core, or a
# session using every core) threads add no parallelism, only a free loop, so blocking it for up to
# 1 ms is the better deal; with several, a run longer than the hop is worth overlapping with others.
INLINE_BUDGET_S = {"one_worker": 0.001, "several_workers": 0.0002}
PLACEMENTS = ("auto", "loop", "thread")

# onnxruntime's text for a failed run: "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned
# while running Add node. Name:'merge' Status Message: /onnxruntime_src/onnxruntime/core/providers/
# cpu/math/element_wise_ops.h:583 void onnxruntime::BroadcastIterator::Append(ptrdiff_t, ptrdiff_t)
# axis == 1 || axis == largest was false. Attempting to broadcast an axis by a dimension other than 1.
# 5 by 6". A client needs the node and the last sentences; ``ort_reason`` keeps those.
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
_ORT_NOISE = (_ORT_STATUS,
              re.compile(r"\S+\.(?:cc|cpp|cu|h|hpp|inc):\d+ "),  # where in onnxruntime's source
              re.compile(r"[^()]*?\w::[~\w]+\([^()]*\)(?: const)? "),  # the C++ function it was in
              re.compile(r".*? was false\. (?=\S)"))  # the check that failed, when a message follows it
_REASON_CHARS = 400
# Failures that are the server's, not the input's: memory (the message of onnxruntime's arena, and
# std::bad_alloc as libstdc++ and MSVC word it) and an execution provider's own (a device) failure.
_OUT_OF_MEMORY = re.compile(r"Failed to allocate memory|bad[ _]alloc|out of memory", re.IGNORECASE)
_SERVER_STATUSES = {"EP_FAIL", "ENGINE_ERROR"}


class InputRejected(RequestError, InferenceFailed):
    """onnxruntime refused, at run time, input that the server had accepted (names, datatypes,
    shapes against the signature): a 400. The model ran on the bundle's own sample at warm-up, so
    what fails now is this input: a constraint of the model's (a dimension that must divide evenly,
    an index that must be in range) that its signature cannot state. It is an InferenceFailed
    too, so what runs models and catches failed runs (batching, phased, shadow) sees one."""


class OutOfMemory(InferenceFailed):
    """onnxruntime could not allocate memory for a run: answered with 503, not 500 (no bug) nor 400
    (the input may be fine): memory is the host's, shared with the requests running beside this
    one, so the same request can succeed later, with fewer at once, or on another replica; 503 is
    what clients and balancers retry elsewhere, and what an alert on 500s (bugs) should not count."""


def ort_reason(text: str) -> tuple[str | None, str]:
    """(onnxruntime's status name, e.g. FAIL or INVALID_ARGUMENT, or None when the text is not
    onnxruntime's; its reason without the source locations and C++ names around it)."""
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())  # some reasons span lines
    status = _ORT_STATUS.match(first)
    reason = first[status.end():] if status else first
    where = ""
    if node := _ORT_NODE.match(reason):
        where = f"{node.group(1)} node {node.group(2)!r}: " if node.group(2) else f"{node.group(1)} node: "
        reason = reason[node.end():]
    changed = True
    while changed:  # the layers come in this order, and a nested status may start them again
        changed = False
        for noise in _ORT_NOISE:
            if (match := noise.match(reason)) and match.end() < len(reason):
                reason, changed = reason[match.end():], True
    reason = (where + reason.strip()) or first or "no reason given"
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS - 3] + "..."
    return (status.group(1) if status else None), reason


@dataclass(frozen=True)
class ModelSpec:
    """One model of a verified bundle, as its manifest describes it."""

    name: str
    version: str
    path: Path
    signature: Signature
    threads: int | None
    providers: list[str] | None
    warmup: Path | None  # sample rows for the warm-up runs (the bundle's bench input)
    root: Path  # the bundle folder

    @classmethod
    def from_bundle(cls, root: Path, manifest: dict[str, Any], threads: int | None = None) -> ModelSpec:
        target = manifest.get("target") or {}
        try:
            signature = Signature.from_manifest(manifest)
        except ValueError as err:
            raise UnsupportedHere(f"{root}: {err}", "serve it with a newer edgepack, or use python -m runtime predict") from None
        warmup = manifest.get("bench_input")
        return cls(manifest["name"], manifest["version"], root / manifest["model"], signature,
                   threads if threads is not None else target.get("threads"), target.get("providers"),
                   root / warmup if warmup and (root / warmup).is_file() else None, root)


MAX_ROWS_PER_RUN = 1024


def max_rows_per_run() -> int | None:
    """Rows per ``session.run`` of a large request: ``EDGEPACK_MAX_ROWS_PER_RUN`` (0: no limit)."""
    text = os.environ.get("EDGEPACK_MAX_ROWS_PER_RUN", "").strip()
    try:
        value = int(text) if text else MAX_ROWS_PER_RUN
    except ValueError:
        raise InputError(f"EDGEPACK_MAX_ROWS_PER_RUN={text!r} is not a whole number",
                         "give a number of rows, or 0 for no limit") from None
    return value if value > 0 else None


class ServedModel:
    """A session ready to answer: created, checked against the manifest, warmed up and timed."""

    def __init__(self, spec: ModelSpec, placement: str = "auto", max_batch: int = 1) -> None:
        import onnxruntime as ort

        from .session import create_session, load_inputs, make_feed

        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
        self.spec = spec
        try:
            self.session, self.create_s = create_session(spec.path, spec.threads, providers=spec.providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for files it cannot load
            raise UnsupportedHere(f"onnxruntime {ort.__version__} cannot load {spec.path.name}: "
                                  f"{str(err).splitlines()[0]}", "install the onnxruntime the bundle was built for") from None
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (list(spec.signature.inputs), list(spec.signature.outputs)):
            raise IntegrityError(f"{spec.path.name} takes {names[0]} and gives {names[1]}, the manifest says "
                                 f"{list(spec.signature.inputs)} and {list(spec.signature.outputs)}", "rebuild the bundle")
        # onnxruntime logs every failed run to stderr at ERROR; a run the client's input made fail is
        # answered (400) and logged by the server, so per run only FATAL gets through. (Passing run
        # options also saves the ~0.7 us the binding spends making default ones for each run.)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self._chunk_rows: int | None = None  # set below, once the rows are known to be independent
        feed, _ = make_feed(self.session, load_inputs(spec.warmup) if spec.warmup else None, batch=1)
        try:
            self.warm_run_s = self._warm_up(feed)
        except InferenceFailed as err:  # a refusal of the bundle's own sample is no client's fault
            on = "the bundle's sample" if spec.warmup else "generated sample input"
            raise InferenceFailed(f"{err.message} (at warm-up, on {on})", "the model cannot run its sample here: "
                                  "check the bundle with python -m runtime bench, and serve it with the onnxruntime "
                                  "it was built for") from None
        self.run_s_per_element = self.warm_run_s / max(sum(a.size for a in feed.values()), 1)
        self.placement = placement
        # session.run overlaps in threads; each run uses the session's intra-op threads, so more
        # workers than cores / threads would only make them queue inside onnxruntime.
        self.workers = max(1, usable_cores() // spec.threads) if spec.threads else 1
        self.inline_budget_s = INLINE_BUDGET_S["one_worker" if self.workers == 1 else "several_workers"]
        # Only runs on the loop are batched: a thread's run is long enough to pay for itself.
        self._batcher = None
        independent = rows_are_independent(self.run, feed)
        if max_batch > 1 and placement != "thread" and independent:
            self._batcher = Batcher(self.run, max_batch)
        # A request of many rows runs in parts of at most this many rows: onnxruntime's activations
        # (and the arena that keeps them) grow with the rows of one run, ~100 MB for 21,600 rows of
        # a 2x512 MLP against ~10 MB in parts of 1,024. Only for models whose rows are independent.
        self._chunk_rows = max_rows_per_run() if independent else None
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"infer-{spec.name}")

    def _warm_up(self, feed: dict[str, np.ndarray]) -> float:
        """A cold run (the first allocates and plans), then up to 50 runs or 20 ms; their median run time."""
        self.run(None, feed)
        times: list[float] = []
        deadline = time.perf_counter() + 0.02
        while not times or (len(times) < 50 and time.perf_counter() < deadline):
            started = time.perf_counter()
            self.run(None, feed)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Blocking; a failed run raises, never crashes: InputRejected (400) when onnxruntime refused
        the input, OutOfMemory (503), InferenceFailed (500) when the server is at fault. A feed of
        more rows than ``max_rows_per_run`` runs in parts, whose outputs are joined."""
        if not self._chunk_rows:  # the hot path of small models: nothing to count
            return self._run_once(names, feed)
        rows = {array.shape[0] if array.ndim else 0 for array in feed.values()}
        if len(rows) == 1 and (count := rows.pop()) > self._chunk_rows:
            parts = [self._run_once(names, {name: array[start:start + self._chunk_rows] for name, array in feed.items()})
                     for start in range(0, count, self._chunk_rows)]
            return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return self._run_once(names, feed)

    def _run_once(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(names, feed, self._run_options)
        except Exception as err:  # noqa: BLE001 - onnxruntime's error types are not importable stably
            raise self._failure(err) from None
        produced = dict(zip(names or self.spec.signature.outputs, values))
        for name, value in produced.items():
            if not isinstance(value, np.ndarray):
                raise InferenceFailed(f"model {self.spec.name}: output {name!r} is a {type(value).__name__}, "
                                      "not a tensor", "rebuild the bundle")
        return produced

    def _failure(self, err: Exception) -> InferenceFailed:
        """What a run's exception means. onnxruntime ran this model on its sample at warm-up, and the
        server checked the input's names, datatypes and shapes, so onnxruntime's own refusals (a
        kernel's shape check, an index out of range) are the input's; memory and a provider's
        failure are the server's, and so is any exception that is not onnxruntime's (a bug here)."""
        status, reason = ort_reason(str(err))
        where = f"model {self.spec.name}"
        if _OUT_OF_MEMORY.search(str(err)):
            return OutOfMemory(f"{where}: out of memory for this run: {reason}",
                               "retry later or on another replica, or send fewer rows per request")
        if status is None or status in _SERVER_STATUSES:
            return InferenceFailed(f"{where}: onnxruntime failed: {type(err).__name__}: {reason}",
                                   "the input passed validation; report this with the request")
        return InputRejected(f"{where}: onnxruntime failed on this input: {reason}",
                             "onnxruntime refused this input: the model's constraints on its inputs (a dimension "
                             "that must divide evenly, an index in range) are not in its signature; change the "
                             "input as the reason says")

    def inline(self, feed: dict[str, np.ndarray]) -> bool:
        if self.placement != "auto":
            return self.placement == "loop"
        return sum(a.size for a in feed.values()) <= self.inline_values

    @property
    def inline_values(self) -> int:
        """The most input values a request may hold to run on the loop in auto placement."""
        return int(self.inline_budget_s / self.run_s_per_element) if self.run_s_per_element > 0 else sys.maxsize

    def where(self) -> str:
        threads = f"in {self.workers} thread{'s' if self.workers > 1 else ''}"
        loop = "on the event loop"
        if self._batcher is not None:
            loop += f" (up to {self._batcher.max_batch} requests ready together in one run)"
        if self.placement != "auto":
            return loop if self.placement == "loop" else threads
        return f"{loop} up to {self.inline_values} input values each, else {threads}"

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """The outputs, the seconds session.run took and how many requests that run answered
        (more than one when requests ready together were batched)."""
        if self.inline(feed):
            if self._batcher is not None:
                return await self._batcher.infer(names, feed)
            return self._timed_run(names, feed)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed_run, names, feed)

    def _timed_run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        started = time.perf_counter()
        return self.run(names, feed), time.perf_counter() - started, 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


@dataclass(frozen=True)
class Answer:
    version: str  # the version that answered
    outputs: dict[str, np.ndarray]
    run_s: float
    extra: dict[str, Any] | None = None  # more fields for the request's log line (shadow, variant, step...)
    batch: int = 1  # requests the run that answered this one served


class SingleRoute:
    """One model answers every request."""

    mode = "single"
    key_header: bytes | None = None  # phased routes: the header whose value assigns a request to a model

    def __init__(self, spec: ModelSpec, placement: str = "auto", max_batch: int = 1) -> None:
        self.spec = spec
        self.placement = placement
        self.max_batch = max_batch
        self.model: ServedModel | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def versions(self) -> list[str]:
        return [self.spec.version]

    @property
    def signature(self) -> Signature:
        return self.spec.signature

    @property
    def ready(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Blocking: runs in a thread while the server already answers liveness."""
        self.model = ServedModel(self.spec, self.placement, self.max_batch)

    async def infer(self, names: list[str] | None, feed: dict[str, np.ndarray], request_id: str = "",
                    key: str | None = None, version: str | None = None) -> Answer:
        """``request_id`` ties what a shadow or phased route logs to the request's primary line;
        ``key`` is the request's sticky-assignment key, when a phased route asked for one; ``version``
        the one the request's path named (the registry checked it is served)."""
        if self.model is None:
            raise RequestError(f"model {self.name} is still loading", "retry once /v2/health/ready answers 200", 503)
        outputs, run_s, batch = await self.model.infer(names, feed)
        return Answer(self.spec.version, outputs, run_s, batch=batch)

    def status(self) -> dict[str, Any]:
        """GET /admin/rollout: a route with no rollout says which mode it is in."""
        return {"mode": self.mode, "model": self.name, "versions": self.versions, "state": None, "step": None,
                "weight": None, "gates": None}

    def steer(self, action: str, reason: str) -> dict[str, Any]:
        """POST /admin/rollout/promote|rollback: only a phased route has a rollout to steer."""
        raise RequestError(f"this server is in {self.mode} mode: there is no rollout to steer",
                           "start it with --phased CANDIDATE", 409)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "platform": PLATFORM,
                "inputs": [sig.metadata() for sig in self.signature.inputs.values()],
                "outputs": [sig.metadata() for sig in self.signature.outputs.values()]}

    def close(self) -> None:
        if self.model is not None:
            self.model.close()


class Registry:
    """Model names to routes. Adding a name twice is an error; asking for an unknown one is a 404."""

    def __init__(self) -> None:
        self._routes: dict[str, SingleRoute] = {}

    def add(self, route: SingleRoute) -> None:
        if route.name in self._routes:
            raise ValueError(f"model {route.name!r} is registered twice")
        self._routes[route.name] = route

    def __iter__(self):
        return iter(self._routes.values())

    @property
    def ready(self) -> bool:
        return bool(self._routes) and all(route.ready for route in self._routes.values())

    def get(self, name: str, version: str | None = None) -> SingleRoute:
        route = self._routes.get(name)
        if route is None:
            raise RequestError(f"no model named {name!r}", f"this server serves {', '.join(self._routes)}", 404)
        if version is not None and version not in route.versions:
            raise RequestError(f"model {name!r} has no version {version!r}",
                               f"it serves {', '.join(route.versions)}", 404)
        return route

    def default(self) -> SingleRoute:
        """The model /predict answers with: the only one, for now."""
        return next(iter(self._routes.values()))
