"""Diffusion augmentation (DDA): one :class:`Augmenter` over three diffusers backends.

Every backend turns a synthetic image into variations by denoising with classifier-free guidance
``augment.guidance`` over a DDIM schedule of ``augment.steps`` steps. Where the denoising starts
is ``augment.strength``:

* ``strength < 1`` (every backend): SDEdit-style image-to-image. The image (or its VAE latent) is
  pushed a fraction ``strength`` into the noise schedule and denoised back (:func:`sdedit`).
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
                       (pixel space; ``dda_ray/prior.py``)
``sd_img2img``         ``StableDiffusionImg2ImgPipeline``          ``prompt_template`` text
``sd_image_variations``  ``StableDiffusionImageVariationPipeline``   CLIP image embedding (paper)
=====================  =========================================  ==============================

One denoising loop (:func:`denoise`, behind :func:`sdedit`) serves all three, so ``strength``, the
DDIM schedule and the seeding mean the same everywhere. The SD backends use the pipeline's
components (VAE, encoders, UNet) rather than its ``__call__``: the stock image-variation pipeline
can only start from pure noise, and owning the loop lets every sample draw its noise from its own
generator.

Determinism: variation ``k`` of image ``id`` draws its noise from a CPU ``torch.Generator`` seeded
by :func:`variation_seed` (``augment.seed``, ``id``, ``k``) -- a stable hash, not Python's
``hash()``. DDIM with ``eta = 0`` adds no other randomness and the VAE latent is its mean, so a
rerun or a restarted actor reproduces a variation whatever batch it lands in.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .config import AugmentConfig, ConfigError
from .data.transforms import to_float, to_uint8

__all__ = [
    "AugmentError",
    "Augmenter",
    "ClassConditionalImg2ImgPipeline",
    "decode_image_column",
    "denoise",
    "encode_image_column",
    "sdedit",
    "sdedit_timesteps",
    "stack_vector_column",
    "variation_seed",
]

ORIGINAL = -1  # ``variation`` of an original image's row (Augmenter(include_original=True))

# model_index.json ``_class_name`` each backend can load (from_pretrained of a compatible class works).
_PIPELINE_CLASSES = {
    "local_prior": ("ClassConditionalImg2ImgPipeline",),
    "sd_img2img": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sd_image_variations": ("StableDiffusionImageVariationPipeline",),
}


class AugmentError(ConfigError):
    """The augmentation model cannot be loaded or run with this configuration."""


# ----------------------------------------------------------------- seeding and the shared loop
def variation_seed(seed: int, image_id: str, k: int) -> int:
    """A 63-bit seed for variation ``k`` of ``image_id``: stable across processes and machines."""
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


def _guided(model_out: torch.Tensor, guidance: float) -> torch.Tensor:
    uncond, cond = model_out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)


# ----------------------------------------------------------------- the local prior pipeline
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
        return _guided(out, guidance_scale)

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


# ----------------------------------------------------------------- backends
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
        x0 = _resize(x, (size, size)).mul(2).sub(1).repeat_interleave(v, 0).to(self.dtype)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device).repeat_interleave(v)
        noise = per_sample_noise(generators, x0.shape[1:], self.device, self.dtype)
        out = pipe(x0, y, strength=cfg.strength, guidance_scale=cfg.guidance, num_inference_steps=cfg.steps, noise=noise).images
        return _resize(out.float(), tuple(x.shape[-2:]))


class _LatentBackend(_Backend):
    """Shared SD machinery: resize up, VAE-encode (latent mean), SDEdit in latent space, decode, resize down.

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
            big = _resize(x, (self.resolution, self.resolution)).to(self.dtype)
            latents = vae.encode(big * 2 - 1).latent_dist.mode()
            latents = ((latents - shift) * vae.config.scaling_factor).repeat_interleave(v, 0)
        cond, uncond = self.conditions(x, labels)
        cond, uncond = cond.repeat_interleave(v, 0), uncond.repeat_interleave(v, 0)
        guided = cfg.guidance != 1.0
        hidden = torch.cat([uncond, cond]) if guided else cond

        def predict(xt, t):
            inp = torch.cat([xt, xt]) if guided else xt
            out = pipe.unet(inp, t, encoder_hidden_states=hidden, return_dict=False)[0]
            return _guided(out, cfg.guidance) if guided else out

        if self.from_noise:
            # The stock pipeline's prepare_latents + denoising loop: N(0, 1) latents times init_noise_sigma, every timestep.
            noise = per_sample_noise(generators, self.latent_shape(), self.device, self.dtype)
            self.scheduler.set_timesteps(cfg.steps, device=self.device)
            latents = denoise(self.scheduler, noise * self.scheduler.init_noise_sigma, self.scheduler.timesteps, predict)
        else:
            noise = per_sample_noise(generators, latents.shape[1:], self.device, self.dtype)
            timesteps = sdedit_timesteps(self.scheduler, cfg.steps, cfg.strength, self.device)
            latents = sdedit(self.scheduler, latents, noise, timesteps, predict)
        images = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
        return _resize((images.float() / 2 + 0.5).clamp(0, 1), tuple(x.shape[-2:])).clamp(0, 1)


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
        return (_resize(x.float(), self.clip_size).clamp(0, 1) - self.clip_mean) / self.clip_std

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


_BACKENDS: dict[str, type[_Backend]] = {
    "local_prior": _LocalPriorBackend,
    "sd_img2img": _SDImg2ImgBackend,
    "sd_image_variations": _SDImageVariationsBackend,
}


def _check_pipeline_dir(path: Path, cfg: AugmentConfig) -> None:
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
        _check_pipeline_dir(local, cfg)
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


def _enable_xformers(pipe, device: torch.device) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        raise AugmentError("augment.xformers=true but xformers is not installed; pip install 'dda_ray[gpu]' or set augment.xformers=false") from e
    if device.type != "cuda":
        raise AugmentError(f"augment.xformers=true needs a CUDA device (xformers has no CPU kernels) but augment runs on {device}; set augment.xformers=false")
    pipe.enable_xformers_memory_efficient_attention()


# ----------------------------------------------------------------- image columns (Ray Data batches)
def decode_image_column(column, image_shape: Sequence[int] | None = None) -> tuple[np.ndarray, bool]:
    """An ``image`` column -> (uint8 NHWC array, whether it held bytes).

    Accepts a uint8 (N, H, W, C) array, a sequence of HWC arrays, or raw bytes per image (the
    bank's encoding; shape from ``image_shape``, else a square RGB image is assumed).
    """
    if isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.ndim == 4:
        return column, False
    values = list(column)
    if not values:
        shape = tuple(image_shape) if image_shape else (0, 0, 3)
        return np.zeros((0, *shape), dtype=np.uint8), False
    if isinstance(values[0], (bytes, bytearray, memoryview)):
        n_bytes = len(values[0])
        if image_shape is None:
            side = math.isqrt(n_bytes // 3)
            if side * side * 3 != n_bytes:
                raise ValueError(f"cannot infer the shape of a {n_bytes}-byte image; pass image_shape=(H, W, C)")
            image_shape = (side, side, 3)
        return np.frombuffer(b"".join(bytes(v) for v in values), dtype=np.uint8).reshape(len(values), *image_shape), True
    return np.stack([np.asarray(v, dtype=np.uint8) for v in values]), False


def _writable(a: np.ndarray) -> np.ndarray:
    """Ray Data batches and frombuffer arrays are read-only; torch.from_numpy warns on those."""
    return a if a.flags.writeable else a.copy()


def encode_image_column(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> object array of raw bytes (the bank's ``image`` encoding)."""
    out = np.empty(len(images), dtype=object)
    out[:] = [img.tobytes() for img in np.ascontiguousarray(images)]
    return out


def stack_vector_column(column) -> np.ndarray:
    """A list column (2-D array, or object array of 1-D arrays) -> 2-D float32 array."""
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in column]) if len(column) else np.zeros((0, 0), np.float32)
    return arr.astype(np.float32, copy=False)


# ----------------------------------------------------------------- the Augmenter
class Augmenter:
    """``num_variations`` diffusion variations of each image, deterministic per (seed, id, k).

    Direct use: ``Augmenter(cfg.augment, class_names)(images_uint8_nhwc, labels, ids)``.
    As a Ray Data actor: ``ds.map_batches(Augmenter, fn_constructor_args=(cfg.augment,),
    fn_constructor_kwargs={"class_names": names, "include_original": True}, batch_size=...,
    compute=ray.data.ActorPoolStrategy(size=n), num_gpus=...)``: a dict batch (columns ``id``,
    ``image`` as bytes or arrays, ``label``, optional ``teacher_embedding``) goes through
    :meth:`augment_batch`.

    Args:
        cfg: the ``augment`` section.
        class_names: class names for ``sd_img2img`` prompts (index = label).
        include_original: batch mode also emits each original as a row with ``variation = -1``
            (``id = parent_id``), so originals and their variations stream together.
        with_parent_image: batch mode adds a ``parent_image`` column (lets the filter recompute
            the reference embedding when the bank's is not wanted).
        image_shape: (H, W, C) of byte-encoded images; None infers square RGB.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        class_names: Sequence[str] | None = None,
        *,
        include_original: bool = False,
        with_parent_image: bool = False,
        image_shape: Sequence[int] | None = None,
    ):
        from .runtime import resolve_device

        cfg.validate("augment")
        self.cfg = cfg
        self.class_names = list(class_names) if class_names is not None else None
        self.include_original = include_original
        self.with_parent_image = with_parent_image
        self.image_shape = tuple(image_shape) if image_shape else None
        self.device = resolve_device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        if self.device.type == "cpu" and dtype != torch.float32:
            warnings.warn(f"augment.dtype = {cfg.dtype!r} on CPU: running in float32 (half precision is for GPUs)", stacklevel=2)
            dtype = torch.float32
        self.dtype = dtype
        self.backend = _BACKENDS[cfg.backend](cfg, self.device, dtype, self.class_names)
        if cfg.xformers:
            _enable_xformers(self.backend.pipe, self.device)

    @property
    def pipeline(self) -> DiffusionPipeline:
        return self.backend.pipe

    def __call__(self, images, labels=None, ids=None) -> dict[str, np.ndarray]:
        if isinstance(images, dict):
            return self.augment_batch(images)
        if labels is None or ids is None:
            raise TypeError("Augmenter(images, labels, ids): labels and ids are required (or pass one dict batch)")
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
                x = to_float(_writable(images[sl])).to(self.device)
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

    def augment_batch(self, batch: dict) -> dict[str, np.ndarray]:
        """Ray Data adapter: dict batch in, dict batch out (images keep the input's encoding)."""
        for col in ("id", "image", "label"):
            if col not in batch:
                raise KeyError(f"augment batch lacks column {col!r}; has {sorted(batch)}")
        images, as_bytes = decode_image_column(batch["image"], self.image_shape)
        ids = np.asarray(batch["id"]).astype(str)
        labels = np.asarray(batch["label"], dtype=np.int64)
        out = self.augment(images, labels, ids)
        v = self.cfg.num_variations
        parent_index = np.repeat(np.arange(len(ids)), v)
        if "teacher_embedding" in batch:
            out["parent_embedding"] = stack_vector_column(batch["teacher_embedding"])[parent_index]
        if self.with_parent_image:
            out["parent_image"] = images[parent_index]
        if self.include_original:
            orig = {"id": ids, "parent_id": ids, "image": images, "label": labels, "variation": np.full(len(ids), ORIGINAL, np.int64)}
            if "parent_embedding" in out:
                orig["parent_embedding"] = stack_vector_column(batch["teacher_embedding"])
            if self.with_parent_image:
                orig["parent_image"] = images
            out = {k: np.concatenate([orig[k], out[k]]) for k in out}
        if as_bytes:
            out["image"] = encode_image_column(out["image"])
            if "parent_image" in out:
                out["parent_image"] = encode_image_column(out["parent_image"])
        return out
