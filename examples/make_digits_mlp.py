"""Train the bundled example: a digits classifier (StandardScaler + 2x512 MLP), saved with skops.

    python examples/make_digits_mlp.py   # writes digits_mlp.skops, digits_sample.npy, digits_validation.npz

Deterministic: scikit-learn's bundled digits data, a fixed seed and the lbfgs solver (which, unlike
adam, keeps no optimizer object, so every type in the file is on skops' default trust list).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as float32, split 75/25 with a fixed seed: train_x, test_x, train_y, test_y.

    The digits examples share it, so digits_sample.npy and digits_validation.npz are held out for all.
    """
    features, labels = load_digits(return_X_y=True)
    return train_test_split(features.astype(np.float32), labels, test_size=0.25, random_state=0)


def main() -> None:
    train_x, test_x, train_y, test_y = digits_split()
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(512, 512), solver="lbfgs", max_iter=300, random_state=0),
    ).fit(train_x, train_y)
    sio.dump(model, HERE / "digits_mlp.skops")
    np.save(HERE / "digits_sample.npy", test_x)
    np.savez(HERE / "digits_validation.npz", X=test_x, y=test_y)
    print(f"digits_mlp.skops: test accuracy {model.score(test_x, test_y):.3f}; "
          f"digits_sample.npy: {test_x.shape[0]} rows x {test_x.shape[1]} features")


if __name__ == "__main__":
    main()
