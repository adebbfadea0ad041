"""Batched, torch-only image transforms (no torchvision).

Images travel as uint8 NHWC arrays (bank, datasets, Ray Data rows) and become normalised
float NCHW tensors right before a model sees them. Augmentations work on whole batches
so they cost a few vectorised ops instead of a Python loop per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (array or tensor) -> float NCHW in [0, 1].

    Read-only arrays (Ray Data batches, ``np.frombuffer``) are copied first: ``torch.from_numpy``
    warns on those.
    """
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)
        torch_input = images if images.flags.writeable else images.copy()
        images = torch.from_numpy(torch_input)
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC array."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Normalize:
    """``(x * scale - mean) / std`` for images ``x`` in [0, 1].

    ``scale`` is the model's input range (255 for a model fed raw 0-255 pixels); ``mean`` and
    ``std`` are in those units. The scale is folded in: ``self.mean`` / ``self.std`` are the
    equivalent values for [0, 1] inputs (``mean / scale``, ``std / scale``), so whatever reads
    them (the student's transform, its checkpoint's meta.json) gets the same normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: float = 1.0):
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float64).div(self.scale).float().view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).div(self.scale).float().view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of the original size after zero padding (NCHW)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (n, w)
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, idx_c)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch (NCHW)."""
    flip = (torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_resized_crop(
    x: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random crop of area ``scale`` (fractions of the image) and aspect ``ratio``
    (log-uniform), resized back to the input size by bilinear sampling (NCHW); differentiable in
    ``x``, so a generator can be optimised through it (CMI's local view). A box wider or taller
    than the image is clipped to it."""
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=generator)
    r = log_r.exp()
    bw = (area * r).sqrt().clamp(max=1.0)  # box width / image width
    bh = (area / r).sqrt().clamp(max=1.0)
    cx = bw / 2 + torch.rand(n, generator=generator) * (1 - bw)  # box centre, in [0, 1]
    cy = bh / 2 + torch.rand(n, generator=generator) * (1 - bh)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = bw, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh, 2 * cy - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TrainTransform:
    """Random crop (with padding) + horizontal flip + normalisation, on float NCHW batches."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 4, flip: bool = True):
        self.normalize = Normalize(mean, std)
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        return self.normalize(x)
