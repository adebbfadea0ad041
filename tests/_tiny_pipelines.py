"""Tiny random diffusers pipelines built offline from configs (the diffusers fast-test recipe).

Every builder saves with ``save_pretrained`` into a directory and returns it, so the tests load
them back the way users do: ``Augmenter`` -> ``from_pretrained(augment.model)``. Nothing is
downloaded (the tests run with ``HF_HUB_OFFLINE=1``); the CLIP tokenizer is built from a tiny
``vocab.json`` + ``merges.txt`` written to disk.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: nothing may be downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402

# A few characters plus the end-of-word variants that CLIP's BPE emits for them.
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def tiny_tokenizer(tmp: Path, max_length: int = 16):
    """A CLIPTokenizer from a local vocab.json + merges.txt (a handful of merges, no download)."""
    from transformers import CLIPTokenizer

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    merges = ["p h", "o t", "ph ot", "o f</w>"]
    vocab_tokens = _SPECIAL + _CHARS + [c + "</w>" for c in _CHARS] + ["ph", "ot", "phot", "of</w>"]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), model_max_length=max_length)


def _tiny_unet_cond(cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def build_tiny_sd_img2img(out_dir: Path, sample_size: int = 16) -> Path:
    """StableDiffusionImg2ImgPipeline: tiny UNet (8,16), VAE with scale factor 2, 2-layer CLIP text encoder.

    Resolution = ``sample_size * 2`` (16 -> 32 pixels).
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=16,
            vocab_size=100,
            projection_dim=16,
        )
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(out_dir.parent / f"{out_dir.name}-tok"),
        unet=_tiny_unet_cond(cross_attention_dim=16, sample_size=sample_size),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_sd_image_variations(out_dir: Path, sample_size: int = 16) -> Path:
    """StableDiffusionImageVariationPipeline: tiny UNet conditioned on a tiny CLIP vision projection."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = StableDiffusionImageVariationPipeline(
        vae=_tiny_vae(),
        image_encoder=image_encoder,
        unet=_tiny_unet_cond(cross_attention_dim=16, sample_size=sample_size),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_prior(out_dir: Path, num_classes: int = 4, image_size: int = 16) -> Path:
    """An untrained class-conditional local prior (UNet2DModel (8,16), no attention) + DDIM."""
    from dda_ray.augment.prior import build_prior_pipeline

    torch.manual_seed(0)
    pipe = build_prior_pipeline(num_classes=num_classes, image_size=image_size, channels=(8, 16), layers_per_block=1, attention=False)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_backend_pipelines(root: Path, num_classes: int = 4, image_size: int = 16) -> dict[str, Path]:
    """The three augmentation backends' tiny pipelines under ``root``, by backend name (one thread)."""
    with single_thread():
        return {
            "local_prior": build_tiny_prior(root / "prior", num_classes=num_classes, image_size=image_size),
            "sd_img2img": build_tiny_sd_img2img(root / "img2img"),
            "sd_image_variations": build_tiny_sd_image_variations(root / "variations"),
        }


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 NHWC images (blurred noise: closer to real images than white noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 3, size // 4, size // 4)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


@contextlib.contextmanager
def single_thread():
    """One torch thread while a test runs: on 2 shared cores, 2 threads thrash (10x slower) under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def offline(monkeypatch) -> None:
    """Force Hugging Face offline mode for this test even if huggingface_hub was imported earlier."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
