"""A task metric for `edgepack build --metric`: the tiny detector's recall at IoU 0.5.

    edgepack build examples/tiny_detector.py:make_model --weights examples/tiny_detector.pt \
        --sample detector_sample.npy --validation detector_validation.npz \
        --metric examples/detector_metric.py:recall_at_iou

edgepack calls ``recall_at_iou(outputs, targets)`` with every output over the validation images
and every other array of the validation file; higher is better.
"""

from __future__ import annotations

import numpy as np

SCORE, IOU = 0.5, 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (cx, cy, w, h) against boxes b [K, 4]."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) * \
        np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    return inter / (a[2] * a[3] + b[:, 2] * b[:, 3] - inter)


def recall_at_iou(outputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> float:
    """Share of ground-truth objects found: a cell scoring their class above 0.5 with IoU above 0.5."""
    predictions = next(iter(outputs.values()))  # [N, 4 + classes, anchors]
    found = total = 0
    for image, (boxes, classes) in enumerate(zip(targets["boxes"], targets["classes"])):
        cells = predictions[image].T  # [anchors, 4 + classes]
        for box, kind in zip(boxes, classes):
            if kind < 0:
                continue
            total += 1
            hits = cells[cells[:, 4 + kind] > SCORE]
            found += bool(len(hits)) and bool((_iou(box, hits[:, :4]) > IOU).any())
    return found / total if total else 1.0
