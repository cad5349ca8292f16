"""How closely one model's outputs follow another's: the comparisons every judge uses.

Parity, the variant gates of a build, and (in time) the shadow and phased routes of a server judge
two models the same way with these. Each comparison is an accumulator: ``add`` a pair of outputs
(the reference's and the candidate's, one run at a time, so a long evaluation never holds every
output at once), then read its figures. numpy only: this ships inside bundles.

- ``Agreement``: labels equal (``labels``), the same class per position (``argmax`` over the last
  axis), or the same side of a threshold (``threshold``, for masks and one-score outputs).
- ``ChannelError``: root-mean-square error of each channel relative to that channel's own spread in
  the reference; the worst channel is the figure. One RMSE over a whole tensor lets channels of large
  spread (box pixels, std ~85) drown those of small spread (class scores, std ~0.005); per channel,
  a score channel that collapses shows as an error of ~1 however good the rest is.
- ``Cosine``: direction of each vector along the last axis (embeddings are compared by direction).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Rule = Literal["labels", "argmax", "threshold"]
# A channel whose reference values spread less than this (relative to their size) is constant: it is
# judged by absolute error instead, as a ratio to a spread of zero means nothing.
_CONSTANT = 1e-7
_CONSTANT_ATOL = 1e-4


def channel_axis(dims: list[Any] | tuple[Any, ...] | None, shape: tuple[int, ...]) -> int | None:
    """The axis that holds an output's channels: of its fixed dimensions larger than 1 (never the
    first, which holds rows), the smallest; None when there is none (the tensor is one channel).

    ``[batch, 84, anchors]`` → 1 (4 box coordinates and 80 class scores), ``[1, 25200, 85]`` → 2,
    ``[N, 3, H, W]`` → 1, ``[N, 10]`` → 1, ``[N]`` or ``[N, 1, H, W]`` → None.
    """
    declared = list(dims) if dims is not None and len(dims) == len(shape) else [None] + list(shape[1:])
    fixed = [(size, axis) for axis, size in enumerate(declared)
             if axis > 0 and isinstance(size, int) and size > 1 and shape[axis] == size]
    return min(fixed)[1] if fixed else None


class Agreement:
    """The share of elements (labels), positions (argmax) or values (threshold) on which two models agree."""

    def __init__(self, rule: Rule, threshold: float = 0.5) -> None:
        self.rule = rule
        self.threshold = threshold
        self.agreed = 0
        self.total = 0
        self.mismatch: str | None = None  # why two outputs could not be compared

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref, got = np.asarray(reference), np.asarray(candidate)
        if ref.shape != got.shape:
            if ref.size != got.size:
                self.mismatch = f"shape {list(got.shape)} where the reference has {list(ref.shape)}"
                self.total += max(ref.size, 1)
                return
            got = got.reshape(ref.shape)
        if self.rule == "argmax" and ref.ndim >= 1 and ref.shape[-1] > 1:
            same = _argmax(ref) == _argmax(got)
        elif self.rule in ("argmax", "threshold"):
            same = (ref.astype(np.float64) > self.threshold) == (np.nan_to_num(got.astype(np.float64), nan=-np.inf)
                                                                  > self.threshold)
        else:
            same = labels_equal(ref, got)
        self.agreed += int(np.count_nonzero(same))
        self.total += int(same.size)

    @property
    def share(self) -> float:
        return self.agreed / self.total if self.total and self.mismatch is None else (1.0 if not self.total else 0.0)


def labels_equal(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Element-wise equality of two label arrays of possibly different dtypes: a scikit-learn model
    fitted on booleans predicts True/False where its ONNX form gives 1/0; text labels compare as text."""
    if ref.dtype.kind in "fc" or got.dtype.kind in "fc":
        return np.isclose(ref.astype(np.float64), got.astype(np.float64))
    if ref.dtype.kind in "biu" and got.dtype.kind in "biu":
        return ref.astype(np.int64) == got.astype(np.int64)
    return ref.astype(str) == got.astype(str)


def _argmax(values: np.ndarray) -> np.ndarray:
    # NaN would win an argmax on some platforms and lose on others: a NaN position never agrees.
    as_float = values.astype(np.float64)
    winners = as_float.argmax(axis=-1)
    return np.where(np.isnan(as_float).any(axis=-1), -1, winners)


class ChannelError:
    """Per channel: RMSE of the candidate against the reference, over the reference's std in that channel."""

    def __init__(self, axis: int | None) -> None:
        self.axis = axis
        self.count = 0
        self.sums: np.ndarray | None = None  # per channel: n, sum(ref), sum(ref²), sum(err²), max |err|
        self.nonfinite = 0
        self.mismatch: str | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(candidate, dtype=np.float64)
        if ref.shape != got.shape:
            if ref.size != got.size:
                self.mismatch = f"shape {list(got.shape)} where the reference has {list(ref.shape)}"
                return
            got = got.reshape(ref.shape)
        self.nonfinite += int(np.count_nonzero(~np.isfinite(got)))
        if self.axis is not None and ref.ndim > self.axis:
            ref, got = np.moveaxis(ref, self.axis, 0), np.moveaxis(got, self.axis, 0)
            ref, got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        else:
            ref, got = ref.reshape(1, -1), got.reshape(1, -1)
        err = np.where(np.isfinite(got), got - ref, 0.0)
        sums = np.stack([np.full(len(ref), ref.shape[1], dtype=np.float64), ref.sum(axis=1), (ref ** 2).sum(axis=1),
                         (err ** 2).sum(axis=1), np.abs(err).max(axis=1, initial=0.0)])
        if self.sums is None:
            self.sums = sums
        elif self.sums.shape != sums.shape:
            self.mismatch = f"{sums.shape[1]} channels in one run and {self.sums.shape[1]} in another"
        else:
            self.sums[:4] += sums[:4]
            self.sums[4] = np.maximum(self.sums[4], sums[4])
        self.count += 1

    def relative(self) -> np.ndarray:
        """Each channel's RMSE over its spread (inf where a constant channel changed past 1e-4)."""
        if self.sums is None:
            return np.zeros(0)
        n, total, squares, errors, _ = self.sums
        mean = total / np.maximum(n, 1)
        spread = np.sqrt(np.maximum(squares / np.maximum(n, 1) - mean ** 2, 0.0))
        rmse = np.sqrt(errors / np.maximum(n, 1))
        constant = spread <= _CONSTANT * (1.0 + np.abs(mean))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(constant, np.where(rmse <= _CONSTANT_ATOL * (1.0 + np.abs(mean)), 0.0, np.inf),
                             rmse / np.where(constant, 1.0, spread))
        return ratio

    def worst(self) -> tuple[int, float]:
        """(channel, its relative error); inf for any non-finite candidate value or a mismatch."""
        ratio = self.relative()
        if self.mismatch is not None or self.nonfinite or not ratio.size:
            return 0, float("inf") if (self.mismatch or self.nonfinite) else 0.0
        channel = int(np.argmax(ratio))
        return channel, float(ratio[channel])

    @property
    def channels(self) -> int:
        return 0 if self.sums is None else self.sums.shape[1]


class Cosine:
    """Cosine similarity of matching vectors (the last axis); mean and least over all vectors."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.least = 1.0
        self.mismatch: str | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(candidate, dtype=np.float64)
        if ref.shape != got.shape:
            self.mismatch = f"shape {list(got.shape)} where the reference has {list(ref.shape)}"
            return
        ref = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1)
        got = np.nan_to_num(got.reshape(ref.shape), nan=0.0, posinf=0.0, neginf=0.0)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(got, axis=1) == 0)
        cosine = np.where(both_zero, 1.0, np.sum(ref * got, axis=1) / np.where(norms == 0, 1.0, norms))
        self.total += float(cosine.sum())
        self.count += len(cosine)
        self.least = min(self.least, float(cosine.min(initial=1.0)))

    @property
    def mean(self) -> float:
        if self.mismatch is not None:
            return 0.0
        return self.total / self.count if self.count else 1.0

