"""Stable Diffusion 1.x pipelines at their published sizes, with random weights, built offline (issue #27).

The hub checkpoints the SD backends are meant for cannot be downloaded everywhere, but their
architectures can be rebuilt from their configs. :func:`build_sd_pipelines` writes two pipeline
folders (``model_index.json`` + one folder per component, safetensors weights) that load through the
project's own path, ``augment.backend=<name> augment.model=<folder>``, as a hub id would:

* ``sd_image_variations``: ``StableDiffusionImageVariationPipeline`` as
  ``lambdalabs/sd-image-variations-diffusers`` ships it: SD 1.x UNet (859.5 M parameters, cross-attention
  width 768), SD VAE (83.7 M, latent scaling 0.18215), CLIP ViT-L/14 vision tower with projection
  (304.0 M: hidden 1024, 24 layers, patch 14, image 224, projection 768) + its ``CLIPImageProcessor``,
  PNDM scheduler (``clip_sample`` false, as the hub's current config).
* ``sd_img2img``: ``StableDiffusionImg2ImgPipeline`` as ``stable-diffusion-v1-5`` ships it: the same UNet
  and VAE, CLIP ViT-L/14 text encoder (123.1 M: hidden 768, 12 layers, 77 positions, vocabulary 49408),
  a ``CLIPTokenizer`` built from a small local vocabulary (no download; unknown words become
  ``<|endoftext|>``), PNDM scheduler; no safety checker.

The config values are those of the hub repositories' ``config.json`` files. The UNet and VAE are built
once and shared: the second folder hard-links their weight files (a copy where links are refused).
``size="tiny"`` keeps every architecture's shape (block types, depth pattern, CLIP processor) at tiny
widths, for seconds-long CPU runs of the same code.

Random weights (:func:`random_init_`): built on the meta device and filled from one seeded pool of
normal draws, scaled per layer; the outputs mean nothing, their shapes, dtypes, cost and determinism do.

    python benchmarks/sd_full_size.py OUT_DIR [--size full|tiny] [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch

BACKEND_NAMES = ("sd_image_variations", "sd_img2img")
SIZES = ("full", "tiny")

# UNet2DConditionModel of SD 1.x (stable-diffusion-v1-5/unet/config.json; lambdalabs' is the same shape).
SD1_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# AutoencoderKL of SD 1.x (vae/config.json); scaling_factor is the class default, 0.18215, written out here.
SD1_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIPVisionModelWithProjection of openai/clip-vit-large-patch14 (lambdalabs' image_encoder/config.json).
CLIP_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
}
# CLIPTextModel of stable-diffusion-v1-5/text_encoder/config.json (its legacy bos/eos/pad ids included).
CLIP_L14_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# scheduler/scheduler_config.json of both hub repositories (lambdalabs added clip_sample=False for DDIM).
SD1_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# feature_extractor/preprocessor_config.json: resize the short side to 224 (bicubic), centre-crop 224, CLIP statistics.
CLIP_IMAGE_PROCESSOR = {
    "crop_size": 224,
    "size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

# size="tiny": the same architectures at widths that run in milliseconds (block types and depth kept).
_TINY = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "attention_head_dim": 2, "layers_per_block": 1, "norm_num_groups": 8,
             "cross_attention_dim": 32, "sample_size": 8},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 28,
               "projection_dim": 32},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32},
    "processor": {"crop_size": 28, "size": 28},
}  # fmt: skip


def configs(size: str = "full") -> dict[str, dict]:
    """The component configs of one size: ``unet``, ``vae``, ``vision``, ``text``, ``processor``, ``scheduler``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    full = {
        "unet": SD1_UNET,
        "vae": SD1_VAE,
        "vision": CLIP_L14_VISION,
        "text": CLIP_L14_TEXT,
        "processor": CLIP_IMAGE_PROCESSOR,
        "scheduler": SD1_SCHEDULER,
    }
    shrink = _TINY if size == "tiny" else {}
    return {name: {**cfg, **shrink.get(name, {})} for name, cfg in full.items()}


def local_clip_tokenizer(folder: Path, words: tuple[str, ...] = (), max_length: int = 77):
    """A ``CLIPTokenizer`` from a vocabulary written to ``folder``: the two special tokens, lower-case
    letters and digits (as word pieces and word ends) and ``words`` (lower-case letters and digits), each
    with the merges that build it (whole unless it repeats a pair: "pepper" splits); any other text
    becomes ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    merges: list[str] = []
    for word in sorted(set(words)):
        piece = word[0]  # one merge per added character: "c a", "ca t</w>" builds "cat</w>"
        for i, ch in enumerate(word[1:], start=1):
            end = "</w>" if i == len(word) - 1 else ""
            if f"{piece} {ch}{end}" not in merges:
                merges.append(f"{piece} {ch}{end}")
            piece += ch + end
            if piece not in tokens:
                tokens.append(piece)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)  # file names both transformers 4 and 5 read


NETWORKS = ("unet", "vae", "image_encoder", "text_encoder")
_NEEDS = {"sd_image_variations": ("unet", "vae", "image_encoder"), "sd_img2img": ("unet", "vae", "text_encoder")}


def _construct(size: str, dtype: torch.dtype = torch.float32, names: tuple[str, ...] = NETWORKS) -> dict[str, torch.nn.Module]:
    """The networks ``names`` on the meta device (no memory, no initialisation), in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = configs(size)
    make = {
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"])),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text"])),
    }
    with torch.device("meta"):
        nets = {name: make[name]() for name in names}
    # nn.Module.to, not diffusers' override: that one warns about fp32-only modules on every cast (SD 1.x has none)
    return {name: torch.nn.Module.to(net, dtype).eval() for name, net in nets.items()}


_POOL = 1_048_573  # a prime: tiled pool slices line up with no row length


@torch.no_grad()
def random_init_(net: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Allocate a meta-device ``net`` on the CPU and fill it at memory speed.

    Weights: slices of one pool of N(0, 1) draws from ``generator``, each from its own random offset
    (tiled where longer), scaled by 1/sqrt(fan_in) (variance-preserving); norm layers weight 1, bias 0;
    biases 0. Drawing 1.4 G normal numbers one by one takes minutes on a loaded 2-core machine, a copy
    seconds; the weights are random enough for shapes, dtypes, cost and determinism.
    """
    net.to_empty(device="cpu")
    pools: dict[torch.dtype, torch.Tensor] = {}
    for module in net.modules():
        is_norm = isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm)
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                p.fill_(1.0 if is_norm and name == "weight" else 0.0)
                continue
            if p.dtype not in pools:
                pools[p.dtype] = torch.randn(_POOL, generator=generator).to(p.dtype)
            pool, flat, done = pools[p.dtype], p.view(-1), 0
            scale = (p[0].numel() if p.dim() > 1 else p.numel()) ** -0.5
            offset = int(torch.randint(_POOL, (), generator=generator))
            while done < flat.numel():  # one pass over the weight: pool slice times scale, written in place
                k = min(flat.numel() - done, _POOL - offset)
                torch.mul(pool[offset : offset + k], scale, out=flat[done : done + k])
                done, offset = done + k, 0
        for name, b in module.named_buffers(recurse=False):
            if name != "position_ids":  # CLIP's only buffer (not saved); anything else needs its own rule here
                raise RuntimeError(f"random_init_ does not know how to fill buffer {name!r} of {type(module).__name__}")
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return net


def build_components(
    size: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    words: tuple[str, ...] = ("a", "photo", "of"),
    scratch: Path | None = None,
    backends: tuple[str, ...] = BACKEND_NAMES,
) -> dict:
    """The components of the ``backends``' pipelines, random weights in ``dtype`` on the CPU (the UNet and
    VAE once); img2img's tokenizer needs a ``scratch`` folder for its vocabulary."""
    from diffusers import PNDMScheduler
    from transformers import CLIPImageProcessor

    unknown = set(backends) - set(BACKEND_NAMES)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; expected some of {BACKEND_NAMES}")
    cfg = configs(size)
    names = tuple(n for n in NETWORKS if any(n in _NEEDS[b] for b in backends))
    generator = torch.Generator().manual_seed(seed)
    parts: dict = {name: random_init_(net, generator) for name, net in _construct(size, dtype, names).items()}
    parts["scheduler"] = PNDMScheduler.from_config(cfg["scheduler"])  # from_config keeps clip_sample (unused by PNDM) in the config
    if "sd_image_variations" in backends:
        parts["feature_extractor"] = CLIPImageProcessor(**cfg["processor"])
    if "sd_img2img" in backends:
        if scratch is None:
            raise ValueError("sd_img2img's tokenizer needs a scratch folder for its vocabulary")
        parts["tokenizer"] = local_clip_tokenizer(scratch, words, max_length=cfg["text"]["max_position_embeddings"])
    return parts


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of the folder ``src`` whose files are hard links (copies where linking fails)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def build_sd_pipelines(
    root: str | Path,
    size: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    class_names: tuple[str, ...] = (),
    backends: tuple[str, ...] = BACKEND_NAMES,
) -> dict[str, Path]:
    """Write the pipeline folders under ``root`` (``root/<backend>``) and return them by backend name.

    ``dtype`` is the dtype the weights are stored in (``augment.dtype`` picks the one they are loaded in);
    ``class_names`` become whole tokens of the img2img tokenizer (``augment.prompt_template``'s words
    ``a photo of`` always are). The in-memory components are freed before returning.
    """
    from diffusers import StableDiffusionImageVariationPipeline, StableDiffusionImg2ImgPipeline

    root = Path(root)
    words = ("a", "photo", "of", *(w for name in class_names for w in re.findall(r"[a-z0-9]+", name.lower())))
    parts = build_components(size, seed, dtype, words, scratch=root / ".tokenizer-vocab", backends=backends)
    common = {
        "unet": parts["unet"],
        "vae": parts["vae"],
        "scheduler": parts["scheduler"],
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    out: dict[str, Path] = {}
    saved: Path | None = None  # the first folder written: the second links its unet/ and vae/
    for backend in backends:
        folder = root / backend
        if backend == "sd_image_variations":
            pipe = StableDiffusionImageVariationPipeline(
                image_encoder=parts["image_encoder"], feature_extractor=parts["feature_extractor"], **common
            )
            own = ("image_encoder", "feature_extractor", "scheduler")
        else:
            pipe = StableDiffusionImg2ImgPipeline(
                text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], feature_extractor=None, **common
            )
            own = ("text_encoder", "tokenizer", "scheduler")
        if saved is None:
            pipe.save_pretrained(folder, safe_serialization=True)
            saved = folder
        else:
            for name in own:
                getattr(pipe, name).save_pretrained(folder / name)
            for name in ("unet", "vae"):
                _link_tree(saved / name, folder / name)
            pipe.save_config(folder)  # model_index.json, as save_pretrained writes it last
        out[backend] = folder
        del pipe
    parts.clear()
    return out


def parameter_counts(size: str = "full") -> dict[str, int]:
    """Parameters per network, counted on the meta device (no memory, no initialisation)."""
    return {name: sum(p.numel() for p in net.parameters()) for name, net in _construct(size).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write sd_image_variations/ and sd_img2img/ into")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="dtype the weights are stored in")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for backend, folder in build_sd_pipelines(args.out, args.size, args.seed, getattr(torch, args.dtype)).items():
        print(f"{backend}: augment.backend={backend} augment.model={folder}")


if __name__ == "__main__":
    main()
