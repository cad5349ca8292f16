"""Phased rollout: the schedule and gates (``RolloutSpec``), the decisions (``Rollout``) and the
state file that lets a restarted server resume the same step.

The logic is plain data and arithmetic, no clock or I/O of its own (callers pass ``now``), so the
same code decides in the server and is replayed by ``edgepack rollout promote|rollback`` on the
state file when the server is down.

Gates and how they fail. Each gate bounds the share of "bad" events among the step's events:
errors among candidate requests (``max_error_rate``), requests slower than ``max_p99_ms`` (a p99
at or below the limit is exactly "at most 1% of requests above it"), and disagreeing rows among the
rows checked against the primary (``1 - min_agreement``). A step fails as soon as its bad events
exceed the allowed share of ``max(events so far, the step's minimum)``: by then the step could not
pass even if every remaining event of its minimum budget were good, so waiting only serves more
users a bad model. One slow request early in a step is no failure (the budget allows 1%); a
candidate failing every request is rolled back after ``max_error_rate × min_samples`` of them.
A step passes when it has its minimum samples, checked rows and duration, and every gate holds.

What is counted is what the client was sent: a request the candidate owned counts as an error
when it failed or when the status sent for it was a 5xx, whatever produced it. Missing evidence
holds a step, never passes it: while the caller says ``hold`` (the prediction log or the state
file cannot be written), a complete step waits for it to clear; a failing gate still rolls back.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import write_atomic

STATE_NAME = "rollout.json"
LOCK_NAME = "rollout.lock"
STATE_FORMAT = 1
P99_SHARE = 0.01  # the share of requests a p99 limit lets through above it
RUNNING, ROLLED_BACK, COMPLETE = "running", "rolled_back", "complete"
HISTORY_KEPT = 200


@dataclass(frozen=True)
class Gates:
    max_error_rate: float | None = 0.01
    max_p99_ms: float | None = None
    min_agreement: float | None = None

    def check(self) -> None:
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise InputError(f"max_error_rate {self.max_error_rate:g}: expected a share within 0..1", "e.g. 0.01")
        if self.max_p99_ms is not None and self.max_p99_ms <= 0:
            raise InputError(f"max_p99_ms {self.max_p99_ms:g}: expected a positive number of ms", "e.g. 5")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise InputError(f"min_agreement {self.min_agreement:g}: expected a share within 0..1", "e.g. 0.98")


@dataclass(frozen=True)
class RolloutSpec:
    steps: tuple[float, ...] = (10.0, 50.0, 100.0)  # percent of requests the candidate answers
    min_samples: int = 500  # candidate requests per step before it may pass
    step_duration_s: float = 60.0  # and seconds at the step
    gates: Gates = Gates()
    key_header: str = "x-rollout-key"  # sticky assignment by this header, else by the input's hash
    agreement_sample: float = 0.25  # share of candidate requests the primary also runs, to measure agreement
    agreement_tolerance: float = 1e-3  # rows without labels agree when every float output is this close

    def check(self) -> RolloutSpec:
        steps = self.steps
        if not steps or any(not 0 < s <= 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise InputError(f"steps {','.join(f'{s:g}' for s in steps) or '(none)'}: expected increasing "
                             "percentages within 0..100", "e.g. --steps 10,50,100")
        if self.min_samples < 1:
            raise InputError(f"min_samples {self.min_samples}: expected at least 1", "e.g. --min-samples 500")
        if self.step_duration_s < 0:
            raise InputError(f"step_duration {self.step_duration_s:g}: expected seconds >= 0", "e.g. --step-duration 60")
        if not 0 <= self.agreement_sample <= 1:
            raise InputError(f"agreement_sample {self.agreement_sample:g}: expected a share within 0..1", "e.g. 0.25")
        if self.gates.min_agreement is not None and self.agreement_sample == 0:
            raise InputError("min_agreement needs agreement_sample above 0",
                             "the primary must also run some candidate requests to measure agreement")
        if not self.key_header or not self.key_header.isascii() or " " in self.key_header:
            raise InputError(f"key_header {self.key_header!r}: expected an HTTP header name", "e.g. x-user-id")
        self.gates.check()
        return self

    @property
    def min_checked_rows(self) -> int:
        """Rows the primary must have checked in a step before agreement may pass it."""
        if self.gates.min_agreement is None:
            return 0
        return max(1, math.ceil(self.min_samples * self.agreement_sample))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = list(self.steps)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> RolloutSpec:
        """A spec from a file's or the state's mapping; unknown keys are errors naming ``where``."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a mapping of rollout settings", "see edgepack serve --help")
        data = dict(data)
        gates = data.pop("gates", {}) or {}
        known = {f.name for f in fields(cls)} - {"gates"}
        gate_names = {f.name for f in fields(Gates)}
        unknown = [k for k in data if k not in known] + [f"gates.{k}" for k in gates if k not in gate_names]
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]}",
                             f"known: {', '.join(sorted(known))}, gates.{{{', '.join(sorted(gate_names))}}}")
        try:
            if "steps" in data:
                data["steps"] = tuple(float(s) for s in data["steps"])
            for name in ("min_samples",):
                if name in data:
                    data[name] = int(data[name])
            for name in ("step_duration_s", "agreement_sample", "agreement_tolerance"):
                if name in data:
                    data[name] = float(data[name])
            return cls(gates=Gates(**{k: None if v is None else float(v) for k, v in gates.items()}), **data).check()
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: {err}", "steps is a list of percentages, the others numbers") from None


def parse_steps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--steps {text!r}: expected percentages separated by commas", "e.g. --steps 10,50,100") from None


def read_spec(path: Path) -> RolloutSpec:
    """A rollout spec file: JSON, or TOML on Python 3.11+ (a ``[rollout]`` table or top-level keys)."""
    try:
        text = path.read_bytes()
    except OSError as err:
        raise InputError(f"--rollout-spec {path}: cannot read it ({err.strerror})", "check the path") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:
                raise InputError(f"--rollout-spec {path}: TOML needs Python 3.11", "write the spec as JSON") from None
            data = tomllib.loads(text.decode())
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"--rollout-spec {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} "
                         f"({str(err).splitlines()[0]})", "fix the file") from None
    if isinstance(data, dict) and set(data) == {"rollout"}:
        data = data["rollout"]
    return RolloutSpec.from_json(data, str(path))


@dataclass
class StepCounts:
    """What the candidate did at the current step (reset when the step changes)."""

    candidate: int = 0  # requests routed to the candidate
    errors: int = 0  # of those, the candidate failed (the primary answered instead)
    slow: int = 0  # of those, slower than max_p99_ms
    primary: int = 0  # requests routed to the primary
    primary_errors: int = 0  # of those, answered with a 5xx
    checked_rows: int = 0  # rows the primary also ran for agreement
    agreed_rows: int = 0
    checks_dropped: int = 0  # agreement checks skipped because the checker was busy
    started: float = 0.0  # wall time the step began

    def figures(self) -> dict[str, Any]:
        return {"candidate_requests": self.candidate, "primary_requests": self.primary, "errors": self.errors,
                "primary_errors": self.primary_errors,
                "error_rate": self.errors / self.candidate if self.candidate else None,
                "slow": self.slow, "slow_share": self.slow / self.candidate if self.candidate else None,
                "checked_rows": self.checked_rows, "agreed_rows": self.agreed_rows,
                "agreement": self.agreed_rows / self.checked_rows if self.checked_rows else None,
                "checks_dropped": self.checks_dropped}


@dataclass
class Rollout:
    """The state of one phased rollout of ``candidate`` over ``primary``."""

    spec: RolloutSpec
    model: str
    primary: str  # version
    candidate: str  # version
    salt: str  # seeds the sticky assignment: stable across restarts, new for each rollout
    state: str = RUNNING
    step: int = 0  # index into spec.steps
    counts: StepCounts = field(default_factory=StepCounts)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, spec: RolloutSpec, model: str, primary: str, candidate: str, now: float) -> Rollout:
        rollout = cls(spec, model, primary, candidate, secrets.token_hex(8), counts=StepCounts(started=now))
        rollout._note(now, "start", "rollout started", steps=list(spec.steps))
        return rollout

    @property
    def weight(self) -> float:
        """Percent of requests the candidate answers now."""
        if self.state == ROLLED_BACK:
            return 0.0
        return self.spec.steps[self.step]

    # -- what happened -------------------------------------------------------------------------

    def record_candidate(self, ok: bool, latency_ms: float, now: float, hold: str | None = None) -> dict[str, Any] | None:
        """One request routed to the candidate (``ok``: it answered and a non-5xx status was sent);
        the decision it caused, if any."""
        counts = self.counts
        counts.candidate += 1
        if not ok:
            counts.errors += 1
        elif self.spec.gates.max_p99_ms is not None and latency_ms > self.spec.gates.max_p99_ms:
            counts.slow += 1
        return self.evaluate(now, hold)

    def record_primary(self, failed: bool = False) -> None:
        self.counts.primary += 1
        if failed:
            self.counts.primary_errors += 1

    def record_check(self, rows: int, agreed: int, now: float, hold: str | None = None) -> dict[str, Any] | None:
        self.counts.checked_rows += rows
        self.counts.agreed_rows += agreed
        return self.evaluate(now, hold)

    # -- decisions -----------------------------------------------------------------------------

    def failing_gate(self) -> str | None:
        """The first gate whose bad events already exceed what the step may have; None if none does."""
        spec, gates, counts = self.spec, self.spec.gates, self.counts
        budget = max(counts.candidate, spec.min_samples)
        if gates.max_error_rate is not None and _exceeds(counts.errors, gates.max_error_rate, budget):
            return (f"error rate: {counts.errors} of {counts.candidate} candidate requests failed, more than "
                    f"{gates.max_error_rate:.2%} of {budget}")
        if gates.max_p99_ms is not None and _exceeds(counts.slow, P99_SHARE, budget):
            return (f"p99: {counts.slow} of {counts.candidate} candidate requests took over {gates.max_p99_ms:g} ms, "
                    f"more than 1% of {budget}")
        if gates.min_agreement is not None:
            rows = max(counts.checked_rows, spec.min_checked_rows)
            disagreed = counts.checked_rows - counts.agreed_rows
            if _exceeds(disagreed, 1 - gates.min_agreement, rows):
                return (f"agreement: {disagreed} of {counts.checked_rows} checked rows disagreed with the primary, "
                        f"more than {1 - gates.min_agreement:.2%} of {rows}")
        return None

    def step_complete(self, now: float) -> bool:
        counts, spec = self.counts, self.spec
        return (counts.candidate >= spec.min_samples and counts.checked_rows >= spec.min_checked_rows
                and now - counts.started >= spec.step_duration_s)

    def evaluate(self, now: float, hold: str | None = None) -> dict[str, Any] | None:
        """Roll back when a gate fails, promote when the step is complete and nothing ``hold``s it
        (why evidence is missing, e.g. the log cannot be written); the decision, or None."""
        if self.state != RUNNING:
            return None
        failing = self.failing_gate()
        if failing is not None:
            return self.rollback(now, f"gate failed: {failing}", event="rollback")
        if hold is None and self.step_complete(now):
            return self.promote(now, "gates passed", event="promote")
        return None

    def steer(self, action: str, now: float, reason: str) -> dict[str, Any]:
        """An operator's ``promote`` or ``rollback``; InputError when there is nothing to do."""
        if action == "promote":
            if self.state == COMPLETE:
                raise InputError("the rollout is already complete: the candidate has its final weight",
                                 "nothing to promote")
            return self.promote(now, reason or "operator")
        if action != "rollback":
            raise ValueError(f"unknown rollout action {action!r}")
        if self.state == ROLLED_BACK:
            raise InputError("the rollout is already rolled back: the primary answers every request",
                             "promote to resume it")
        return self.rollback(now, reason or "operator")

    def promote(self, now: float, reason: str, event: str = "operator_promote") -> dict[str, Any]:
        """The next step; from a rollback, the step that failed, afresh; at the last step, complete."""
        figures = self.counts.figures()
        if self.state == ROLLED_BACK:
            self.state = RUNNING
        elif self.step + 1 < len(self.spec.steps):
            self.step += 1
        else:
            self.state = COMPLETE
        self.counts = StepCounts(started=now)
        return self._note(now, event, reason, figures=figures)

    def rollback(self, now: float, reason: str, event: str = "operator_rollback") -> dict[str, Any]:
        figures = self.counts.figures()
        self.state = ROLLED_BACK
        return self._note(now, event, reason, figures=figures)

    def _note(self, now: float, event: str, reason: str, **extra: Any) -> dict[str, Any]:
        entry = {"time": round(now, 3), "event": event, "state": self.state, "step": self.step + 1,
                 "weight": self.weight, "reason": reason, **extra}
        self.history.append(entry)
        del self.history[:-HISTORY_KEPT]
        return entry

    # -- reading and writing -------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """What ``rollout status --json`` prints: mode, state, step, weight, gates and their figures."""
        return {"mode": "phased", "model": self.model, "primary": self.primary, "candidate": self.candidate,
                "state": self.state, "step": self.step + 1, "steps": list(self.spec.steps), "weight": self.weight,
                "step_elapsed_s": round(max(0.0, now - self.counts.started), 3),
                "min_samples": self.spec.min_samples, "min_checked_rows": self.spec.min_checked_rows,
                "step_duration_s": self.spec.step_duration_s, "gates": asdict(self.spec.gates),
                "figures": self.counts.figures(), "failing": self.failing_gate(),
                "spec": self.spec.to_json(), "history": self.history[-20:]}

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "model": self.model, "primary": self.primary, "candidate": self.candidate,
                "salt": self.salt, "state": self.state, "step": self.step, "spec": self.spec.to_json(),
                "counts": asdict(self.counts), "history": self.history}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Rollout:
        try:
            if data.get("format") != STATE_FORMAT:
                raise InputError(f"{where}: state format {data.get('format')!r}, this edgepack reads {STATE_FORMAT}",
                                 "use the edgepack that wrote it, or start afresh with another --state-dir")
            spec = RolloutSpec.from_json(data["spec"], where)
            rollout = cls(spec, data["model"], data["primary"], data["candidate"], data["salt"], data["state"],
                          int(data["step"]), StepCounts(**data["counts"]), list(data["history"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: not a rollout state file ({type(err).__name__}: {err})",
                             "move it away to start afresh") from None
        if rollout.state not in (RUNNING, ROLLED_BACK, COMPLETE) or not 0 <= rollout.step < len(spec.steps):
            raise InputError(f"{where}: state {rollout.state!r} at step {rollout.step + 1} is not valid",
                             "move it away to start afresh")
        return rollout

    def resumed(self, now: float) -> None:
        self._note(now, "resume", "server restarted")

    def adopt(self, spec: RolloutSpec, now: float) -> None:
        """A restart with other settings: the new spec applies from now; the step is kept (clamped)."""
        if spec == self.spec:
            return
        self.spec = spec
        self.step = min(self.step, len(spec.steps) - 1)
        self._note(now, "spec_changed", "restarted with another rollout spec", spec=spec.to_json())


def _exceeds(bad: int, share: float, budget: int) -> bool:
    """More bad events than ``share`` of ``budget`` allows (rounded: 10% of 100 is 10, not 9.999…)."""
    return bad > round(share * budget, 9)


def state_path(folder: Path) -> Path:
    return folder / STATE_NAME


def load(folder: Path) -> Rollout | None:
    path = state_path(folder)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror})", "check the folder's permissions") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError(f"{path}: not JSON", "move it away to start afresh") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a rollout state file", "move it away to start afresh")
    return Rollout.from_json(data, str(path))


def state_bytes(data: dict[str, Any]) -> bytes:
    """The state file's content for a state's ``to_json()``."""
    return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"


def save(folder: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a restart after kill -9) sees the old state or the new one, whole."""
    write_atomic(state_path(folder), state_bytes(data))


class StateLock:
    """An exclusive lock on the state folder, held by the server while it runs: a second server on
    the same folder is refused, and ``edgepack rollout`` knows whether to talk to a server or to
    the file. The kernel drops it when its holder dies, kill -9 included."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd = -1

    def acquire(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise InputError(f"--state-dir {self.folder}: cannot use it ({err.strerror})",
                             "choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def spec_from(spec_file: Path | None, steps: str | None = None, min_samples: int | None = None,
              step_duration_s: float | None = None, max_error_rate: float | None = None,
              max_p99_ms: float | None = None, min_agreement: float | None = None,
              agreement_sample: float | None = None, key_header: str | None = None) -> RolloutSpec:
    """The spec file's settings (or the defaults) with the flags a user typed laid over them (None: not typed)."""
    spec = read_spec(spec_file) if spec_file is not None else RolloutSpec()
    gates = {k: v for k, v in (("max_error_rate", max_error_rate), ("max_p99_ms", max_p99_ms),
                               ("min_agreement", min_agreement)) if v is not None}
    values = {k: v for k, v in (("steps", parse_steps(steps) if steps is not None else None),
                                ("min_samples", min_samples), ("step_duration_s", step_duration_s),
                                ("agreement_sample", agreement_sample), ("key_header", key_header)) if v is not None}
    return replace(spec, gates=replace(spec.gates, **gates), **values).check()
