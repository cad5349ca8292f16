"""Parity and accuracy checks: how closely one model's outputs follow another's, per output."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np

from edgepack.convert.base import OutputKind

ValuesRule = Literal["allclose", "relative_rmse"]


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_label_agreement: float = 1.0
    values_rule: ValuesRule = "allclose"
    max_relative_rmse: float = 0.05  # RMSE over the spread of the reference, for "relative_rmse"
    gate_values_with_labels: bool = True  # a classifier's scores are gated too, not only its labels
    # Share of samples allowed to differ (tree thresholds rounded to float32 flip a few samples).
    max_flip_rate: float = 0.0


# fp32 ONNX against the original: float32 against float64 arithmetic.
PARITY = Tolerance()
# A quantized variant against fp32: labels must agree; scores of a classifier are reported, not gated.
VARIANT = Tolerance(min_label_agreement=0.99, values_rule="relative_rmse", gate_values_with_labels=False)


@dataclass(frozen=True)
class OutputDiff:
    name: str
    kind: OutputKind
    max_abs: float
    max_rel: float
    relative_rmse: float
    beyond_tolerance: int  # elements (values) or samples (labels) that failed
    agreement: float | None  # labels only
    gated: bool
    passed: bool
    flipped_samples: int = 0  # samples with any difference past tolerance

    def describe(self) -> str:
        if self.kind == "label":
            return f"{self.name}: label agreement {self.agreement:.2%} ({self.beyond_tolerance} differ)"
        text = (f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"{self.beyond_tolerance} element(s) beyond tolerance")
        return text + (f" in {self.flipped_samples} sample(s)" if self.flipped_samples else "")


@dataclass(frozen=True)
class ParityReport:
    samples: int
    tolerance: Tolerance
    outputs: tuple[OutputDiff, ...]

    @property
    def passed(self) -> bool:
        return all(diff.passed for diff in self.outputs)

    def failures(self) -> list[str]:
        return [diff.describe() for diff in self.outputs if not diff.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "tolerance": asdict(self.tolerance),
                "outputs": [asdict(diff) for diff in self.outputs]}


def compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str],
    kinds: Sequence[OutputKind], tolerance: Tolerance,
) -> ParityReport:
    has_labels = "label" in kinds
    diffs = []
    for ref, got, name, kind in zip(reference, candidate, names, kinds):
        if kind == "label":
            diffs.append(_compare_labels(np.asarray(ref), np.asarray(got), name, tolerance))
        else:
            gated = tolerance.gate_values_with_labels or not has_labels
            diffs.append(_compare_values(np.asarray(ref), np.asarray(got), name, tolerance, gated))
    return ParityReport(samples=len(reference[0]) if reference else 0, tolerance=tolerance, outputs=tuple(diffs))


def _compare_labels(ref: np.ndarray, got: np.ndarray, name: str, tol: Tolerance) -> OutputDiff:
    ref, got = ref.reshape(-1), got.reshape(-1)
    if ref.dtype.kind in "fc" or got.dtype.kind in "fc":
        same = np.isclose(ref.astype(np.float64), got.astype(np.float64))
    else:
        same = ref.astype(str) == got.astype(str)
    agreement = float(same.mean()) if same.size else 1.0
    flips = int((~same).sum())
    ok = agreement >= tol.min_label_agreement or flips <= tol.max_flip_rate * same.size
    return OutputDiff(name, "label", 0.0, 0.0, 0.0, flips, agreement, True, ok, flips)


def _compare_values(ref: np.ndarray, got: np.ndarray, name: str, tol: Tolerance, gated: bool) -> OutputDiff:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    if ref.shape != got.shape:
        # A binary decision_function is (n,), skl2onnx writes (n, 2) scores of which column 1 matches.
        if ref.ndim == 1 and got.ndim == 2 and got.shape[1] == 2:
            got = got[:, 1]
        elif ref.size == got.size:
            got = got.reshape(ref.shape)
        else:
            return OutputDiff(name, "values", float("inf"), float("inf"), float("inf"), int(ref.size),
                              None, gated, False)
    err = np.abs(ref - got)
    outside = err > tol.atol + tol.rtol * np.abs(ref)
    beyond = int(outside.sum())
    flipped = int(outside.reshape(len(outside), -1).any(axis=1).sum()) if outside.ndim else int(beyond > 0)
    significant = np.abs(ref) > tol.atol
    max_rel = float((err[significant] / np.abs(ref[significant])).max()) if significant.any() else 0.0
    spread = float(ref.std()) or 1.0
    relative_rmse = float(np.sqrt(np.mean(err**2)) / spread) if err.size else 0.0
    if tol.values_rule == "allclose":
        ok = beyond == 0 or flipped <= tol.max_flip_rate * max(len(ref), 1)
    else:
        ok = relative_rmse <= tol.max_relative_rmse
        beyond = 0 if ok else beyond
    return OutputDiff(name, "values", float(err.max()) if err.size else 0.0, max_rel, relative_rmse,
                      beyond, None, gated, ok or not gated, flipped)


@dataclass(frozen=True)
class Metric:
    """A variant's task metric next to fp32's, and whether the difference passes the gate."""

    name: str  # accuracy | rmse | agreement
    value: float
    reference: float  # fp32's value on the same data
    change: str  # e.g. "-0.22 pt", "+0.4 %"
    basis: str  # what it was measured against
    passed: bool

    def describe(self) -> str:
        if self.name == "agreement":
            return f"agreement {self.value:.2%}"
        return f"{self.name} {self.value:.4g} ({self.change})"


def task_metric(outputs: Sequence[np.ndarray], kinds: Sequence[OutputKind], labels: np.ndarray) -> tuple[str, float]:
    """Accuracy for classifiers (a label output, or class scores with integer labels, as a network's
    logits), RMSE for regressors (the first values output)."""
    first = np.asarray(outputs[0])
    if "label" not in kinds and first.ndim == 2 and first.shape[1] > 1 and labels.dtype.kind in "iub":
        return "accuracy", float((first.argmax(axis=1) == labels).mean())
    if "label" in kinds:
        predicted = np.asarray(outputs[list(kinds).index("label")]).reshape(-1)
        if predicted.dtype.kind in "fc" or labels.dtype.kind in "fc":
            same = np.isclose(predicted.astype(np.float64), labels.astype(np.float64))
        else:
            same = predicted.astype(str) == labels.astype(str)
        return "accuracy", float(same.mean())
    predicted = np.asarray(outputs[0], dtype=np.float64).reshape(len(labels), -1)[:, 0]
    return "rmse", float(np.sqrt(np.mean((predicted - labels.astype(np.float64)) ** 2)))


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity of matching rows: how embeddings are compared."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    got = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    return float(np.mean(np.sum(ref * got, axis=1) / np.where(norms == 0, 1.0, norms)))


def is_embedding(outputs: Sequence[np.ndarray], kinds: Sequence[OutputKind]) -> bool:
    """One vector per row and no labels: compare directions (cosine), not element errors."""
    return "label" not in kinds and len(outputs) == 1 and np.asarray(outputs[0]).ndim == 2 \
        and np.asarray(outputs[0]).shape[1] > 1


def metric_gate(name: str, value: float, reference: float, max_drop: float, basis: str) -> Metric:
    """``max_drop`` is in points of accuracy or cosine (x100), or percent of RMSE increase."""
    if name == "cosine":
        drop = (reference - value) * 100
        return Metric(name, value, reference, f"{-drop:+.2f} pt", basis, drop <= max_drop + 1e-9)
    if name == "accuracy":
        drop = (reference - value) * 100
        return Metric(name, value, reference, f"{-drop:+.2f} pt", basis, drop <= max_drop + 1e-9)
    increase = (value - reference) / reference * 100 if reference else (0.0 if value == 0 else float("inf"))
    return Metric(name, value, reference, f"{increase:+.2f} %", basis, increase <= max_drop + 1e-9)
