"""The accuracy gate of a variant: every output judged against fp32 by the rule its kind calls for.

| kind | rule | passes when |
|---|---|---|
| label | labels equal | share agreeing ≥ ``min_agreement`` |
| probabilities, logits | argmax over the last axis (one score: its side of 0.5 or 0) | share agreeing ≥ ``min_agreement`` |
| sequence | argmax per position | share of positions agreeing ≥ ``min_agreement`` |
| mask | per pixel: argmax over channels, or the side of 0.5 (0 for logits) | share agreeing ≥ ``min_agreement`` |
| embedding | cosine of each vector | mean ≥ ``min_agreement`` |
| scores, boxes, regression, state, unknown | RMSE per channel over that channel's spread | worst channel ≤ ``max_channel_error`` |

With labelled validation data, the outputs the task metric reads (the label, or the class scores,
or the regression output) are judged by the metric instead (``--max-accuracy-drop``); a
``--metric`` function judges the model as a whole. Every other output keeps its own rule.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgepack.errors import InputError
from edgepack.output_kinds import OutputKind
from edgepack.runtime.comparison import Agreement, ChannelError, Cosine, channel_axis

_AGREEMENT_KINDS = {"label": "labels", "probabilities": "argmax", "logits": "argmax", "sequence": "argmax",
                    "mask": "argmax"}
_CLASS_KINDS = ("label", "probabilities", "logits", "unknown")


@dataclass(frozen=True)
class GateSettings:
    min_agreement: float = 0.99  # labels, argmax positions, mask pixels; mean cosine of embeddings
    # Worst channel's RMSE over its own spread (benchmarks/real_models.py). Accurate variants stay
    # well below: digits CNN logits 0.01-0.02 with accuracy unchanged, the tiny detector's
    # int8-dynamic 0.04 with recall unchanged, fp16 of a YOLOv8 graph 0.016. Its int8-static scored
    # 0.13 on a class-score channel and lost 3.8 points of recall; collapsed score channels sit near 1.
    max_channel_error: float = 0.1
    max_accuracy_drop: float = 1.0  # points of accuracy (or of a --metric), or percent of RMSE


@dataclass(frozen=True)
class OutputCheck:
    output: str
    kind: str
    rule: str  # labels | argmax | threshold | cosine | channel-error
    value: float
    threshold: float
    passed: bool
    basis: str  # what was measured, over what
    gated: bool = True  # False: reported only (the task metric judges this output)

    def describe(self) -> str:
        sign = "≥" if self.rule != "channel-error" else "≤"
        verdict = "" if not self.gated else (" ok" if self.passed else " FAILS")
        return f"{self.output} ({self.kind}): {self.basis} ({sign} {self.threshold:g}{verdict}"  \
               f"{'' if self.gated else ', not gated: the task metric judges it'})"

    def short(self) -> str:
        """The figure alone, for the variants table."""
        if self.rule == "channel-error":
            return f"{self.output}: ch.err {_figure(self.value)}"
        if self.rule == "cosine":
            return f"{self.output}: cos {self.value:.4f}"
        return f"{self.output}: {self.value:.2%} agree"


def _figure(value: float) -> str:
    return "inf" if not np.isfinite(value) else f"{value:.3f}"


@dataclass(frozen=True)
class Metric:
    """A variant's task metric next to fp32's, and whether the difference passes the gate."""

    name: str  # accuracy | rmse | the --metric function's name
    value: float
    reference: float  # fp32's value on the same data
    change: str  # e.g. "-0.22 pt", "+0.4 %"
    basis: str  # what it was measured against
    passed: bool
    loss: float = 0.0  # how much worse than fp32: points (x100) of a score, or percent of an error

    def describe(self) -> str:
        return f"{self.name} {self.value:.4g} ({self.change})"


@dataclass(frozen=True)
class GateReport:
    checks: tuple[OutputCheck, ...]
    metric: Metric | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.gated) and (self.metric is None or self.metric.passed)

    def failed(self) -> list[str]:
        """The names of what fails: outputs, and the task metric."""
        names = [c.output for c in self.checks if c.gated and not c.passed]
        return names + ([self.metric.name] if self.metric is not None and not self.metric.passed else [])

    def failures(self) -> list[str]:
        found = [c.describe() for c in self.checks if c.gated and not c.passed]
        if self.metric is not None and not self.metric.passed:
            found.append(f"{self.metric.name} {self.metric.value:.4g} against fp32's {self.metric.reference:.4g} "
                         f"({self.metric.change})")
        return found

    def summary(self) -> str:
        parts = [self.metric.describe()] if self.metric else []
        return "; ".join(parts + [c.short() for c in self.checks if c.gated])

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "outputs": [asdict(c) for c in self.checks],
                "metric": None if self.metric is None else asdict(self.metric)}


class OutputGates:
    """Accumulates the comparison of each output over every evaluation run, then judges each one."""

    def __init__(self, names: Sequence[str], kinds: Sequence[OutputKind], dims: Sequence[Any],
                 settings: GateSettings, judged_by_metric: frozenset[str] = frozenset()) -> None:
        self.names, self.kinds, self.dims = list(names), list(kinds), list(dims)
        self.settings = settings
        self.judged_by_metric = judged_by_metric
        self._judges: list[Any] = [None] * len(self.names)

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> None:
        for index, (ref, got) in enumerate(zip(reference, candidate)):
            ref, got = np.asarray(ref), np.asarray(got)
            kind = self.kinds[index]
            if kind == "mask":
                axis = channel_axis(self.dims[index], ref.shape)
                if axis is not None:  # several classes per pixel: argmax over the channel axis
                    ref, got = np.moveaxis(ref, axis, -1), np.moveaxis(got, axis, -1)
            if self._judges[index] is None:
                self._judges[index] = self._judge_for(kind, ref, self.dims[index])
            self._judges[index].add(ref, got)

    def _judge_for(self, kind: OutputKind, first: np.ndarray, dims: Any) -> Any:
        if kind in _AGREEMENT_KINDS:
            rule = _AGREEMENT_KINDS[kind]
            one_score = first.ndim == 0 or first.shape[-1] == 1 or (kind == "mask" and channel_axis(dims, first.shape) is None)
            if rule == "argmax" and one_score:
                rule = "threshold"
            threshold = 0.5 if first.dtype.kind != "f" or first.size == 0 or first.min() >= 0 else 0.0
            return Agreement(rule, threshold)  # type: ignore[arg-type]
        if kind == "embedding":
            return Cosine()
        return ChannelError(channel_axis(dims, first.shape))

    def checks(self) -> tuple[OutputCheck, ...]:
        found = []
        for name, kind, judge in zip(self.names, self.kinds, self._judges):
            gated = name not in self.judged_by_metric
            if judge is None:
                continue
            if isinstance(judge, Agreement):
                unit = {"labels": "labels", "argmax": "positions", "threshold": "values"}[judge.rule]
                what = {"labels": "label agreement", "argmax": "argmax agreement",
                        "threshold": f"agreement on which side of {judge.threshold:g}"}[judge.rule]
                basis = (f"{what} {judge.share:.2%} of {judge.total:,} {unit}" if judge.mismatch is None
                         else f"{what}: {judge.mismatch}")
                found.append(OutputCheck(name, kind, judge.rule, judge.share, self.settings.min_agreement,
                                         judge.share >= self.settings.min_agreement, basis, gated))
            elif isinstance(judge, Cosine):
                basis = (f"mean cosine {judge.mean:.4f} over {judge.count:,} vectors (least {judge.least:.4f})"
                         if judge.mismatch is None else f"cosine: {judge.mismatch}")
                found.append(OutputCheck(name, kind, "cosine", judge.mean, self.settings.min_agreement,
                                         judge.mean >= self.settings.min_agreement, basis, gated))
            else:
                channel, worst = judge.worst()
                if judge.mismatch is not None:
                    basis = f"relative RMSE per channel: {judge.mismatch}"
                elif judge.nonfinite:
                    basis = f"{judge.nonfinite:,} non-finite value(s) where fp32 has none"
                elif judge.axis is None:
                    basis = f"relative RMSE {_figure(worst)} (one channel)"
                else:
                    basis = (f"worst-channel relative RMSE {_figure(worst)} (channel {channel} of {judge.channels}, "
                             f"axis {judge.axis})")
                found.append(OutputCheck(name, kind, "channel-error", worst, self.settings.max_channel_error,
                                         bool(worst <= self.settings.max_channel_error), basis, gated))
        return tuple(found)


# -- task metrics --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskMetric:
    """A score of a model's outputs on labelled data: which outputs it reads and how it is judged."""

    name: str
    reads: frozenset[str]  # outputs whose own gate it replaces
    score: Callable[[dict[str, np.ndarray]], float]
    higher_is_better: bool = True
    points: bool = True  # judged in points (x100) of difference, else in percent of change


def label_metric(names: Sequence[str], kinds: Sequence[OutputKind], labels: np.ndarray,
                 first: Sequence[np.ndarray]) -> TaskMetric | None:
    """Accuracy for classifiers (a label output, or class scores with integer labels), RMSE for
    regressors (the regression output, else a first float output with one value per example)."""
    kinds = list(kinds)
    # Class labels judge every class output (the label and its scores say the same thing).
    classes = frozenset(name for name, kind in zip(names, kinds) if kind in ("label", "probabilities", "logits"))
    if "label" in kinds:
        name = names[kinds.index("label")]

        def accuracy_of_labels(outputs: dict[str, np.ndarray]) -> float:
            predicted = np.asarray(outputs[name]).reshape(-1)
            if predicted.dtype.kind in "fc" or labels.dtype.kind in "fc":
                return float(np.isclose(predicted.astype(np.float64), labels.astype(np.float64)).mean())
            return float((predicted.astype(str) == labels.astype(str)).mean())

        return TaskMetric("accuracy", classes, accuracy_of_labels)
    if labels.dtype.kind in "iub":
        for index, kind in enumerate(kinds):
            values = np.asarray(first[index])
            if kind in _CLASS_KINDS and values.dtype.kind == "f" and values.ndim >= 2 and values.shape[-1] > 1:
                name = names[index]

                def accuracy_of_scores(outputs: dict[str, np.ndarray], name: str = name) -> float:
                    scores = np.asarray(outputs[name])
                    predicted = scores.reshape(-1, scores.shape[-1]).argmax(axis=1)
                    if len(predicted) != len(labels):
                        raise InputError(f"{len(labels)} labels, and output {name!r} scores {len(predicted)} "
                                         "examples", "give one label per example")
                    return float((predicted == labels).mean())

                return TaskMetric("accuracy", classes | {name}, accuracy_of_scores)
    index = next((i for i, k in enumerate(kinds) if k == "regression"),
                 next((i for i, v in enumerate(first) if np.asarray(v).dtype.kind == "f"), None))
    if index is None:
        return None
    name = names[index]

    def rmse(outputs: dict[str, np.ndarray]) -> float:
        predicted = np.asarray(outputs[name], dtype=np.float64).reshape(len(labels), -1)[:, 0]
        return float(np.sqrt(np.mean((predicted - labels.astype(np.float64)) ** 2)))

    return TaskMetric("rmse", frozenset([name]), rmse, higher_is_better=False, points=False)


def user_metric(text: str, names: Sequence[str], targets: dict[str, np.ndarray]) -> TaskMetric:
    """``--metric module.py:function`` or ``package.module:function``: called as
    ``function(outputs, targets) -> float`` with every output (joined over the evaluation data) and
    every non-input array of the validation file; higher is better unless the function has
    ``lower_is_better = True``."""
    module_text, sep, function_name = text.rpartition(":")
    if not sep or not module_text or not function_name.isidentifier():
        raise InputError(f"--metric {text!r} is not MODULE:FUNCTION", "e.g. --metric my_metrics.py:mean_ap")
    module = _import(module_text)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"--metric: {module_text} has no function {function_name}",
                         f"define def {function_name}(outputs, targets) -> float in it")

    def score(outputs: dict[str, np.ndarray]) -> float:
        try:
            value = function(dict(outputs), dict(targets))
        except Exception as err:  # the user's function can fail in any way
            raise InputError(f"--metric {text} raised {type(err).__name__}: {err}",
                             "fix the metric function; run with --debug for the traceback") from err
        if not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(float(value)):
            raise InputError(f"--metric {text} returned {value!r}, not a finite number", "return a float")
        return float(value)

    return TaskMetric(function_name, frozenset(names), score,
                      higher_is_better=not getattr(function, "lower_is_better", False))


def _import(text: str) -> Any:
    if text.endswith(".py"):
        path = Path(text)
        if not path.is_file():
            raise InputError(f"--metric: {path}: no such file", "give the path of the module with the function")
        spec = importlib.util.spec_from_file_location(f"edgepack_metric_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise InputError(f"--metric: {path} cannot be imported", "give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's module can fail in any way
            raise InputError(f"--metric: importing {path.name} failed: {type(err).__name__}: {err}",
                             "fix the module") from err
        return module
    try:
        return importlib.import_module(text)
    except ImportError as err:
        raise InputError(f"--metric: cannot import {text} ({err})", "give MODULE.py:FUNCTION or an importable module") from None


def judge_metric(metric: TaskMetric, value: float, reference: float, max_drop: float, basis: str) -> Metric:
    """``max_drop``: points (x100) a score may lose, or percent an error may grow."""
    loss = (reference - value) if metric.higher_is_better else (value - reference)
    if metric.points:
        return Metric(metric.name, value, reference, f"{(value - reference) * 100:+.2f} pt", basis,
                      loss * 100 <= max_drop + 1e-9, loss * 100)
    if reference:
        change = (value - reference) / abs(reference) * 100
        worse = loss / abs(reference) * 100
    else:
        change = worse = 0.0 if value == reference else float("inf")
    return Metric(metric.name, value, reference, f"{change:+.2f} %", basis, worse <= max_drop + 1e-9, worse)


def join_runs(runs: list[np.ndarray], stacked: bool) -> np.ndarray:
    """One output's values over every run: stacked on a new axis (one run per feed), or rows
    concatenated along axis 0 (a scalar output of a rows model is stacked)."""
    arrays = [np.asarray(run) for run in runs]
    if stacked or any(a.ndim == 0 for a in arrays) or len({a.shape[1:] for a in arrays}) > 1:
        if len({a.shape for a in arrays}) > 1:
            return np.concatenate([a.reshape(-1) for a in arrays])
        return np.stack(arrays)
    return np.concatenate(arrays)
