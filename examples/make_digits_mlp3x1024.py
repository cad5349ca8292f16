"""Train the 3x1024 MLP example on scikit-learn's digits, saved with skops.

    python examples/make_digits_mlp3x1024.py   # writes digits_mlp3x1024.skops (sample and
                                               # validation data are digits_sample.npy / digits_validation.npz)

The model where int8 pays: three 1024-wide layers make batch-1 inference matmul-bound. lbfgs
with a fixed seed is deterministic and
keeps no optimizer object, so every type in the file is on skops' default trust list. The weights
are stored as float32 (a third of the size); scikit-learn then computes in float32 as ONNX does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from make_digits_mlp import digits_split  # the script's folder is on sys.path when run as a file

HERE = Path(__file__).resolve().parent


def main() -> None:
    train_x, test_x, train_y, test_y = digits_split()  # the split digits_sample.npy comes from
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(1024, 1024, 1024), solver="lbfgs", max_iter=60, random_state=0),
    ).fit(train_x, train_y)
    # float32 weights: what the ONNX model carries anyway, and a third of the file.
    network = model[-1]
    network.coefs_ = [w.astype(np.float32) for w in network.coefs_]
    network.intercepts_ = [b.astype(np.float32) for b in network.intercepts_]
    # A second copy of the weights kept for early stopping; prediction never reads it.
    for training_only in ("_best_coefs", "_best_intercepts"):
        if hasattr(network, training_only):
            delattr(network, training_only)
    sio.dump(model, HERE / "digits_mlp3x1024.skops")
    print(f"digits_mlp3x1024.skops: test accuracy {model.score(test_x, test_y):.4f}, "
          f"weights {model[-1].coefs_[0].dtype}")


if __name__ == "__main__":
    main()
