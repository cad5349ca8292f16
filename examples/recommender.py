"""A click-through model with inputs of two dtypes and two outputs of different kinds.

Inputs: ``dense`` float32 [batch, 8] (numeric features) and ``items`` int64 [batch, 6] (ids of the
last items seen, looked up in an embedding table). Outputs, as forward's dict keys: ``click``, the
click probability [batch, 1], and ``profile``, a 16-d user embedding [batch, 16].

Only the float compute (the MLP, the table's float rows) is quantized; the int64 ids pass through
as they are. The weights in recommender.pt are random, seeded (``python examples/recommender.py``
writes them and the sample again):

    edgepack build examples/recommender.py:make_model --weights examples/recommender.pt \
        --sample examples/recommender_sample.npz --output-kind profile=embedding
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DENSE, HISTORY, ITEMS, WIDTH = 8, 6, 1000, 16


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.items = nn.Embedding(ITEMS, WIDTH)
        self.tower = nn.Sequential(nn.Linear(DENSE + WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
        self.click = nn.Linear(WIDTH, 1)

    def forward(self, dense: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        history = self.items(items).mean(dim=1)  # [N, WIDTH]
        profile = self.tower(torch.cat([dense, history], dim=1))
        return {"click": torch.sigmoid(self.click(torch.relu(profile))), "profile": profile}


def make_model() -> nn.Module:
    return Recommender()


def sample(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows keyed by forward's parameter names: what `--sample x.npz` holds."""
    rng = np.random.default_rng(seed)
    return {"dense": rng.normal(size=(rows, DENSE)).astype(np.float32),
            "items": rng.integers(0, ITEMS, size=(rows, HISTORY)).astype(np.int64)}


if __name__ == "__main__":  # python examples/recommender.py [OUT_DIR]
    import sys
    from pathlib import Path

    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    torch.manual_seed(0)
    torch.save(Recommender().state_dict(), out / "recommender.pt")
    np.savez(out / "recommender_sample.npz", **sample(64))
