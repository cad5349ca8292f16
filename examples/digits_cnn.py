"""The example PyTorch model: a small CNN for scikit-learn's 8x8 digits (input N x 1 x 8 x 8, pixels / 16).

edgepack builds it from this module and a state dict:

    edgepack build examples/digits_cnn.py:make_model --weights examples/digits_cnn.pt \
        --sample examples/digits_images.npy

``make_digits_cnn.py`` trains it and writes the weights.
"""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits, one row of ``classes`` scores per image."""
        return self.classifier(self.features(images))


def make_model() -> DigitsCNN:
    """An untrained DigitsCNN; edgepack loads the trained weights into it."""
    return DigitsCNN()
