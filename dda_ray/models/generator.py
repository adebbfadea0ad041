"""DCGAN-style generator for model inversion (re-initialised every synthesis round)."""

from __future__ import annotations

import torch
from torch import nn

from .heads import init_dcgan


class Generator(nn.Module):
    """latent (N, nz) -> image (N, nc, size, size) in [0, 1]."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"generator image size must be a multiple of 4, got {img_size}")
        self.nz, self.init_size = nz, img_size // 4
        self.l1 = nn.Linear(nz, ngf * 2 * self.init_size**2)
        self.ngf = ngf
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], self.ngf * 2, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh weights for a new round, as the reference CMI/DDA code does (N(0, 0.02) convs and
        linears, N(1, 0.02) BatchNorm scales); seeded, so rounds are reproducible."""
        init_dcgan(self, generator)
