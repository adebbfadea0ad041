"""Banks of natural-image crops: transfer rows that are not the teacher's data (``distill.extra_banks``).

:func:`write_crop_bank` writes ``num_images`` random resized crops of the photos a local prior is
trained on (``augment.prior_source``: ``photos``, the photographs shipped inside installed packages,
or ``folder``: the user's own unlabeled images), with the crop settings of ``augment.prior_*``, in
the bank format of :mod:`dda_ray.data.bank`: each row carries the teacher's logits, its pooled
embedding (the cosine filter's reference) and its argmax as the label (the CE term's target). A run
adds such a bank to its KD pool with ``distill.extra_banks=[DIR]``:

* beside the synthetic bank: the transfer set gains natural images without a diffusion model (the
  ``photos`` control of ``benchmarks/accuracy.py``);
* alone (``synthesis.init_rounds=0 synthesis.rounds_per_epoch=0``): KD from crops of a few photos,
  the One-Image-KD baseline (``photo_kd``).

Crops are drawn from a generator seeded by ``seed``, in files of ``CHUNK`` rows (``round-*.parquet``,
ids ``crop-s{seed}-{index}``); a bank cut off half-way is completed by calling again with the same
arguments, and one already complete is left as it is. Files record the teacher's fingerprint
(``provenance.teacher``): a run refuses an extra bank labelled by another teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.bank import BankBatch, bank_files, check_provenance, read_bank, read_provenance, round_of, write_round
from ..progress import bar as progress_bar

CHUNK = 4096  # crops per file


def crop_provenance(cfg: Config, teacher_fingerprint: str, seed: int, num_images: int) -> dict[str, str]:
    aug = cfg.augment
    settings = f"source={aug.prior_source} folder={aug.prior_folder} size={cfg.data.image_size} scale={list(aug.prior_crop_scale)} jitter={aug.prior_color_jitter} hflip={aug.prior_hflip} seed={seed} n={num_images}"
    return {"teacher": teacher_fingerprint, "crops": settings}


def write_crop_bank(cfg: Config, out_dir: str | Path, num_images: int, seed: int, progress: bool = True) -> Path:
    """Write (or complete) a bank of ``num_images`` teacher-labelled crops under ``out_dir``; returns it.

    The images come from ``cfg.augment.prior_source`` (``photos`` or ``folder``) with its crop
    settings; ``cfg.teacher`` labels them. Never reads ``cfg.data.path``."""
    from ..models.checkpoint import fingerprint, load_teacher
    from ..synthesis.synthesizer import teacher_outputs
    from .prior_sources import MAX_SIDE_FACTOR, load_folder_images, load_packaged_photos, random_resized_crops

    aug = cfg.augment
    if aug.prior_source not in ("photos", "folder"):
        raise ConfigError(f"a crop bank is cut from photos or a folder of images; augment.prior_source = {aug.prior_source!r}")
    if num_images < 1:
        raise ConfigError(f"a crop bank needs num_images >= 1, got {num_images}")
    teacher, normalize, _ = load_teacher(cfg)
    provenance = crop_provenance(cfg, fingerprint(teacher), seed, num_images)
    out_dir = Path(out_dir)
    chunks = math.ceil(num_images / CHUNK)
    done = set()
    for path in bank_files(out_dir):
        check_provenance(path, provenance)
        done.add(round_of(path))
    todo = [c for c in range(chunks) if c not in done]
    if not todo:
        return out_dir
    size = cfg.data.image_size
    if aug.prior_source == "folder":
        if aug.prior_folder is None:
            raise ConfigError("augment.prior_source = 'folder' but augment.prior_folder is not set")
        images = load_folder_images(aug.prior_folder, MAX_SIDE_FACTOR * size).images
    else:
        images = load_packaged_photos(MAX_SIDE_FACTOR * size).images
    for c in progress_bar(todo, desc="crop bank", unit="file", disable=not progress):
        n = min(CHUNK, num_images - c * CHUNK)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + c)  # each file its own stream: a resumed bank equals one made in one go
        crops = random_resized_crops(
            images, n, size, gen, scale=tuple(aug.prior_crop_scale), hflip=aug.prior_hflip, jitter=aug.prior_color_jitter
        ).images
        logit, emb = teacher_outputs(teacher, normalize, crops)
        batch = BankBatch(
            ids=np.array([f"crop-s{seed}-{c * CHUNK + i:07d}" for i in range(n)]),
            images=crops.numpy(),
            labels=logit.argmax(1).astype(np.int64),
            teacher_logits=logit,
            teacher_embedding=emb,
            rounds=np.full(n, c, dtype=np.int32),
            seeds=np.full(n, seed, dtype=np.int64),
        )
        write_round(out_dir, batch, c, provenance)
    return out_dir


def check_extra_banks(dirs: list[str], teacher_fingerprint: str | None = None) -> None:
    """Each of ``distill.extra_banks`` holds bank files, none labelled by another teacher (a
    ConfigError otherwise); reads only the files' metadata."""
    for d in dirs:
        files = bank_files(d)
        if not files:
            raise ConfigError(f"distill.extra_banks: {d!r} holds no bank files (round-*.parquet)")
        if teacher_fingerprint is not None:
            for f in files:
                found = read_provenance(f).get("teacher")
                if found is not None and found != teacher_fingerprint:
                    raise ConfigError(
                        f"distill.extra_banks: {f} was labelled by another teacher ({found}; this run's is {teacher_fingerprint}); rebuild it"
                    )


def read_extra_banks(dirs: list[str], teacher_fingerprint: str | None = None) -> BankBatch | None:
    """The rows of ``distill.extra_banks`` (None when there are none), after :func:`check_extra_banks`."""
    check_extra_banks(dirs, teacher_fingerprint)
    return BankBatch.concat([read_bank(d) for d in dirs]) if dirs else None


__all__ = ["CHUNK", "check_extra_banks", "crop_provenance", "read_extra_banks", "write_crop_bank"]
