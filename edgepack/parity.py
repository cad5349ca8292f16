"""Parity: the converted fp32 ONNX model against the original, output by output.

Unlike the variant gates (``edgepack.gates``), parity asks for the same answers up to float32
arithmetic: labels equal, every other value within ``atol + rtol * |reference|``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from edgepack.runtime.comparison import labels_equal


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3
    # Share of samples allowed to differ (tree thresholds rounded to float32 flip a few samples).
    max_flip_rate: float = 0.0


PARITY = Tolerance()


@dataclass(frozen=True)
class OutputDiff:
    name: str
    kind: str
    max_abs: float
    max_rel: float
    beyond_tolerance: int  # elements (values) or samples (labels) that failed
    agreement: float | None  # labels only
    passed: bool
    flipped_samples: int = 0  # samples with any difference past tolerance
    mismatch: str | None = None  # the outputs could not be compared (shapes differ)

    def describe(self) -> str:
        if self.mismatch is not None:
            return f"{self.name}: {self.mismatch}"
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


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str],
            kinds: Sequence[str], tolerance: Tolerance, samples: int | None = None) -> ParityReport:
    """``reference[i]`` and ``candidate[i]``: output i over every sample, samples along axis 0."""
    diffs = []
    for ref, got, name, kind in zip(reference, candidate, names, kinds):
        if kind == "label":
            diffs.append(_compare_labels(np.asarray(ref), np.asarray(got), name, tolerance))
        else:
            diffs.append(_compare_values(np.asarray(ref), np.asarray(got), name, kind, tolerance))
    count = samples if samples is not None else (len(reference[0]) if reference and np.ndim(reference[0]) else 0)
    return ParityReport(samples=count, tolerance=tolerance, outputs=tuple(diffs))


def _compare_labels(ref: np.ndarray, got: np.ndarray, name: str, tol: Tolerance) -> OutputDiff:
    ref, got = ref.reshape(-1), got.reshape(-1)
    if ref.shape != got.shape:
        return OutputDiff(name, "label", 0.0, 0.0, max(ref.size, got.size), 0.0, False,
                          mismatch=f"{got.size} labels where the original gives {ref.size}")
    same = labels_equal(ref, got)
    agreement = float(same.mean()) if same.size else 1.0
    flips = int((~same).sum())
    ok = flips == 0 or flips <= tol.max_flip_rate * same.size
    return OutputDiff(name, "label", 0.0, 0.0, flips, agreement, ok, flips)


def _compare_values(ref: np.ndarray, got: np.ndarray, name: str, kind: str, tol: Tolerance) -> OutputDiff:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    if ref.shape != got.shape:
        # A binary decision_function is (n,), skl2onnx writes (n, 2) scores of which column 1 matches.
        if ref.ndim == 1 and got.ndim == 2 and got.shape[1] == 2 and len(got) == len(ref):
            got = got[:, 1]
        elif ref.size == got.size:
            got = got.reshape(ref.shape)
        else:
            return OutputDiff(name, kind, float("inf"), float("inf"), int(ref.size), None, False,
                              mismatch=f"shape {list(got.shape)} where the original gives {list(ref.shape)}")
    err = np.abs(ref - got)
    err = np.where(np.isnan(ref) & np.isnan(got), 0.0, np.where(np.isfinite(err), err, np.inf))
    outside = err > tol.atol + tol.rtol * np.abs(np.nan_to_num(ref))
    beyond = int(outside.sum())
    flipped = int(outside.reshape(len(outside), -1).any(axis=1).sum()) if outside.ndim else int(beyond > 0)
    significant = np.abs(ref) > tol.atol
    max_rel = float((err[significant] / np.abs(ref[significant])).max()) if significant.any() else 0.0
    ok = beyond == 0 or flipped <= tol.max_flip_rate * max(len(ref) if ref.ndim else 1, 1)
    return OutputDiff(name, kind, float(err.max()) if err.size else 0.0, max_rel, beyond, None, ok, flipped)
