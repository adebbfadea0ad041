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


class MLPHead(nn.Module):
    """Linear -> ReLU -> Linear, L2-normalised output: the small head DFKD codebases put on a
    network's features (DDA's rotation head, CMI's projection head; both their ``MLPHead``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2, dim=1)


class RotationHead(MLPHead):
    """The auxiliary self-supervised head on the student's pooled embedding (DDA's ``MLPHead``)
    to the joint (class, rotation) label.

    The normalised output bounds its logits to the unit sphere, so the cross-entropy the
    synthesis *maximises* (the adversarial term) is bounded too: an unbounded head lets the
    generator win by driving the logits anywhere, which is what made rounds with the student
    produce images the student could not learn from.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__(in_dim, 4 * num_classes, hidden)
        self.num_classes = num_classes
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DFKD's generator/head initialisation: weights N(0, 0.02), biases 0 (seeded when given)."""
        init_dcgan(self, generator)


def init_dcgan(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """The initialisation the reference DFKD code applies to generators and heads every round:
    conv/linear weights N(0, 0.02) and zero biases, BatchNorm weights N(1, 0.02) and zero biases."""
    def normal(p: torch.Tensor, mean: float) -> None:
        # drawn on the CPU (a seeded CPU generator cannot fill a CUDA tensor), then copied: the same
        # weights on every device
        p.copy_(torch.empty(p.shape).normal_(mean, 0.02, generator=generator))

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                normal(m.weight, 0.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                normal(m.weight, 1.0)
                m.bias.zero_()
                m.reset_running_stats()


class AlignHead(nn.Module):
    """DDA's feature-alignment regressor (``datafree/utils/_utils.py``): the student's map, average-pooled
    to the teacher's size first when they differ, through 1x1 -> 3x3 -> 1x1 convolutions (BN/ReLU
    between, no biases) with twice the teacher's channels in the middle, to the teacher's channels."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        super().__init__()
        mid = mid_ch or 2 * out_ch
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, 1, bias=False),
        )

    def forward(self, fmap: torch.Tensor, target_hw: tuple[int, int] | None = None) -> torch.Tensor:
        if target_hw is not None and tuple(fmap.shape[-2:]) != tuple(target_hw):
            fmap = F.adaptive_avg_pool2d(fmap, target_hw)
        return self.net(fmap)
