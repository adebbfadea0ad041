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


def resized_crop_boxes(
    n: int, size: tuple[int, int], scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None, attempts: int = 10,
) -> torch.Tensor:
    """Integer crop boxes ``(x0, y0, w, h)`` (shape ``(n, 4)``) for a random resized crop of an image of
    ``size = (h, w)``, drawn as torchvision's and kornia's ``RandomResizedCrop`` draw them: ``attempts``
    candidates of area ``scale`` (uniform fraction of the image) and aspect ``ratio`` (width / height,
    log-uniform), sides rounded to pixels; the first candidate that fits in the image is taken, the
    whole image if none does; the corner is uniform over the integer positions that keep the box inside."""
    H, W = size
    u = torch.rand(n, attempts, generator=generator)
    log_r = torch.empty(n, attempts).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=generator)
    area = (scale[0] + u * (scale[1] - scale[0])) * (H * W)
    r = log_r.exp()
    w = (area * r).sqrt().round()
    h = (area / r).sqrt().round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = (fits.int().cumsum(1) == 1) & fits  # the first candidate that fits, per image
    found = first.any(1)
    pick = first.int().argmax(1)
    rows = torch.arange(n)
    bw = torch.where(found, w[rows, pick], torch.full((n,), float(W))).long()
    bh = torch.where(found, h[rows, pick], torch.full((n,), float(H))).long()
    x0 = (torch.rand(n, generator=generator) * (W - bw + 1)).floor().long().clamp(max=W - bw)
    y0 = (torch.rand(n, generator=generator) * (H - bh + 1)).floor().long().clamp(max=H - bh)
    return torch.stack([x0, y0, bw, bh], dim=1)


def random_resized_crop(
    x: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random resized crop (NCHW): a box from :func:`resized_crop_boxes`, resized back to the
    input size by bilinear interpolation with ``align_corners=True`` (kornia's ``RandomResizedCrop``
    default: the box's corner pixels land on the output's corner pixels). Differentiable in ``x``, so a
    generator can be optimised through it (CMI's local view)."""
    n, c, h, w = x.shape
    box = resized_crop_boxes(n, (h, w), scale, ratio, generator).to(torch.float64)
    x0, y0, bw, bh = box.unbind(1)
    # one affine map per image: output pixel j samples input pixel x0 + j (bw - 1) / (w - 1), in the
    # normalised coordinates of grid_sample with align_corners=True
    sx, sy = (bw - 1) / max(w - 1, 1), (bh - 1) / max(h - 1, 1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * x0 / max(w - 1, 1) - 1 + sx
    theta[:, 1, 1], theta[:, 1, 2] = sy, 2 * y0 / max(h - 1, 1) - 1 + sy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, c, h, w], align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


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
