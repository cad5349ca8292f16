"""Train the PyTorch example: a small CNN (``digits_cnn.py``) on scikit-learn's bundled digits.

    python examples/make_digits_cnn.py

writes, next to this script:

- ``digits_cnn.pt``: the trained state dict (for ``digits_cnn.py:make_model --weights digits_cnn.pt``);
- ``digits_cnn_ts.pt``: the same model as TorchScript (``torch.jit.script``);
- ``digits_images.npy``: the held-out images, float32 N x 1 x 8 x 8 (the build's sample);
- ``digits_images_validation.npz``: the held-out images ``X`` and their labels ``y``.

Deterministic: a fixed split and seed, one thread and deterministic kernels, so ``digits_cnn.pt``
comes out byte-identical on every run with the same torch. ``digits_cnn_ts.pt`` holds the same
weights, but TorchScript writes a random serialization id into every archive. A few seconds of CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_cnn import make_model  # noqa: E402  (the committed model definition, next to this script)

SEED = 0
EPOCHS = 30
BATCH = 64


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.25, random_state=SEED,
                                                        stratify=labels)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs, targets = torch.from_numpy(train_x), torch.from_numpy(train_y)
    order = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(inputs), generator=order).split(BATCH):
            optimizer.zero_grad()
            loss_fn(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()

    torch.save(model.state_dict(), HERE / "digits_cnn.pt")
    torch.jit.save(torch.jit.script(model), HERE / "digits_cnn_ts.pt")
    np.save(HERE / "digits_images.npy", test_x)
    np.savez(HERE / "digits_images_validation.npz", X=test_x, y=test_y)
    print(f"digits_cnn.pt, digits_cnn_ts.pt: test accuracy {accuracy:.3f}; "
          f"digits_images.npy: {test_x.shape[0]} images of {'x'.join(map(str, test_x.shape[1:]))}")


if __name__ == "__main__":
    main()
