"""Trains examples/tiny_detector.py on synthetic shapes and writes tiny_detector.pt (a state dict).

    python examples/make_tiny_detector.py     # ~1 minute on 2 CPU cores; deterministic for the seed

Each object is assigned to the 8x8 cell holding its centre: that cell learns the object's class
score and box, every other cell learns scores of 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import scenes  # noqa: E402
from tiny_detector import SIZE, STRIDE, make_model  # noqa: E402

STEPS, BATCH = 600, 32


def targets(boxes: np.ndarray, classes: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cells = SIZE // STRIDE
    scores = torch.zeros(len(boxes), count, cells * cells)
    box_targets = torch.zeros(len(boxes), 4, cells * cells)
    positive = torch.zeros(len(boxes), cells * cells, dtype=torch.bool)
    for image, (image_boxes, image_classes) in enumerate(zip(boxes, classes)):
        for box, kind in zip(image_boxes, image_classes):
            if kind < 0:
                continue
            cell = int(box[1] // STRIDE) * cells + int(box[0] // STRIDE)
            scores[image, kind, cell] = 1.0
            box_targets[image, :, cell] = torch.from_numpy(box)
            positive[image, cell] = True
    return scores, box_targets, positive


def main() -> None:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, boxes, classes = scenes(STEPS * BATCH // 4, seed=0)  # each scene seen about 4 times
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        pick = rng.integers(0, len(images), BATCH)
        out = model(torch.from_numpy(images[pick]))
        scores, box_targets, positive = targets(boxes[pick], classes[pick], out.shape[1] - 4)
        score_loss = torch.nn.functional.binary_cross_entropy(out[:, 4:].clamp(1e-6, 1 - 1e-6), scores)
        mask = positive.unsqueeze(1).expand_as(box_targets)
        box_loss = torch.nn.functional.l1_loss(out[:, :4][mask] / SIZE, box_targets[mask] / SIZE)
        loss = 10 * score_loss + box_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: score loss {score_loss.item():.4f}, box loss {box_loss.item():.4f}")
    model.eval()
    target = Path(__file__).resolve().parent / "tiny_detector.pt"
    torch.save(model.state_dict(), target)
    print(target)


if __name__ == "__main__":
    main()
