"""Small heads on the student: rotation self-supervision and feature alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by 0/90/180/270 degrees; joint labels ``4 * y + k``.

    Returns (4N, C, H, W) images ordered k-major and (4N,) joint labels.
    """
    xs = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    ys = [labels * 4 + k for k in range(4)]
    return torch.cat(xs), torch.cat(ys)


class RotationHead(nn.Module):
    """MLP on the student's pooled embedding predicting the joint (class, rotation) label."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4 * num_classes))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if hasattr(m, "reset_parameters") and m is not self:
                m.reset_parameters()


class AlignHead(nn.Module):
    """Conv projector (1x1 -> 3x3 -> 1x1, BN/ReLU) mapping student channels to teacher channels."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        super().__init__()
        mid = mid_ch or max(in_ch, out_ch)
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, 1),
        )

    def forward(self, fmap: torch.Tensor, target_hw: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.net(fmap)
        if target_hw is not None and tuple(out.shape[-2:]) != tuple(target_hw):
            out = F.adaptive_avg_pool2d(out, target_hw)
        return out
