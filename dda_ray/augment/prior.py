"""The local diffusion prior: a small class-conditional pixel-space DDPM.

:func:`train_prior` never reads the configured dataset (``data.path``, the teacher's data): it
trains on one :class:`~dda_ray.augment.prior_sources.PriorSource` (``augment.prior_source``): the synthetic
bank, an unlabeled image folder, or natural photographs shipped inside installed packages
(``dda_ray/augment/prior_sources.py``), whose ``sample`` callable supplies every batch. The model is a diffusers
``UNet2DModel`` with ``num_class_embeds = num_classes + 1`` (the last index is the null class)
trained with the DDPM epsilon-prediction MSE; label dropout sends a fraction of the labels to
the null class so one network learns both branches of classifier-free guidance. A source without
labels (``augment.prior_labels=none``) trains the null class only; the saved prior then maps
every class to the null class's embedding, so class labels and guidance change nothing. It is saved as a
:class:`~dda_ray.augment.pipeline_class_img2img.ClassConditionalImg2ImgPipeline` (``save_pretrained``), which the
``local_prior`` backend of :class:`~dda_ray.augment.augmenter.Augmenter` loads with ``from_pretrained``.

Sizing (DESIGN.md, this 2-core CPU): channels (32, 64, 64) without attention trains at ~89 img/s,
so the default 1,000 steps of 64 images take about 12 minutes; (32, 32, 64) is ~35 % faster.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel

from ..config import AugmentConfig, ConfigError
from ..data.transforms import to_float
from ..progress import bar as progress_bar
from ..runtime import append_jsonl, atomic_write, resolve_device
from .pipeline_class_img2img import ClassConditionalImg2ImgPipeline
from .prior_sources import PriorSource, bank_source

__all__ = ["build_prior_unet", "build_prior_scheduler", "build_prior_pipeline", "train_prior"]

LOSS_LOG = "loss.jsonl"
TRAINING_INFO = "training.json"


def build_prior_unet(
    num_classes: int,
    image_size: int = 32,
    channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = False,
) -> UNet2DModel:
    """A ``UNet2DModel`` with one class embedding per class plus the null class (index ``num_classes``).

    ``attention`` adds self-attention at the second resolution (16x16 for 32x32 images) and in
    the mid block.
    """
    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[1] = "AttnDownBlock2D"
        up[n - 2] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=math.gcd(8, *channels),
        attention_head_dim=8,
        add_attention=attention,
        num_class_embeds=num_classes + 1,
    )


def build_prior_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """DDIM over the cosine (``squaredcos_cap_v2``) schedule: better suited to small images than linear betas.

    ``steps_offset=1`` with "leading" spacing as in diffusers' img2img; ``set_alpha_to_one`` makes
    the last step return the clean prediction (pixel space: no VAE to absorb residual noise).
    """
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_prior_pipeline(
    num_classes: int,
    image_size: int = 32,
    channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    num_train_timesteps: int = 1000,
) -> ClassConditionalImg2ImgPipeline:
    unet = build_prior_unet(num_classes, image_size, channels, layers_per_block, attention)
    return ClassConditionalImg2ImgPipeline(unet=unet, scheduler=build_prior_scheduler(num_train_timesteps))


def _save_atomically(pipe: ClassConditionalImg2ImgPipeline, output_dir: Path, extra_files: dict[str, Path | str]) -> None:
    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, src in extra_files.items():
            if isinstance(src, Path):
                if src.exists():
                    shutil.copyfile(src, tmp / name)
            else:
                (tmp / name).write_text(src)

    atomic_write(output_dir, write, directory=True)


def _unconditional_class_embeddings(unet: UNet2DModel, num_classes: int) -> None:
    """Copy the null class's embedding to every class: a prior trained without labels then
    treats any class label as unconditional (conditional and unconditional predictions agree)."""
    with torch.no_grad():
        weight = unet.class_embedding.weight
        weight[:num_classes] = weight[num_classes]


def train_prior(
    source: PriorSource | str | Path,
    output_dir: str | Path,
    cfg: AugmentConfig,
    *,
    num_classes: int | None = None,
    log_path: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """Train the local prior on ``source``; save the pipeline to ``output_dir``.

    ``source`` is a :class:`~dda_ray.augment.prior_sources.PriorSource` (:func:`~dda_ray.augment.prior_sources.build_prior_source`
    makes the configured one) or a synthetic bank directory (its labels, ``augment.prior_hflip``).
    Hyper-parameters are the ``augment.prior_*`` fields. The loss log (JSON lines: step, loss
    averaged since the previous line, lr, img/s) goes to ``log_path`` while training (default:
    a temporary file) and is copied to ``<output_dir>/loss.jsonl``; ``training.json`` records the
    run, the source, its image list and the label mode. The directory is replaced atomically, so
    a crash never leaves a half-written prior. ``on_log`` gets each loss-log line as it is written
    (the job sends them to MLflow). Returns the training summary.
    """
    cfg.validate("augment")
    output_dir = Path(output_dir)
    if not isinstance(source, PriorSource):
        source = bank_source(source, cfg.prior_hflip, "bank" if cfg.prior_labels == "teacher" else "none")
    size = source.image_size
    if num_classes is None:
        num_classes = source.num_classes if source.num_classes is not None else (source.label_range[1] + 1 if source.label_range else None)
    if num_classes is None:
        raise ConfigError("the prior's class count is unknown; pass num_classes (data.num_classes)")
    if source.label_range is not None and source.label_mode != "none":
        low, high = source.label_range
        if high >= num_classes or low < 0:
            raise ConfigError(f"bank labels span {low}..{high} but num_classes = {num_classes}")
    multiple = 2 ** (len(cfg.prior_channels) - 1)
    if size % multiple:
        raise ConfigError(f"augment.prior_channels has {len(cfg.prior_channels)} blocks: image size {size} must be a multiple of {multiple}")

    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pipe = build_prior_pipeline(num_classes, size, cfg.prior_channels, cfg.prior_layers_per_block, cfg.prior_attention, cfg.prior_train_timesteps)
    # channels_last: the UNet's convolutions run about 1.15x faster on CPU (and on tensor-core GPUs);
    # the saved weights are turned back to the default layout below.
    unet, scheduler = pipe.unet.to(dev, memory_format=torch.channels_last), pipe.scheduler
    unet.train()
    # EMA decay min(prior_ema, (1 + k) / (10 + k)) after update k >= 1 (the first copies the weights)
    ema = EMAModel(unet.parameters(), decay=cfg.prior_ema) if cfg.prior_ema > 0 else None
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.prior_lr, weight_decay=cfg.prior_weight_decay)
    # Linear warmup over 5 % of the steps, then constant. The schedule starts one step in (last_epoch=0), so the
    # first update already runs at lr / warmup rather than 0: update k uses lr * min(1, (k + 1) / warmup).
    warmup = max(1, int(0.05 * cfg.prior_steps))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    sched = get_constant_schedule_with_warmup(opt, warmup, last_epoch=0)

    alphas = scheduler.alphas_cumprod.to(dev)
    null = num_classes
    bs = cfg.prior_batch_size

    tmp_log = None
    if log_path is None:
        fd, tmp_log = tempfile.mkstemp(prefix="prior-loss-", suffix=".jsonl")
        os.close(fd)
        log_path = tmp_log
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")

    first_loss = last_loss = float("nan")
    running, count, t_log, t0 = 0.0, 0, time.perf_counter(), time.perf_counter()
    bar = progress_bar(range(cfg.prior_steps), desc="prior", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images, y = source.sample(bs, gen)
        x0 = to_float(images).mul_(2).sub_(1)  # (bs, 3, H, W) in [-1, 1]
        if y is None:  # unconditional source: the null class only
            y = torch.full((bs,), null, dtype=torch.int64)
        elif cfg.prior_label_dropout > 0:
            y[torch.rand(bs, generator=gen) < cfg.prior_label_dropout] = null
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=gen)
        x0, noise = (v.to(dev, memory_format=torch.channels_last) for v in (x0, noise))
        y, t = y.to(dev), t.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        value = float(loss.detach())
        running, count = running + value, count + 1
        if step == 0:
            first_loss = value
        if (step + 1) % cfg.prior_log_every == 0 or step + 1 == cfg.prior_steps:
            now = time.perf_counter()
            last_loss = running / count
            line = {"step": step + 1, "loss": last_loss, "lr": sched.get_last_lr()[0], "img_per_s": count * bs / max(now - t_log, 1e-9)}
            append_jsonl(log_path, line)
            if on_log is not None:
                on_log(line)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            running, count, t_log = 0.0, 0, now

    if ema is not None:
        ema.copy_to(unet.parameters())
    final = unet.to(memory_format=torch.contiguous_format)
    final.eval()
    if source.label_mode == "none":
        _unconditional_class_embeddings(final, num_classes)
    pipe = ClassConditionalImg2ImgPipeline(unet=final.to("cpu"), scheduler=scheduler)
    summary = {
        **source.describe(),
        "image_size": int(size),
        "num_classes": int(num_classes),
        "steps": cfg.prior_steps,
        "batch_size": bs,
        "lr": cfg.prior_lr,
        "channels": list(cfg.prior_channels),
        "attention": cfg.prior_attention,
        "label_dropout": cfg.prior_label_dropout,
        "ema": cfg.prior_ema,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "seconds": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in final.parameters()),
    }
    try:
        _save_atomically(pipe, output_dir, {LOSS_LOG: log_path, TRAINING_INFO: json.dumps(summary, indent=2)})
    finally:
        if tmp_log is not None:
            Path(tmp_log).unlink(missing_ok=True)
    return summary
