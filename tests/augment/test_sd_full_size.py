"""The SD backends at their published sizes (issue #27): random-weight SD 1.x pipelines built by
``benchmarks/sd_full_size.py`` (UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 vision or text tower), saved
with ``save_pretrained`` and loaded through ``augment.model=<folder>`` as a hub id would be, then one
batch through the Augmenter and the CosineFilter.

Cost: the pipelines are written once, in one test (4.7 GB of fp32 safetensors, the UNet and VAE
hard-linked into the second folder, removed afterwards); fp32 loads map the files, so a load is about a
second. At the smallest resolution the backends allow (64 px: 8x8 latents), two images and two steps,
CLIP ViT-L/14 at its fixed 224 px input costs most of a run. fp16 is only loaded: CPU PyTorch has no
fast fp16 kernels (one image took minutes); bf16 also runs one image.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dda_ray.augment.augmenter import Augmenter
from dda_ray.augment.backends import BACKENDS, VAE_CHUNK
from dda_ray.augment.filter import CosineFilter
from dda_ray.config import AugmentConfig, FilterConfig
from dda_ray.data.pool import ORIGINAL
from dda_ray.data.transforms import to_float
from dda_ray.models.checkpoint import load_classifier, read_meta

from .._tiny_pipelines import random_images

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "checkpoints/cifar10_wrn16_2"
CLASSES = ("airplane", "automobile")
SMALLEST = 64  # VAE factor 8 x three UNet downsamplings
pytestmark = pytest.mark.usefixtures("offline_single_thread")


def _builder():
    spec = importlib.util.spec_from_file_location("sd_full_size", ROOT / "benchmarks" / "sd_full_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cosine_filter():
    meta = read_meta(TEACHER)
    teacher, _ = load_classifier(TEACHER, None, meta["num_classes"])
    return CosineFilter(FilterConfig(threshold=0.0), teacher.eval(), (meta["mean"], meta["std"]), batch_size=8)


@pytest.fixture(scope="module")
def batch():
    return random_images(2, 32, seed=5), np.array([0, 1]), np.array(["r00000-s0-00000", "r00000-s0-00001"])


def make_cfg(sd_dirs, backend: str, **kw) -> AugmentConfig:
    base = {"guidance": 3.0, "steps": 2, "num_variations": 1, "batch_size": 2, "device": "cpu", "image_resolution": SMALLEST}
    return AugmentConfig(backend=backend, model=str(sd_dirs[backend]), **{**base, **kw})


def spy_generate(aug: Augmenter) -> list[torch.Tensor]:
    """Record the backend's float output (before the Augmenter's uint8 rounding)."""
    seen, generate = [], aug.backend.generate

    def spy(*args, **kwargs):
        seen.append(generate(*args, **kwargs))
        return seen[-1]

    aug.backend.generate = spy
    return seen


def check_runs(aug: Augmenter, batch) -> dict:
    """Shapes, value range, the same seed twice -> the same variations, another seed -> others; returns the first run."""
    images, labels, ids = batch
    floats = spy_generate(aug)
    first = aug(images, labels, ids)
    assert first["image"].shape == images.shape and first["image"].dtype == np.uint8
    assert first["parent_id"].tolist() == ids.tolist() and first["label"].tolist() == labels.tolist()
    x = floats[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    np.testing.assert_array_equal(aug(images, labels, ids)["image"], first["image"])
    aug.cfg = dataclasses.replace(aug.cfg, seed=1)  # the Augmenter reads its seed per call; one parent is enough
    assert not np.array_equal(aug(images[:1], labels[:1], ids[:1])["image"][0], first["image"][0])
    return first


def check_filter(cosine_filter: CosineFilter, batch, out: dict) -> None:
    """The filter scores each variation against its original (recomputed from the batch's originals)."""
    images, labels, ids = batch
    rows = {
        "id": np.concatenate([ids, out["id"]]),
        "parent_id": np.concatenate([ids, out["parent_id"]]),
        "image": np.concatenate([images, out["image"]]),
        "label": np.concatenate([labels, out["label"]]),
        "variation": np.concatenate([np.full(len(ids), ORIGINAL), out["variation"]]),
    }
    scored, report = cosine_filter.filter(rows)
    assert report.n_variations == 2 and scored["kept"][:2].all()
    score = scored["score"][2:]
    assert np.isfinite(score).all() and (np.abs(score) <= 1.0 + 1e-6).all()
    assert scored["kept"][2:].tolist() == (score >= 0.0).tolist()


def test_architectures_have_the_published_sizes():
    """Parameter counts of SD 1.x (UNet, VAE), CLIP ViT-L/14's vision tower with projection and its text tower
    (meta device: no memory); the tiny size keeps every block type."""
    builder = _builder()
    assert builder.parameter_counts("full") == {
        "unet": 859_520_964,
        "vae": 83_653_863,
        "image_encoder": 303_966_208,
        "text_encoder": 123_060_480,
    }
    full, tiny = builder.configs("full"), builder.configs("tiny")
    for key in ("down_block_types", "up_block_types", "in_channels", "out_channels"):
        assert tiny["unet"][key] == full["unet"][key]
    assert len(tiny["vae"]["block_out_channels"]) == len(full["vae"]["block_out_channels"])


def check_image_variations(sd_dirs, batch, cosine_filter) -> None:
    """The paper's augmenter (strength 1: pure-noise latents, CLIP image embedding, guidance 3)."""
    aug = Augmenter(make_cfg(sd_dirs, "sd_image_variations", strength=1.0))
    pipe = aug.pipeline
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert pipe.unet.config.cross_attention_dim == pipe.image_encoder.config.projection_dim == 768
    assert (pipe.image_encoder.config.hidden_size, pipe.image_encoder.config.num_hidden_layers) == (1024, 24)
    assert aug.backend.clip_size == (224, 224) and pipe.vae.config.scaling_factor == 0.18215
    check_filter(cosine_filter, batch, check_runs(aug, batch))


def check_img2img(sd_dirs, batch, cosine_filter) -> None:
    """SD img2img (strength 0.5 of 2 steps: VAE-encode, one guided UNet step, decode) prompted with class names."""
    aug = Augmenter(make_cfg(sd_dirs, "sd_img2img", strength=0.5), CLASSES)
    pipe = aug.pipeline
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder.config.num_hidden_layers) == (768, 12)
    assert pipe.tokenizer.model_max_length == 77
    cond, uncond = aug.backend.conditions(to_float(batch[0]), batch[1])
    assert cond.shape == uncond.shape == (2, 77, 768) and not torch.equal(cond[0], cond[1])  # one prompt per class
    check_filter(cosine_filter, batch, check_runs(aug, batch))


def check_default_resolution(sd_dirs) -> None:
    """Without augment.image_resolution the SD backends work at 512 px (sample size 64 x VAE factor 8)."""
    aug = Augmenter(make_cfg(sd_dirs, "sd_image_variations", strength=1.0, image_resolution=None))
    assert aug.backend.resolution == 512 and aug.backend.latent_shape() == (4, 64, 64)


def check_half_precision(sd_dirs, batch, dtype: str, backend: str) -> None:
    """augment.dtype float16 / bfloat16: every network of the pipeline loads in that dtype (the Augmenter's
    backend built as on a GPU; on the CPU the Augmenter itself runs fp32). bf16 also runs one image."""
    cfg = make_cfg(sd_dirs, backend, strength=1.0 if backend == "sd_image_variations" else 0.5, dtype=dtype)
    with pytest.warns(UserWarning, match="running in float32"):
        assert Augmenter(cfg, CLASSES).dtype == torch.float32
    want = getattr(torch, dtype)
    be = BACKENDS[backend](cfg, torch.device("cpu"), want, list(CLASSES))
    nets = [be.pipe.unet, be.pipe.vae, be.pipe.image_encoder if backend == "sd_image_variations" else be.pipe.text_encoder]
    assert {p.dtype for net in nets for p in net.parameters()} == {want}, (dtype, backend)
    if want == torch.bfloat16:
        images, labels, _ = batch
        x = be.generate(to_float(images[:1]), labels[:1], [torch.Generator().manual_seed(0)], 1)
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_full_size_pipelines_through_the_augmenter_and_filter(tmp_path, batch, cosine_filter):
    """Build once, then each check in turn. One test, not one per check: pytest-xdist would hand the checks to
    both workers and each would write its own 4.7 GB and hold 6 GB (xdist_group marks are ignored here, with
    pytest 9 and pytest-xdist 3.8). gc between checks: a spied backend is a reference cycle, and two mapped
    full-size pipelines at once nearly doubled the peak RSS."""
    try:
        dirs = _builder().build_sd_pipelines(tmp_path / "sd", "full", class_names=CLASSES)
        for check in (
            lambda: check_image_variations(dirs, batch, cosine_filter),
            lambda: check_img2img(dirs, batch, cosine_filter),
            lambda: check_default_resolution(dirs),
            lambda: check_half_precision(dirs, batch, "float16", "sd_image_variations"),
            lambda: check_half_precision(dirs, batch, "bfloat16", "sd_img2img"),
        ):
            check()
            gc.collect()
    finally:
        shutil.rmtree(tmp_path / "sd", ignore_errors=True)  # 4.7 GB: not left for pytest's basetemp rotation


def test_vae_runs_in_chunks_at_any_batch(tmp_path):
    """At the paper's batch (64 variations a call) one SD VAE decode would hold 24 GiB of fp16 activations: the
    backends encode and decode in chunks of VAE_CHUNK, and a chunked batch gives each image what it gets alone
    (tiny pipeline: the same code, in milliseconds)."""
    dirs = _builder().build_sd_pipelines(tmp_path, "tiny", class_names=CLASSES, backends=("sd_img2img",))
    n = VAE_CHUNK + 2
    images, labels, ids = random_images(n, 32, seed=7), np.zeros(n, dtype=np.int64), np.array([f"r00000-s0-{i:05d}" for i in range(n)])
    aug = Augmenter(make_cfg(dirs, "sd_img2img", strength=0.5, batch_size=n), CLASSES)  # all n parents in one generate call
    vae, rows = aug.pipeline.vae, {"encoder": [], "decoder": []}
    for name, seen in rows.items():
        getattr(vae, name).register_forward_pre_hook(lambda _m, args, _seen=seen: _seen.append(args[0].shape[0]))
    out = aug(images, labels, ids)
    assert rows == {"encoder": [VAE_CHUNK, 2], "decoder": [VAE_CHUNK, 2]}
    alone = Augmenter(make_cfg(dirs, "sd_img2img", strength=0.5, batch_size=1), CLASSES)(images[-3:], labels[-3:], ids[-3:])
    np.testing.assert_array_equal(alone["image"], out["image"][-3:])  # one from the first chunk, two from the second
