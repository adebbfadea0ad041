"""The class-conditional image-to-image pipeline of the local prior (diffusers' pipeline layout).

A ``DiffusionPipeline`` of a small pixel-space ``UNet2DModel`` conditioned on class labels and a
DDIM scheduler; :func:`dda_ray.augment.prior.train_prior` trains and saves it, and the ``local_prior``
augmentation backend (:mod:`dda_ray.augment.backends`) loads it with ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .sampling import guided, per_sample_noise, sdedit, sdedit_timesteps

__all__ = ["ClassConditionalImg2ImgPipeline"]


class ClassConditionalImg2ImgPipeline(DiffusionPipeline):
    """SDEdit image-to-image with a small class-conditional pixel-space UNet (the CPU prior).

    ``unet`` is a ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: the last class
    index is the null class, trained by label dropout, which gives classifier-free guidance.
    Save and load it like any pipeline (``save_pretrained`` / ``ClassConditionalImg2ImgPipeline.
    from_pretrained(dir)``); call ``from_pretrained`` on this class, not on ``DiffusionPipeline``
    (diffusers cannot look a class outside its package up by name).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def predict_noise(self, x: torch.Tensor, t, class_labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The UNet's output with classifier-free guidance (one batched pass for cond + uncond)."""
        if guidance_scale == 1.0:
            return self.unet(x, t, class_labels=class_labels).sample
        null = torch.full_like(class_labels, self.null_class)
        out = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([null, class_labels])).sample
        return guided(out, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int],
        strength: float = 0.3,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 10,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Variations of ``image`` (NCHW in [-1, 1], the prior's resolution) for ``class_labels``.

        Noise comes from ``noise`` if given, else from ``generator`` (one per image for
        batch-independent results). Returns images in [0, 1]: NCHW tensors (``output_type="pt"``)
        or NHWC numpy (``"np"``).
        """
        device, dtype = self._execution_device, self.unet.dtype
        x0 = image.to(device=device, dtype=dtype)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() != x0.shape[0]:
            raise ValueError(f"got {x0.shape[0]} images but {labels.numel()} class labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}); got {labels.min().item()}..{labels.max().item()}")
        if noise is None:
            gens = generator if isinstance(generator, list) else [generator] * x0.shape[0]
            if len(gens) != x0.shape[0]:
                raise ValueError(f"got {len(gens)} generators for {x0.shape[0]} images")
            noise = per_sample_noise(gens, x0.shape[1:], device, dtype) if generator is not None else torch.randn_like(x0)
        timesteps = sdedit_timesteps(self.scheduler, num_inference_steps, strength, device)
        x = sdedit(self.scheduler, x0, noise.to(device, dtype), timesteps, lambda xt, t: self.predict_noise(xt, t, labels, guidance_scale))
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
