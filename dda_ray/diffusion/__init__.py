"""Diffusion models of the augmentation, laid out as diffusers lays out pipelines.

* :mod:`~dda_ray.diffusion.pipeline_class_img2img`: :class:`ClassConditionalImg2ImgPipeline`, the
  local prior's pipeline (trained by :mod:`dda_ray.prior`).
* :mod:`~dda_ray.diffusion.sampling`: the sampling loop every backend shares (seeds, SDEdit, DDIM).
* :mod:`~dda_ray.diffusion.backends`: the three augmentation backends behind
  :class:`dda_ray.augment.Augmenter`.
"""

from .pipeline_class_img2img import ClassConditionalImg2ImgPipeline

__all__ = ["ClassConditionalImg2ImgPipeline"]
