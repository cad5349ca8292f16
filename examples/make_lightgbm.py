"""Train the tabular example: a LightGBM classifier, saved as LightGBM's native text model.

    python examples/make_lightgbm.py   # writes tabular_lgbm.txt, tabular_sample.npy, tabular_validation.npz
    edgepack build examples/tabular_lgbm.txt --sample examples/tabular_sample.npy

Deterministic: scikit-learn's make_classification with fixed seeds, one thread and LightGBM's
``deterministic`` mode. The features are float32 before training, as edgepack feeds them.
"""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    features, labels = make_classification(n_samples=4000, n_features=20, n_informative=10, n_redundant=4,
                                           n_classes=3, class_sep=0.8, random_state=0)
    features = features.astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=0.25, random_state=0,
                                                        stratify=labels)
    model = lgb.LGBMClassifier(n_estimators=60, num_leaves=15, learning_rate=0.1, random_state=0, n_jobs=1,
                               deterministic=True, force_row_wise=True, verbose=-1).fit(train_x, train_y)
    model.booster_.save_model(HERE / "tabular_lgbm.txt")
    np.save(HERE / "tabular_sample.npy", test_x)
    np.savez(HERE / "tabular_validation.npz", X=test_x, y=test_y)
    print(f"tabular_lgbm.txt: test accuracy {model.score(test_x, test_y):.3f}; "
          f"tabular_sample.npy: {test_x.shape[0]} rows x {test_x.shape[1]} features")


if __name__ == "__main__":
    main()
