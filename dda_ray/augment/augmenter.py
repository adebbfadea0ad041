"""Diffusion augmentation (DDA): one :class:`Augmenter` over three diffusers backends.

The :class:`Augmenter` turns synthetic images into ``augment.num_variations`` variations each,
with the backend ``augment.backend`` selects (:mod:`dda_ray.augment.backends`):

* ``local_prior``: the class-conditional pixel-space prior
  (:class:`~dda_ray.augment.pipeline_class_img2img.ClassConditionalImg2ImgPipeline`, trained by ``dda_ray/augment/prior.py``);
* ``sd_img2img``: Stable Diffusion img2img prompted by ``augment.prompt_template``;
* ``sd_image_variations``: the paper's Stable Diffusion image variations (CLIP image embedding).

All of them denoise with classifier-free guidance ``augment.guidance`` over a DDIM schedule of
``augment.steps`` steps, starting where ``augment.strength`` says (SDEdit below 1), through one
shared loop (:mod:`dda_ray.augment.sampling`).

Determinism: variation ``k`` of image ``id`` draws its noise from a CPU ``torch.Generator`` seeded
by :func:`~dda_ray.augment.sampling.variation_seed` (``augment.seed``, ``id``, ``k``) -- a stable
hash, not Python's ``hash()``. DDIM with ``eta = 0`` adds no other randomness and the VAE latent is
its mean, so a rerun or a restarted actor reproduces a variation whatever batch it lands in.

The Ray Data stage around it (cache of variations, row codecs) is :mod:`dda_ray.engines.stages`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..config import AugmentConfig
from ..data.transforms import to_float, to_uint8
from ..runtime import to_device
from .backends import BACKENDS, AugmentError, enable_xformers
from .sampling import variation_seed

__all__ = ["AugmentError", "Augmenter"]


class Augmenter:
    """``num_variations`` diffusion variations of each image, deterministic per (seed, id, k).

    ``Augmenter(cfg.augment, class_names)(images_uint8_nhwc, labels, ids)``; the Ray Data actor
    around it is :class:`dda_ray.engines.stages.AugmentStage`.

    Args:
        cfg: the ``augment`` section.
        class_names: class names for ``sd_img2img`` prompts (index = label).
    """

    def __init__(self, cfg: AugmentConfig, class_names: Sequence[str] | None = None):
        from ..runtime import resolve_device

        cfg.validate("augment")
        self.cfg = cfg
        self.class_names = list(class_names) if class_names is not None else None
        self.device = resolve_device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        if self.device.type == "cpu" and dtype != torch.float32:
            warnings.warn(f"augment.dtype = {cfg.dtype!r} on CPU: running in float32 (half precision is for GPUs)", stacklevel=2)
            dtype = torch.float32
        self.dtype = dtype
        self.backend = BACKENDS[cfg.backend](cfg, self.device, dtype, self.class_names)
        if cfg.xformers:
            enable_xformers(self.backend.pipe, self.device)

    @property
    def pipeline(self) -> DiffusionPipeline:
        return self.backend.pipe

    def __call__(self, images: np.ndarray, labels, ids) -> dict[str, np.ndarray]:
        return self.augment(images, labels, ids)

    def augment(self, images: np.ndarray, labels, ids) -> dict[str, np.ndarray]:
        """Variations of uint8 NHWC ``images``; rows are parent-major (v0..vK-1 of image 0, then image 1, ...).

        Returns numpy columns ``id`` (``f"{parent}-v{k}"``), ``parent_id``, ``image`` (uint8 NHWC,
        the input's size), ``label`` (int64) and ``variation`` (k, int64).
        """
        images = np.asarray(images)
        labels = np.array(labels, dtype=np.int64).reshape(-1)  # a writable copy (Ray batches are read-only)
        ids = np.asarray(ids).astype(str).reshape(-1)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        if not len(images) == len(labels) == len(ids):
            raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(ids)} ids")
        v = self.cfg.num_variations
        parents_per_call = max(1, self.cfg.batch_size // v)
        chunks = []
        with torch.inference_mode():
            for s in range(0, len(images), parents_per_call):
                sl = slice(s, s + parents_per_call)
                gens = [torch.Generator().manual_seed(variation_seed(self.cfg.seed, pid, k)) for pid in ids[sl] for k in range(v)]
                x = to_device(to_float(images[sl]), self.device)
                chunks.append(to_uint8(self.backend.generate(x, labels[sl], gens, v).float()))
        out_images = np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:]), np.uint8)
        ks = np.tile(np.arange(v, dtype=np.int64), len(ids))
        parent = np.repeat(ids, v)
        return {
            "id": np.array([f"{p}-v{k}" for p, k in zip(parent, ks, strict=True)], dtype=str).reshape(-1),
            "parent_id": parent,
            "image": out_images,
            "label": np.repeat(labels, v),
            "variation": ks,
        }
