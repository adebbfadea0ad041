"""The sampling loop every augmentation backend shares: seeding, SDEdit timesteps, denoising.

One loop (:func:`denoise`, behind :func:`sdedit`) serves all backends, so ``strength``, the DDIM
schedule and the seeding mean the same everywhere.

Determinism: variation ``k`` of image ``id`` draws its noise from a CPU ``torch.Generator`` seeded
by :func:`variation_seed` (``augment.seed``, ``id``, ``k``) -- a stable hash, not Python's
``hash()``. DDIM with ``eta = 0`` adds no other randomness and the VAE latent is its mean, so a
rerun or a restarted actor reproduces a variation whatever batch it lands in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["denoise", "guided", "per_sample_noise", "resize", "sdedit", "sdedit_timesteps", "variation_seed"]


def variation_seed(seed: int, image_id: str, k: int) -> int:
    """A 63-bit seed for variation ``k`` of ``image_id``: stable across processes and machines.

    Not :func:`dda_ray.runtime.derive_seed` (blake2b): this sha256 derivation predates it, and the
    augmentation caches and resumed runs rely on its exact values.
    """
    digest = hashlib.sha256(f"dda_ray/{int(seed)}/{image_id}/{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_sample_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """One ``randn(shape)`` per generator, drawn on the CPU (identical on every device), stacked."""
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)


def sdedit_timesteps(scheduler, steps: int, strength: float, device=None) -> torch.Tensor:
    """The tail of a ``steps``-step schedule that ``strength`` selects, as diffusers' img2img does.

    ``init = int(steps * strength)`` steps are run, starting at ``timesteps[steps - init]``; at
    least one step runs, so a tiny strength still denoises the image once.
    """
    scheduler.set_timesteps(steps, device=device)
    init = min(max(int(steps * strength), 1), steps)
    t_start = (steps - init) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


def denoise(scheduler, x: torch.Tensor, timesteps: torch.Tensor, predict: Callable) -> torch.Tensor:
    """Denoise ``x`` (noisy at ``timesteps[0]``) through ``timesteps``: the diffusers sampling loop.

    ``predict(x_t, t)`` returns the model output (guidance already applied).
    """
    for t in timesteps:
        model_out = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_out, t, x, return_dict=False)[0]
    return x


def sdedit(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, predict: Callable) -> torch.Tensor:
    """Noise ``x0`` to ``timesteps[0]`` with ``noise``, then denoise through ``timesteps``.

    ``predict(x_t, t)`` returns the model output (guidance already applied); ``x0`` may be pixels
    or VAE latents.
    """
    t0 = timesteps[:1].repeat(x0.shape[0])
    return denoise(scheduler, scheduler.add_noise(x0, noise, t0), timesteps, predict)


def guided(model_out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance of a batched (unconditional, conditional) model output."""
    uncond, cond = model_out.chunk(2)
    return uncond + guidance * (cond - uncond)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of NCHW ``x`` to ``size`` (antialiased when shrinking; unchanged when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)
