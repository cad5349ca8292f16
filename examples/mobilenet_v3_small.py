"""MobileNetV3-Small (Howard et al., "Searching for MobileNetV3", 2019, table 2), written out here.

torchvision defines the same network, but its wheels here are built against CUDA torch and do not
import beside the CPU torch edgepack pins, so the architecture is spelled from the paper's table:
inverted residual blocks with depthwise convolutions, squeeze-and-excitation and hard-swish.
2.5 M parameters with the ImageNet head (a ~10 MB fp32 ONNX file), random weights seeded by
`make_model` (the architecture is what a build exercises: its operators, sizes and speed).

    python examples/mobilenet_v3_small.py mobilenet.pt photos.npy   # seeded weights, 16 photo crops
    edgepack build examples/mobilenet_v3_small.py:make_model --weights mobilenet.pt --sample photos.npy

The weights are random (seeded), with BatchNorm statistics measured on crops of scikit-learn's
sample photos, so the logits depend on the image (``calibrate_batch_norm``).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

# kernel, expansion, out channels, squeeze-excite, hard-swish (else ReLU), stride
BLOCKS = (
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)


def _divisible(channels: float, by: int = 8) -> int:
    return max(by, int(channels + by / 2) // by * by)


def _conv(cin: int, cout: int, kernel: int, stride: int, groups: int, activation: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels / 4)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        scale = nn.functional.hardsigmoid(self.expand(nn.functional.relu(self.reduce(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expansion: int, cout: int, excite: bool, hard: bool, stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if hard else nn.ReLU
        layers: list[nn.Module] = []
        if expansion != cin:
            layers.append(_conv(cin, expansion, 1, 1, 1, activation))
        layers.append(_conv(expansion, expansion, kernel, stride, expansion, activation))
        if excite:
            layers.append(SqueezeExcite(expansion))
        layers.append(_conv(expansion, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, 16, 3, 2, 1, nn.Hardswish)]
        channels = 16
        for kernel, expansion, out, excite, hard, stride in BLOCKS:
            layers.append(InvertedResidual(channels, kernel, expansion, out, excite, hard, stride))
            channels = out
        layers.append(_conv(channels, 576, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input's name
        pooled = nn.functional.adaptive_avg_pool2d(self.features(input), 1).flatten(1)
        return self.classifier(pooled)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = MobileNetV3Small()
    for module in model.modules():  # the paper's initialisation, seeded: fixed bytes for a fixed seed
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model.eval()


def calibrate_batch_norm(model: nn.Module, batches: int = 4, size: int = 16, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from crops of scikit-learn's two sample photos.

    With random weights and BatchNorm's initial statistics (mean 0, variance 1) the activations
    shrink layer by layer: every image gets the same ~1e-9 logits, and no accuracy gate could see a
    variant go wrong. Statistics measured on real pixels keep each layer's activations at unit
    scale, so the logits depend on the image, as a trained network's do.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB images
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.from_numpy(photo_crops(photos, size, rng)))
    return model.eval()


def photo_crops(photos: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random 224x224 crops, NCHW float32, normalised as ImageNet models take them."""
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, photo.shape[0] - 224), rng.integers(0, photo.shape[1] - 224)
        crops.append(photo[y:y + 224, x:x + 224].transpose(2, 0, 1) / 255.0)
    return ((np.stack(crops) - 0.45) / 0.225).astype(np.float32)


if __name__ == "__main__":  # python examples/mobilenet_v3_small.py WEIGHTS.pt [SAMPLE.npy]
    torch.save(calibrate_batch_norm(make_model()).state_dict(), sys.argv[1] if len(sys.argv) > 1 else "mobilenet.pt")
    if len(sys.argv) > 2:
        from sklearn.datasets import load_sample_images

        np.save(sys.argv[2], photo_crops(load_sample_images().images, 16, np.random.default_rng(1)))
