"""The augmentation backends: one diffusers pipeline each, loaded from ``augment.model``.

Every backend turns a synthetic image into variations by denoising with classifier-free guidance
``augment.guidance`` over a DDIM schedule of ``augment.steps`` steps, through the shared loop of
:mod:`dda_ray.augment.sampling`. Where the denoising starts is ``augment.strength``:

* ``strength < 1`` (every backend): SDEdit-style image-to-image. The image (or its VAE latent) is
  pushed a fraction ``strength`` into the noise schedule and denoised back (:func:`~dda_ray.augment.sampling.sdedit`).
* ``strength = 1``: on ``local_prior`` and ``sd_img2img`` the same SDEdit loop from the schedule's
  first timestep (diffusers' img2img maximum: a trace of the original survives there). On
  ``sd_image_variations`` it is the stock ``StableDiffusionImageVariationPipeline``: pure Gaussian
  latents, all ``steps`` timesteps, the parent entering only through its CLIP image embedding --
  the paper's augmentation (lambdalabs/sd-image-variations-diffusers, guidance 3, 25 steps).

The backends differ in what they denoise and what conditions it:

=====================  =========================================  ==============================
backend                model (``from_pretrained(augment.model)``)  condition
=====================  =========================================  ==============================
``local_prior``        :class:`ClassConditionalImg2ImgPipeline`    class label (null class = CFG)
                       (pixel space; ``dda_ray/augment/prior.py``)
``sd_img2img``         ``StableDiffusionImg2ImgPipeline``          ``prompt_template`` text
``sd_image_variations``  ``StableDiffusionImageVariationPipeline``   CLIP image embedding (paper)
=====================  =========================================  ==============================

The SD backends use the pipeline's components (VAE, encoders, UNet) rather than its
``__call__``: the stock image-variation pipeline can only start from pure noise, and owning the
loop lets every sample draw its noise from its own generator.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from ..config import AugmentConfig, ConfigError
from .pipeline_class_img2img import ClassConditionalImg2ImgPipeline
from .sampling import denoise, guided, per_sample_noise, resize, sdedit, sdedit_timesteps

__all__ = ["BACKENDS", "AugmentError", "check_pipeline_dir", "enable_xformers"]

# model_index.json ``_class_name`` each backend can load (from_pretrained of a compatible class works).
_PIPELINE_CLASSES = {
    "local_prior": ("ClassConditionalImg2ImgPipeline",),
    "sd_img2img": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sd_image_variations": ("StableDiffusionImageVariationPipeline",),
}


# Images per VAE encode / decode call. At 512 px the SD 1.x VAE holds about 0.375 GiB of fp16 activations per
# decoded latent and 0.31 GiB per encoded image (counted on the meta device, issue #27): decoding the paper's
# 64 variations in one call needs 24 GiB, the whole memory of the cluster's A10G augment GPUs, before the
# weights. The VAE mixes nothing across a batch (each image is computed alone, whatever its neighbours), so
# chunking changes no result; chunks of 8 keep a call near 3 GiB.
VAE_CHUNK = 8


class AugmentError(ConfigError):
    """The augmentation model cannot be loaded or run with this configuration."""


class _Backend:
    """Loads one pipeline; ``generate`` maps parents in [0, 1] to their variations in [0, 1]."""

    pipeline_class: type
    load_kwargs: dict = {}

    def __init__(self, cfg: AugmentConfig, device: torch.device, dtype: torch.dtype, class_names: Sequence[str] | None):
        self.cfg, self.device, self.dtype, self.class_names = cfg, device, dtype, class_names
        self.pipe = _load_pipeline(self.pipeline_class, cfg, dtype, **self.load_kwargs).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, x: torch.Tensor, labels: np.ndarray, generators: list[torch.Generator], v: int) -> torch.Tensor:
        raise NotImplementedError


class _LocalPriorBackend(_Backend):
    pipeline_class = ClassConditionalImg2ImgPipeline

    def __init__(self, *args):
        super().__init__(*args)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)

    def generate(self, x, labels, generators, v):
        pipe, cfg = self.pipe, self.cfg
        size = pipe.image_size
        x0 = resize(x, (size, size)).mul(2).sub(1).repeat_interleave(v, 0).to(self.dtype)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device).repeat_interleave(v)
        noise = per_sample_noise(generators, x0.shape[1:], self.device, self.dtype)
        out = pipe(x0, y, strength=cfg.strength, guidance_scale=cfg.guidance, num_inference_steps=cfg.steps, noise=noise).images
        return resize(out.float(), tuple(x.shape[-2:]))


class _LatentBackend(_Backend):
    """Shared SD machinery: resize up, VAE-encode (latent mean), SDEdit in latent space, decode, resize down
    (the VAE in chunks of ``VAE_CHUNK`` images: the memory of one call stays bounded at any batch size).

    With ``from_noise`` set (sd_image_variations at strength 1) the parent is not encoded: the
    latents start as pure Gaussian noise and the whole schedule runs, as in a text-to-image call.
    """

    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    from_noise = False

    def __init__(self, *args):
        super().__init__(*args)
        # DDIM (eta = 0) on the checkpoint's own noise schedule (SD ships PNDM): deterministic, and a tail-of-schedule
        # start is exact. Latents are never clipped (DDIM's default clip_sample=True is meant for pixels).
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, clip_sample=False)
        self.resolution = self.cfg.image_resolution or int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor
        multiple = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        if self.resolution % multiple:
            raise AugmentError(f"augment.image_resolution = {self.resolution} must be a multiple of {multiple} for this pipeline")

    def conditions(self, x: torch.Tensor, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) encoder hidden states, one row per parent."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at ``self.resolution``: what the VAE encodes a parent to."""
        side = self.resolution // self.pipe.vae_scale_factor
        return int(self.pipe.unet.config.in_channels), side, side

    @torch.no_grad()
    def generate(self, x, labels, generators, v):
        pipe, cfg, vae = self.pipe, self.cfg, self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        if not self.from_noise:
            big = resize(x, (self.resolution, self.resolution)).to(self.dtype)
            latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mode() for chunk in big.split(VAE_CHUNK)])
            latents = ((latents - shift) * vae.config.scaling_factor).repeat_interleave(v, 0)
        cond, uncond = self.conditions(x, labels)
        cond, uncond = cond.repeat_interleave(v, 0), uncond.repeat_interleave(v, 0)
        use_cfg = cfg.guidance != 1.0
        hidden = torch.cat([uncond, cond]) if use_cfg else cond

        def predict(xt, t):
            inp = torch.cat([xt, xt]) if use_cfg else xt
            out = pipe.unet(inp, t, encoder_hidden_states=hidden, return_dict=False)[0]
            return guided(out, cfg.guidance) if use_cfg else out

        if self.from_noise:
            # The stock pipeline's prepare_latents + denoising loop: N(0, 1) latents times init_noise_sigma, every timestep.
            noise = per_sample_noise(generators, self.latent_shape(), self.device, self.dtype)
            self.scheduler.set_timesteps(cfg.steps, device=self.device)
            latents = denoise(self.scheduler, noise * self.scheduler.init_noise_sigma, self.scheduler.timesteps, predict)
        else:
            noise = per_sample_noise(generators, latents.shape[1:], self.device, self.dtype)
            timesteps = sdedit_timesteps(self.scheduler, cfg.steps, cfg.strength, self.device)
            latents = sdedit(self.scheduler, latents, noise, timesteps, predict)
        latents = latents / vae.config.scaling_factor + shift
        images = torch.cat([vae.decode(chunk, return_dict=False)[0] for chunk in latents.split(VAE_CHUNK)])
        return resize((images.float() / 2 + 0.5).clamp(0, 1), tuple(x.shape[-2:])).clamp(0, 1)


class _SDImg2ImgBackend(_LatentBackend):
    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline

    def __init__(self, *args):
        super().__init__(*args)
        if not self.class_names:
            raise AugmentError("augment.backend = 'sd_img2img' needs class names for its prompts; pass class_names to Augmenter")
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _embed(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        if label not in self._cache:
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"label {label} has no class name ({len(self.class_names)} class names given)")
            prompt = self.cfg.prompt_template.format(label=self.class_names[label])
            cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, True)
            self._cache[label] = (cond, uncond)
        return self._cache[label]

    def conditions(self, x, labels):
        pairs = [self._embed(int(y)) for y in labels]
        return torch.cat([c for c, _ in pairs]), torch.cat([u for _, u in pairs])


class _SDImageVariationsBackend(_LatentBackend):
    """The paper's augmenter (lambdalabs/sd-image-variations-diffusers), conditioned on the parent's CLIP image embedding.

    ``strength = 1`` is the stock ``StableDiffusionImageVariationPipeline`` -- the paper's
    augmentation: Gaussian latents (times ``init_noise_sigma``), all ``steps`` timesteps, guidance
    against a zero embedding; the parent's pixels enter only through its CLIP embedding (the VAE
    encoder is never called). Given the same initial latents, scheduler and a tensor image, it
    equals ``pipe(image, latents=..., guidance_scale=guidance, num_inference_steps=steps)`` for
    ``guidance >= 1`` (below 1 the stock pipeline switches guidance off; here it still mixes in
    the unconditional branch, as on every backend). The noise is drawn per (parent, variation),
    so the result does not depend on the batch.

    ``strength < 1`` is this project's SDEdit-style extension: the parent is VAE-encoded, noised to
    the timestep ``strength`` selects and denoised through the remaining DDIM steps
    (:func:`sdedit`), so the variation keeps the parent's layout as well as its embedding.
    """

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionImageVariationPipeline

        return StableDiffusionImageVariationPipeline

    def __init__(self, *args):
        super().__init__(*args)
        self.from_noise = self.cfg.strength >= 1.0
        fe = self.pipe.feature_extractor
        self.clip_size = _clip_crop_size(fe)
        self.clip_mean = torch.tensor(fe.image_mean, device=self.device).view(1, -1, 1, 1)
        self.clip_std = torch.tensor(fe.image_std, device=self.device).view(1, -1, 1, 1)

    def clip_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP preprocessing on tensors (the model card's recipe: bicubic resize to the crop size, then normalise)."""
        return (resize(x.float(), self.clip_size).clamp(0, 1) - self.clip_mean) / self.clip_std

    def conditions(self, x, labels):
        encoder = self.pipe.image_encoder
        emb = encoder(self.clip_pixels(x).to(encoder.dtype)).image_embeds.unsqueeze(1).to(self.dtype)
        return emb, torch.zeros_like(emb)  # the stock pipeline's unconditional embedding is zeros


def _clip_crop_size(fe) -> tuple[int, int]:
    """(H, W) a CLIPImageProcessor crops to (an int, a dict, or transformers 5's SizeDict)."""
    crop = getattr(fe, "crop_size", None) or getattr(fe, "size", None) or 224
    if isinstance(crop, int):
        return crop, crop
    get = crop.get if isinstance(crop, dict) else lambda k: getattr(crop, k, None)
    h, w = get("height"), get("width")
    if h is None or w is None:
        side = get("shortest_edge") or 224
        return int(side), int(side)
    return int(h), int(w)


BACKENDS: dict[str, type[_Backend]] = {
    "local_prior": _LocalPriorBackend,
    "sd_img2img": _SDImg2ImgBackend,
    "sd_image_variations": _SDImageVariationsBackend,
}


def check_pipeline_dir(path: Path, cfg: AugmentConfig) -> None:
    index = path / "model_index.json"
    if not index.exists():
        raise AugmentError(f"augment.model = {cfg.model!r} is a directory without model_index.json: not a diffusers pipeline saved with save_pretrained")
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        raise AugmentError(f"augment.model = {cfg.model!r}: unreadable model_index.json ({e})") from e
    if found in _PIPELINE_CLASSES[cfg.backend]:
        return
    hint = next((b for b, names in _PIPELINE_CLASSES.items() if found in names), None)
    fix = f"set augment.backend={hint}" if hint else f"point augment.model at a {' or '.join(_PIPELINE_CLASSES[cfg.backend])}"
    raise AugmentError(f"augment.model = {cfg.model!r} holds a {found}, which augment.backend = {cfg.backend!r} cannot use; {fix}")


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype=`` to ``dtype=`` (the old name warns); older releases know only the old one."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _load_pipeline(cls, cfg: AugmentConfig, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained(augment.model)`` with errors that name the config field."""
    local = Path(cfg.model).expanduser()
    if local.is_dir():
        check_pipeline_dir(local, cfg)
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    try:
        kwargs[_dtype_kwarg()] = dtype
        return cls.from_pretrained(str(local) if local.exists() else cfg.model, **kwargs)
    except Exception as e:  # OSError, HFValidationError, LocalEntryNotFoundError, ...: all mean "cannot load this"
        where = "a local directory" if local.exists() else "not a local directory, and loading it as a Hugging Face hub id failed"
        raise AugmentError(
            f"augment.model = {cfg.model!r} could not be loaded as a {cls.__name__} (augment.backend = {cfg.backend!r}; {where}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Point augment.model at a pipeline directory written by "
            "save_pretrained (jobs/train_prior.py for local_prior) or a hub id (downloads need network access and HF_HUB_OFFLINE unset)"
        ) from e


def enable_xformers(pipe, device: torch.device) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        raise AugmentError("augment.xformers=true but xformers is not installed; pip install 'dda_ray[gpu]' or set augment.xformers=false") from e
    if device.type != "cuda":
        raise AugmentError(f"augment.xformers=true needs a CUDA device (xformers has no CPU kernels) but augment runs on {device}; set augment.xformers=false")
    pipe.enable_xformers_memory_efficient_attention()
