"""A small single-stage detector with a YOLOv8-style output: one tensor [batch, 4 + classes, anchors].

Rows 0-3 of the output are box centres and sizes in pixels (spread ~20), rows 4.. are per-class
sigmoid scores (mostly near 0, spread ~0.1): the layout in which one RMSE over the whole tensor lets
the boxes drown the scores. `make_tiny_detector.py` trains it on synthetic shapes.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = ("square", "disc", "cross")
SIZE = 64  # input images are 3 x SIZE x SIZE
STRIDE = 8  # one anchor per 8x8 cell: (SIZE / STRIDE)^2 = 64 anchors


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class TinyDetector(nn.Module):
    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.classes = classes
        self.backbone = nn.Sequential(_block(3, 16, 2), _block(16, 32, 2), _block(32, 32, 1), _block(32, 64, 2),
                                      _block(64, 64, 1))
        self.head = nn.Conv2d(64, 4 + classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.head(self.backbone(images))  # [N, 4 + C, H/8, W/8]
        n, _, rows, cols = raw.shape
        ys = torch.arange(rows, dtype=raw.dtype).view(1, rows, 1).expand(1, rows, cols)
        xs = torch.arange(cols, dtype=raw.dtype).view(1, 1, cols).expand(1, rows, cols)
        cx = (xs + torch.sigmoid(raw[:, 0])) * STRIDE
        cy = (ys + torch.sigmoid(raw[:, 1])) * STRIDE
        w = torch.exp(raw[:, 2].clamp(max=4.0)) * STRIDE
        h = torch.exp(raw[:, 3].clamp(max=4.0)) * STRIDE
        boxes = torch.stack([cx, cy, w, h], dim=1)
        scores = torch.sigmoid(raw[:, 4:])
        return torch.cat([boxes, scores], dim=1).flatten(2)  # [N, 4 + C, anchors]


def make_model() -> nn.Module:
    return TinyDetector()
