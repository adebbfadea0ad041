"""One prepared command for a GPU machine (issue #27): the throughput of every stage at the paper's sizes.

    python benchmarks/gpu_check.py                       # CUDA, full sizes: sized for at most 8 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --tiny --no-record   # every code path in seconds (the test suite)

Options: ``--device cuda|cpu``; ``--tiny`` (tiny SD pipelines and batches: checks the code, the numbers
mean nothing); ``--no-record``; ``--out FILE`` (default ``benchmarks/results/perf.jsonl``, appended with
``perf.py``'s ``record``: metric, value, unit, detail, commit, date, load); ``--sections`` (a subset of
peak, augment, filter, synthesis, kd, in that order); ``--budget-s`` (arms that would start after this many
seconds are skipped and say so; default 360 s: the last arm, compile, adds 1-2 minutes); ``--work-dir``.
Every figure is printed as one ``figure <section> <metric> = <value> <unit>`` line and recorded as
``gpu_check_<metric>`` with the device name (``torch.cuda.get_device_name``) in its detail.

Imports only torch, diffusers, transformers and the torch-only parts of dda_ray (no Ray, no MLflow:
the GPU machine we borrow has neither; docs/GPU.md says how to bring diffusers to it).

Sections:

  peak       the GPU's bf16 matmul peak: square bf16 ``torch.mm`` of side 8192 and 16384 in a timed loop
             (after a warm-up); the best TFLOP/s (2 n^3 per product). The reference for the UNet fraction.
  augment    ``sd_image_variations`` at the paper's settings (strength 1 = the stock image-variation
             pipeline from pure noise, guidance 3, 25 steps, 2 variations per parent) on a full-size
             random-weight SD 1.x pipeline written by ``sd_full_size.py`` (fp16 safetensors) and loaded
             through ``augment.model=<folder>`` by the project's ``Augmenter``; for ``augment.dtype``
             float16 and bfloat16, SDPA attention (xformers when it is installed), batches of 8-64
             variations per call: variations/s = batch / wall time of one ``Augmenter.augment`` call
             (CLIP, 25 guided UNet steps, VAE decode, resizes; CUDA synchronised). The UNet's achieved
             TFLOP/s = FLOPs of one UNet call x UNet calls / time inside the UNet's forward (CUDA events
             recorded by forward pre- and post-hooks, summed after the call), and its fraction of the
             measured bf16 peak. FLOPs of one UNet call: ``torch.utils.flop_counter.FlopCounterMode``
             around one forward of a meta-device twin of the loaded UNet
             (``UNet2DConditionModel.from_config(unet.config)`` under ``torch.device("meta")``: shapes only,
             no memory, no time) at that batch: 2 x batch rows (classifier-free guidance), latents of the
             pipeline's resolution (64x64 at 512 px), one image-embedding token. Convolutions and matmuls
             count 2 FLOPs per multiply-add; attention counts as SDPA's matmuls, whichever kernel (SDPA or
             xformers) runs it; norms, activations and the scheduler are not counted.
  filter     teacher embeddings/s of ``CosineFilter.embed`` (uint8 NHWC -> float, normalise, teacher
             forward, back to the host) with the paper's teacher WRN-40-2 (random weights), batch 256.
  synthesis  images/s of synthesis rounds at the paper's round sizes (configs/paper/cifar10_wrn40_2_wrn16_1.yaml:
             initial bank rounds of 200 images x 500 steps without the student, epoch rounds of 400 images
             x 200 steps with the rotation-adversarial term on a WRN-16-1 student), ``Synthesizer.run_round``:
             ``dda`` is timed at two short step counts and extrapolated linearly (round time = fixed cost +
             steps x per-step cost) to the paper's steps; ``fast`` (Fast-Datafree's settings, ``FAST`` below =
             benchmarks/accuracy.py's, 2 steps a round) is timed over whole rounds at the same round sizes.
             From those: the GPU-hours of the paper's whole synthesis schedule (400 initial rounds + 200
             epoch rounds), beside the synthesis hours the Fast-Datafree README publishes (REFERENCE below).
  kd         ``Distiller.train_step`` of the paper pair WRN-40-2 -> WRN-16-1 (dda rows: KL + CE + feature
             term, rotation-head step every KD step as the paper preset), batch 256 of random uint8
             images: img/s for fp32, ``distill.amp=bf16``, + ``channels_last``, + ``compile`` (inductor; the
             compile happens in the warm-up steps), each as a ratio to fp32.

Goals (docs/GPU.md): UNet >= 40 % of the measured bf16 peak at the best batch; the KD step with bf16
(+ channels_last, + compile) >= 2x its fp32 img/s. The script prints whether each was met. An arm that
raises (a batch that runs out of memory, a compile without a compiler) is printed with its traceback and
the next arm runs; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # dda_ray from this checkout (no install needed), sd_full_size and perf beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the pipelines are built here

SECTIONS = ("peak", "augment", "filter", "synthesis", "kd")
PAPER = ROOT / "configs/paper/cifar10_wrn40_2_wrn16_1.yaml"
# Fast-Datafree's settings, as benchmarks/accuracy.py's FAST (tests/test_gpu_check.py keeps the two equal).
FAST_STEPS = 2
FAST = [
    "synthesis.method=fast",
    f"synthesis.g_steps={FAST_STEPS}",
    f"synthesis.init_g_steps={FAST_STEPS}",
    "synthesis.lr_g=0.005",
    "synthesis.lr_z=0.015",
]
# Published synthesis GPU-hours, CIFAR-10 (Fast-Datafree README, via /work/shared/REFERENCE.md): not run here.
REFERENCE = {"CMI-500 (W40-2)": 13.3, "Fast-10 (W40-2)": 0.15, "CMI-500 (R34)": 19.0, "Fast-10 (R34)": 0.28, "DeepInv-2k (R34)": 42.1}
GOAL_UNET_FRACTION = 0.40
GOAL_KD_SPEEDUP = 2.0
KD_ARMS = {
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "bf16+channels_last": {"amp": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
# Modules the check needs beyond the standard library (docs/GPU.md: what to bring where one is missing).
NEEDED = ("torch", "numpy", "yaml", "tqdm", "pyarrow", "safetensors", "transformers", "diffusers", "PIL", "requests")


class Sizes(NamedTuple):
    """How big each section's work is: the paper's (``FULL``) or a few seconds on a CPU (``TINY``)."""

    sd: str  # sd_full_size size
    matmul: tuple[int, ...]
    matmul_iters: tuple[int, ...]
    aug_batches: tuple[int, ...]  # variations per Augmenter call
    aug_steps: int
    filter_images: int
    synth_images: tuple[int, int]  # images of an (initial-bank round, epoch round)
    synth_steps: tuple[int, int]  # dda: the two measured step counts
    fast_rounds: int
    kd_batch: int
    kd_steps: int
    kd_warmup: int


FULL = Sizes("full", (8192, 16384), (200, 40), (8, 16, 32, 64), 25, 16384, (200, 400), (10, 30), 3, 256, 30, 3)
TINY = Sizes("tiny", (128,), (3,), (2, 4), 2, 16, (8, 16), (1, 2), 1, 8, 2, 1)


class Clock:
    """Seconds since the start, against ``--budget-s``."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self, what: str) -> bool:
        if self.elapsed() <= self.budget_s:
            return False
        print(f"skipped {what}: {self.elapsed():.0f} s elapsed, over --budget-s {self.budget_s:.0f}", flush=True)
        return True


class Results:
    """Prints each figure as one ``figure`` line and appends it to the results file (perf.py's ``record``)."""

    def __init__(self, out: Path | None, common: dict):
        self.out, self.common, self.rows, self.failures = out, common, [], []

    def emit(self, section: str, metric: str, value: float, unit: str, **detail) -> None:
        self.rows.append((section, metric, value, unit, detail))
        keys = ("dtype", "batch", "arm", "method", "round", "unet_fraction_of_peak", "ratio_to_fp32")
        note = " ".join(f"{k}={_short(detail[k])}" for k in keys if k in detail)
        print(f"figure {section} {metric} = {value:.4g} {unit}  {note}".rstrip(), flush=True)
        if self.out is not None:
            from perf import record

            record(f"gpu_check_{metric}", value, unit, {**self.common, "section": section, **detail}, path=self.out)


@contextlib.contextmanager
def guarded(results: Results, what: str, device):
    """Run one section or arm; an error is printed and counted, and the next arm still runs (device time is scarce)."""
    try:
        yield
    except Exception as e:
        results.failures.append(f"{what}: {type(e).__name__}: {e}")
        print(f"error in {what}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        release(device)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device) -> str:
    import torch

    from dda_ray.runtime import cpu_description

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()


# ---------------------------------------------------------------- peak
def matmul_peak(device, sizes: Sizes) -> dict:
    """Best bf16 TFLOP/s of square matmuls (a warm-up product first at each size)."""
    import torch

    best = {"tflops": 0.0}
    for n, iters in zip(sizes.matmul, sizes.matmul_iters, strict=True):
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        for _ in range(3):
            torch.mm(a, b, out=c)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        sync(device)
        tflops = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "n": n, "iters": iters}
        del a, b, c
    release(device)
    return best


# ---------------------------------------------------------------- augment
class ForwardTimer:
    """Time spent inside a module's forward: CUDA events (or host clocks) from forward pre/post hooks."""

    def __init__(self, module, device):
        self.device, self.spans, self._open = device, [], None
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._end)]

    def _now(self):
        import torch

        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, *_):
        self._open = self._now()

    def _end(self, *_):
        self.spans.append((self._open, self._now()))

    def reset(self) -> None:
        self.spans = []

    def seconds(self) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            return sum(s.elapsed_time(e) for s, e in self.spans) / 1000
        return sum(e - s for s, e in self.spans)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def unet_flops(unet_config, batch: int, side: int) -> int:
    """FLOPs of one UNet forward at ``batch`` rows of ``side`` x ``side`` latents (meta device: no compute)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet_config)
        x = torch.empty(batch, twin.config.in_channels, side, side)
        hidden = torch.empty(batch, 1, twin.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            twin(x, torch.tensor(999), encoder_hidden_states=hidden)
    return int(counter.get_total_flops())


def augment_section(device, sizes: Sizes, work: Path, peak: float | None, results: Results, clock: Clock) -> None:
    import numpy as np
    import torch
    from sd_full_size import build_sd_pipelines

    from dda_ray.augment.augmenter import Augmenter
    from dda_ray.config import AugmentConfig

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    folder = build_sd_pipelines(work / "sd", sizes.sd, dtype=torch.float16 if cuda else torch.float32, backends=("sd_image_variations",))
    folder = folder["sd_image_variations"]
    print(f"built the {sizes.sd} SD image-variations pipeline in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)
    xformers = cuda and importlib.util.find_spec("xformers") is not None
    nv, guidance = 2, 3.0
    parents = np.random.default_rng(0).integers(0, 256, size=(max(sizes.aug_batches) // nv + 1, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(len(parents), dtype=np.int64)
    ids = np.array([f"r00000-s0-{i:05d}" for i in range(len(parents))])
    flops: dict[int, int] = {}
    for dtype in ("float16", "bfloat16") if cuda else ("float32",):
        if clock.over(f"augment {dtype}"):
            continue
        cfg = AugmentConfig(backend="sd_image_variations", model=str(folder), strength=1.0, guidance=guidance, steps=sizes.aug_steps,
                            num_variations=nv, batch_size=max(sizes.aug_batches), dtype=dtype, device=str(device), xformers=xformers)  # fmt: skip
        with guarded(results, f"augment {dtype}", device):
            _augment_sweep(Augmenter(cfg), cfg, device, sizes, (parents, labels, ids), flops, peak, results, clock)
        release(device)  # the Augmenter is gone: its pipeline's memory goes back before the next dtype loads


def _augment_sweep(aug, cfg, device, sizes: Sizes, data, flops: dict[int, int], peak: float | None, results: Results, clock: Clock) -> None:
    """The batch sweep of one Augmenter (one ``augment.dtype``): one timed call per batch size."""
    import torch

    parents, labels, ids = data
    cuda, nv = device.type == "cuda", cfg.num_variations
    unet = aug.pipeline.unet
    side = aug.backend.latent_shape()[-1]
    timer = ForwardTimer(unet, device)
    aug(parents[:1], labels[:1], ids[:1])  # warm-up: first-call kernel selection, allocator growth
    for batch in sizes.aug_batches:
        if clock.over(f"augment {cfg.dtype} batch {batch}"):
            continue
        n = batch // nv
        aug.cfg = dataclasses.replace(cfg, batch_size=batch)  # one call of exactly `batch` variations
        rows = 2 * batch if cfg.guidance != 1.0 else batch
        if rows not in flops:
            flops[rows] = unet_flops(unet.config, rows, side)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        timer.reset()
        sync(device)
        start = time.perf_counter()
        try:
            aug(parents[:n], labels[:n], ids[:n])
        except torch.OutOfMemoryError as e:
            print(f"augment {cfg.dtype} batch {batch}: out of memory ({str(e).splitlines()[0]})", flush=True)
            release(device)
            continue
        sync(device)
        wall = time.perf_counter() - start
        unet_s, calls = timer.seconds(), len(timer.spans)
        tflops = flops[rows] * calls / unet_s / 1e12
        detail = {
            "dtype": cfg.dtype,
            "batch": batch,
            "parents": n,
            "num_variations": nv,
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "strength": cfg.strength,
            "attention": "xformers" if cfg.xformers else "sdpa",
            "resolution": aug.backend.resolution,
            "unet_calls": calls,
            "unet_s": unet_s,
            "unet_share_of_wall": unet_s / wall,
            "unet_tflop_per_call": flops[rows] / 1e12,
            "unet_tflops": tflops,
            "unet_fraction_of_peak": tflops / peak if peak else None,
            "peak_bf16_tflops": peak,
            "wall_s": wall,
            "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        }
        results.emit("augment", "augment_variations_per_s", batch / wall, "variations/s", **detail)
    timer.remove()
    release(device)


# ---------------------------------------------------------------- filter
def filter_section(device, sizes: Sizes, results: Results) -> None:
    import numpy as np

    from dda_ray.augment.filter import CosineFilter
    from dda_ray.config import FilterConfig
    from dda_ray.data.datasets import NORMALIZATION
    from dda_ray.models import build_model

    teacher = build_model("wrn40_2", 10)
    cf = CosineFilter(FilterConfig(), teacher, NORMALIZATION["cifar10"], device=device, batch_size=256)
    images = np.random.default_rng(1).integers(0, 256, size=(sizes.filter_images, 32, 32, 3), dtype=np.uint8)
    cf.embed(images[:256])  # warm-up
    start = time.perf_counter()
    emb = cf.embed(images)  # returns host numpy: synchronised
    wall = time.perf_counter() - start
    results.emit("filter", "filter_embeddings_per_s", len(images) / wall, "embeddings/s", teacher="wrn40_2", images=len(images),
                 batch=256, embedding_dim=int(emb.shape[1]), wall_s=wall)  # fmt: skip
    del cf, teacher
    release(device)


# ---------------------------------------------------------------- synthesis
def _round_s(synth, device, batch: int, steps: int, **kw) -> float:
    sync(device)
    start = time.perf_counter()
    synth.run_round(0, 0, batch_size=batch, g_steps=steps, **kw)  # returns host arrays: synchronised
    return time.perf_counter() - start


def synthesis_section(device, sizes: Sizes, results: Results, clock: Clock) -> None:
    import torch

    from dda_ray.config import load_config
    from dda_ray.data.datasets import NORMALIZATION
    from dda_ray.data.transforms import Normalize
    from dda_ray.models import RotationHead, build_model
    from dda_ray.synthesis.synthesizer import Synthesizer

    torch.manual_seed(0)
    teacher, student = build_model("wrn40_2", 10).to(device).eval(), build_model("wrn16_1", 10).to(device)
    rot_head = RotationHead(student.feature_dim, 10).to(device)
    normalize = Normalize(*NORMALIZATION["cifar10"])
    hours: dict[str, float] = {}
    for method, overrides in (("dda", []), ("fast", FAST)):
        if clock.over(f"synthesis {method}"):
            continue
        cfg = load_config(PAPER, overrides)
        sc = cfg.synthesis
        synth = Synthesizer(teacher, normalize, cfg.data.num_classes, sc, image_size=32, device=device, seed=0)
        kinds = {  # round kind -> (images, paper steps, run_round kwargs)
            "initial": (sizes.synth_images[0], sc.init_g_steps, {"adv": 0.0}),
            "epoch": (sizes.synth_images[1], sc.g_steps, {"adv": sc.adv, "student": student, "rot_head": rot_head}),
        }
        _round_s(synth, device, sizes.synth_images[0], 1, adv=0.0)  # warm-up
        per_round = {}
        for kind, (images, paper_steps, kw) in kinds.items():
            if method == "dda":  # round time = fixed + steps x per-step, from two short rounds
                k1, k2 = sizes.synth_steps
                t1, t2 = _round_s(synth, device, images, k1, **kw), _round_s(synth, device, images, k2, **kw)
                per_step = max(t2 - t1, 0.0) / (k2 - k1)
                fixed = max(t1 - k1 * per_step, 0.0)
                seconds, fit = (
                    fixed + paper_steps * per_step,
                    {"measured_steps": [k1, k2], "measured_s": [t1, t2], "per_step_s": per_step, "fixed_s": fixed},
                )
            else:  # a few steps per round: whole rounds, timed as they run
                times = [_round_s(synth, device, images, paper_steps, **kw) for _ in range(sizes.fast_rounds)]
                seconds, fit = sum(times) / len(times), {"rounds_timed": len(times), "timed_rounds_s": times}
            per_round[kind] = seconds
            results.emit("synthesis", f"synthesis_img_per_s_{method}", images / seconds, "img/s", method=method, round=kind, images=images,
                         g_steps=paper_steps, round_s=seconds, teacher="wrn40_2", student="wrn16_1", **fit)  # fmt: skip
        rounds = {"initial": sc.init_rounds, "epoch": cfg.distill.epochs * sc.rounds_per_epoch}
        hours[method] = sum(rounds[k] * per_round[k] for k in per_round) / 3600
        results.emit("synthesis", f"synthesis_bank_gpu_hours_{method}", hours[method], "GPU-hours", method=method, rounds=rounds,
                     round_s=per_round, published_synthesis_hours=REFERENCE)  # fmt: skip
        del synth
    print(
        "published synthesis GPU-hours (CIFAR-10, Fast-Datafree README; not run here): "
        + ", ".join(f"{k} {v} h" for k, v in REFERENCE.items())
    )
    del teacher, student, rot_head
    release(device)


# ---------------------------------------------------------------- kd
def kd_section(device, sizes: Sizes, results: Results, clock: Clock) -> dict[str, float]:
    import torch

    from dda_ray.config import load_config

    cfg = load_config(PAPER, [f"distill.batch_size={sizes.kd_batch}"])
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, 256, (sizes.kd_batch, 32, 32, 3), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (sizes.kd_batch,), generator=gen),
        )
        for _ in range(4)
    ]
    backend = cfg.distill.compile_backend if device.type == "cuda" else "eager"  # CPU: Dynamo's path without a C++ build
    speed: dict[str, float] = {}
    for arm, switches in KD_ARMS.items():
        if clock.over(f"kd {arm}"):
            continue
        with guarded(results, f"kd {arm}", device):
            dc = dataclasses.replace(cfg.distill, compile_backend=backend, **switches)
            speed[arm] = _kd_arm(cfg, dc, arm, device, sizes, batches, speed.get("fp32"), results)
        release(device)
    return speed


def _kd_arm(cfg, dc, arm: str, device, sizes: Sizes, batches, fp32: float | None, results: Results) -> float:
    """img/s of ``sizes.kd_steps`` KD steps after ``sizes.kd_warmup`` (the compile arm compiles in the warm-up)."""
    import torch

    from dda_ray.data.datasets import NORMALIZATION
    from dda_ray.data.transforms import Normalize
    from dda_ray.distill.kd import Distiller, rotation_every
    from dda_ray.models import build_model

    torch.manual_seed(0)
    every, views = rotation_every(cfg), cfg.synthesis.rotation_views
    d = Distiller(build_model(cfg.student.arch, 10), build_model(cfg.teacher.arch, 10), Normalize(*NORMALIZATION["cifar10"]), 10, dc,
                  cfg.synthesis.rotation_lr, device, rotation_every=every, rotation_views=views)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(sizes.kd_warmup):
        d.train_step(*batches[i % len(batches)], gen)
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [d.train_step(*batches[i % len(batches)], gen)["loss"] for i in range(sizes.kd_steps)]
    finite = bool(torch.isfinite(torch.stack(losses)).all())  # reads the losses: synchronised
    img_s = sizes.kd_steps * sizes.kd_batch / (time.perf_counter() - start)
    results.emit("kd", "kd_img_per_s", img_s, "img/s", arm=arm, ratio_to_fp32=img_s / fp32 if fp32 else (1.0 if arm == "fp32" else None),
                 batch=sizes.kd_batch, steps=sizes.kd_steps, warmup_steps=sizes.kd_warmup, warmup_s=warm_s, losses_finite=finite,
                 teacher=cfg.teacher.arch, student=cfg.student.arch, compile_backend=dc.compile_backend if dc.compile else None,
                 rotation_every=every, rotation_views=views, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 matmul_precision=torch.get_float32_matmul_precision())  # fmt: skip
    return img_s


# ---------------------------------------------------------------- main
def missing_modules() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny pipelines and batches: the code paths in seconds (numbers mean nothing)")
    p.add_argument("--no-record", action="store_true", help="print the figures only")
    p.add_argument("--out", type=Path, default=HERE / "results" / "perf.jsonl", help="results file to append to")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, default=360.0, help="arms starting after this many seconds are skipped")
    p.add_argument("--work-dir", type=Path, default=None, help="where the SD pipeline is written (default: a temporary folder, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_modules()
    if missing:
        print(f"error: missing Python modules {missing}; docs/GPU.md says how to bring their wheels to an offline machine", file=sys.stderr)
        return 2
    import diffusers
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu --tiny",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    sizes = TINY if args.tiny else FULL
    if device.type == "cpu" and not args.tiny:
        print("warning: full sizes on a CPU take hours; --tiny checks the code paths", flush=True)
    clock = Clock(args.budget_s)
    name = device_name(device)
    common = {
        "device": name,
        "device_type": device.type,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "command": "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    print(f"gpu_check on {name} ({device}), torch {torch.__version__}, diffusers {diffusers.__version__}, sizes {sizes.sd}", flush=True)
    results = Results(None if args.no_record else args.out, common)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    peak = None
    speed: dict[str, float] = {}
    try:
        if "peak" in args.sections:
            with guarded(results, "peak", device):
                best = matmul_peak(device, sizes)
                peak = best["tflops"]
                results.emit("peak", "matmul_peak_bf16_tflops", peak, "TFLOP/s", n=best["n"], iters=best["iters"])
        if "augment" in args.sections:
            with guarded(results, "augment", device):
                augment_section(device, sizes, work, peak, results, clock)
        if "filter" in args.sections and not clock.over("filter"):
            with guarded(results, "filter", device):
                filter_section(device, sizes, results)
        if "synthesis" in args.sections:
            with guarded(results, "synthesis", device):
                synthesis_section(device, sizes, results, clock)
        if "kd" in args.sections:
            with guarded(results, "kd", device):
                speed = kd_section(device, sizes, results, clock)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report_goals(results, speed)
    print(f"done in {clock.elapsed():.0f} s" + ("" if args.no_record else f"; figures appended to {args.out}"), flush=True)
    for failure in results.failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if results.failures else 0


def report_goals(results: Results, speed: dict[str, float]) -> None:
    fractions = [
        (d["unet_fraction_of_peak"], d["dtype"], d["batch"])
        for s, _, _, _, d in results.rows
        if s == "augment" and d.get("unet_fraction_of_peak")
    ]
    if fractions:
        best, dtype, batch = max(fractions)
        verdict = "met" if best >= GOAL_UNET_FRACTION else "NOT met"
        print(f"goal UNet >= {GOAL_UNET_FRACTION:.0%} of the bf16 peak: {verdict} (best {best:.1%}: {dtype}, batch {batch})")
    if "fp32" in speed and len(speed) > 1:
        arm, fastest = max(((a, s) for a, s in speed.items() if a != "fp32"), key=lambda x: x[1])
        ratio = fastest / speed["fp32"]
        verdict = "met" if ratio >= GOAL_KD_SPEEDUP else "NOT met"
        print(f"goal KD step >= {GOAL_KD_SPEEDUP:.0f}x fp32 img/s: {verdict} (best {arm}: {ratio:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
