"""Top-1 evaluation on a real test split (the only place DFKD touches real data)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.datasets import ImageArrays
from ..data.transforms import Normalize, to_float


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageArrays, normalize: Normalize, batch_size: int = 500, device: torch.device | str = "cpu") -> dict:
    """Return ``{"acc": top-1 %, "loss": mean CE}`` of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(data), batch_size):
        x = normalize(to_float(data.images[i : i + batch_size]).to(device))
        y = torch.from_numpy(data.labels[i : i + batch_size]).to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(len(data), 1)
    return {"acc": 100.0 * correct / n, "loss": loss_sum / n}
