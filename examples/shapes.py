"""Synthetic detection data: squares, discs and crosses on noisy backgrounds, with their boxes.

Deterministic for a seed, so the tiny detector's sample and validation files can be made again
anywhere: `python examples/shapes.py OUT_DIR` writes detector_sample.npy (64 images) and
detector_validation.npz (X: the images, boxes, classes; for `--metric examples/detector_metric.py:recall_at_iou`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SIZE = 64
MAX_OBJECTS = 3


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One 3 x SIZE x SIZE image in [0, 1]; its boxes [MAX_OBJECTS, 4] (cx, cy, w, h in pixels) and
    classes [MAX_OBJECTS] (-1 where there is no object)."""
    image = np.clip(rng.normal(0.45, 0.08, (SIZE, SIZE, 3)) + rng.uniform(-0.1, 0.1, 3), 0, 1)
    boxes = np.zeros((MAX_OBJECTS, 4), dtype=np.float32)
    classes = np.full(MAX_OBJECTS, -1, dtype=np.int64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for index in range(rng.integers(1, MAX_OBJECTS + 1)):
        kind, side = int(rng.integers(0, 3)), int(rng.integers(10, 25))
        cx, cy = rng.uniform(side / 2, SIZE - side / 2, 2)
        color = rng.uniform(0, 1, 3)
        inside_x, inside_y = np.abs(xx - cx) <= side / 2, np.abs(yy - cy) <= side / 2
        if kind == 0:
            mask = inside_x & inside_y
        elif kind == 1:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (side / 2) ** 2
        else:
            bar = side / 6
            mask = (inside_x & (np.abs(yy - cy) <= bar)) | (inside_y & (np.abs(xx - cx) <= bar))
        image[mask] = color
        boxes[index] = (cx, cy, side, side)
        classes[index] = kind
    return image.transpose(2, 0, 1).astype(np.float32), boxes, classes


def scenes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    made = [scene(rng) for _ in range(count)]
    return tuple(np.stack(part) for part in zip(*made))  # type: ignore[return-value]


def write_data(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    images, _, _ = scenes(64, seed=1)
    np.save(out / "detector_sample.npy", images)
    images, boxes, classes = scenes(128, seed=2)
    np.savez(out / "detector_validation.npz", X=images, boxes=boxes, classes=classes)  # X: the one input
    return out / "detector_sample.npy", out / "detector_validation.npz"


if __name__ == "__main__":
    for path in write_data(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(path)
