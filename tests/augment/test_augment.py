"""Augmenter over tiny random diffusers pipelines, saved and reloaded with from_pretrained (no downloads)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from dda_ray.augment.augmenter import Augmenter, AugmentError
from dda_ray.augment.pipeline_class_img2img import ClassConditionalImg2ImgPipeline
from dda_ray.augment.sampling import resize, sdedit_timesteps, variation_seed
from dda_ray.config import AugmentConfig, ConfigError
from dda_ray.data.transforms import to_float, to_uint8

from .._tiny_pipelines import build_backend_pipelines, random_images

CLASSES = ["cat", "dog", "car", "ship"]


pytestmark = pytest.mark.usefixtures("offline_single_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return build_backend_pipelines(tmp_path_factory.mktemp("pipes"), num_classes=4, image_size=16)


def make_cfg(pipes, backend="local_prior", **kw) -> AugmentConfig:
    base = {"strength": 0.5, "guidance": 2.0, "num_variations": 2, "steps": 10, "batch_size": 4, "device": "cpu"}
    base.update(kw)
    return AugmentConfig(backend=backend, model=str(pipes[backend]), **base)


@pytest.fixture(scope="module")
def data():
    images = random_images(3, 16, seed=1)
    return images, np.array([0, 1, 3]), np.array(["r00000-s0-00000", "r00000-s0-00001", "r00000-s0-00002"])


def mean_change(out: dict, images: np.ndarray, v: int) -> float:
    return float(np.abs(out["image"].astype(np.float32) - np.repeat(images, v, 0).astype(np.float32)).mean())


def test_variation_seed_is_a_stable_hash():
    s = variation_seed(0, "r00000-s0-00000", 0)
    assert s == variation_seed(0, "r00000-s0-00000", 0)
    assert s == 7063353816006157479  # same value in every process, on every machine (sha256, not hash())
    assert len({s, variation_seed(1, "r00000-s0-00000", 0), variation_seed(0, "r00000-s0-00001", 0), variation_seed(0, "r00000-s0-00000", 1)}) == 4
    assert 0 <= s < 2**63


def test_sdedit_timesteps_follow_diffusers_img2img(pipes):
    pipe = ClassConditionalImg2ImgPipeline.from_pretrained(pipes["local_prior"])
    sched = pipe.scheduler
    assert sched.config.steps_offset == 1
    assert len(sdedit_timesteps(sched, 10, 0.3)) == 3  # int(10 * 0.3) steps from timesteps[7:]
    assert sdedit_timesteps(sched, 10, 0.3)[0] == sched.timesteps[7]
    assert len(sdedit_timesteps(sched, 10, 1.0)) == 10
    assert len(sdedit_timesteps(sched, 10, 0.01)) == 1  # at least one denoising step


@pytest.mark.parametrize(
    ("backend", "strength"), [("local_prior", 0.5), ("sd_img2img", 0.5), ("sd_image_variations", 0.5), ("sd_image_variations", 1.0)]
)
def test_end_to_end_shapes_ids_and_determinism(pipes, data, backend, strength):
    images, labels, ids = data
    aug = Augmenter(make_cfg(pipes, backend, strength=strength), CLASSES)
    out = aug(images, labels, ids)
    assert set(out) == {"id", "parent_id", "image", "label", "variation"}
    assert out["image"].shape == (6, 16, 16, 3) and out["image"].dtype == np.uint8
    assert list(out["parent_id"]) == [ids[0], ids[0], ids[1], ids[1], ids[2], ids[2]]
    assert list(out["id"][:2]) == [f"{ids[0]}-v0", f"{ids[0]}-v1"]
    assert out["label"].tolist() == [0, 0, 1, 1, 3, 3] and out["label"].dtype == np.int64
    assert out["variation"].tolist() == [0, 1, 0, 1, 0, 1]
    assert not np.array_equal(out["image"][0], out["image"][1]), "two variations of one image should differ"

    # A fresh actor (reloaded from disk) reproduces the batch exactly.
    again = Augmenter(make_cfg(pipes, backend, strength=strength), CLASSES)(images, labels, ids)
    np.testing.assert_array_equal(again["image"], out["image"])
    # The same image in another batch (other neighbours, other order, other chunking) -> the same variations.
    other = Augmenter(make_cfg(pipes, backend, strength=strength, batch_size=2), CLASSES)
    moved = other(images[[2, 1]], labels[[2, 1]], ids[[2, 1]])
    np.testing.assert_array_equal(moved["image"][0:2], out["image"][4:6])
    np.testing.assert_array_equal(moved["image"][2:4], out["image"][2:4])
    # Another seed -> other variations.
    reseeded = Augmenter(make_cfg(pipes, backend, strength=strength, seed=1), CLASSES)(images, labels, ids)
    assert not np.array_equal(reseeded["image"], out["image"])


def test_strength_controls_how_far_variations_move(pipes, data):
    images, labels, ids = data
    changes = [mean_change(Augmenter(make_cfg(pipes, strength=s), CLASSES)(images, labels, ids), images, 2) for s in (0.1, 0.5, 1.0)]
    assert changes[0] < changes[1] < changes[2], changes
    assert changes[0] < 6, changes  # pixel space: the smallest strength barely touches the image


def test_strength_in_latent_space(pipes, data):
    """SD backends: a random tiny VAE garbles pixels, so compare the latents SDEdit starts and ends at.

    (sd_image_variations at strength 1 starts from pure noise, without encoding the parent: see
    test_image_variations_at_strength_one_is_the_stock_pipeline.)"""
    images, labels, ids = data
    changes = []
    for strength in (0.1, 0.5, 0.9):
        aug = Augmenter(make_cfg(pipes, "sd_image_variations", strength=strength), CLASSES)
        vae, seen = aug.pipeline.vae, {}
        encode, decode = vae.encode, vae.decode

        def spy_encode(x, *a, _encode=encode, _seen=seen, **k):
            _seen["clean"] = _encode(x, *a, **k)
            return _seen["clean"]

        def spy_decode(z, *a, _decode=decode, _seen=seen, **k):
            _seen["final"] = z
            return _decode(z, *a, **k)

        vae.encode, vae.decode = spy_encode, spy_decode
        aug(images[:1], labels[:1], ids[:1])
        clean = seen["clean"].latent_dist.mode().repeat_interleave(2, 0)
        changes.append(float((seen["final"] * vae.config.scaling_factor - clean * vae.config.scaling_factor).abs().mean()))
    assert changes[0] < changes[1] < changes[2], changes


@pytest.mark.parametrize(("guidance", "steps"), [(3.0, 25), (1.0, 4)])  # the paper's setting; no guidance
def test_image_variations_at_strength_one_is_the_stock_pipeline(pipes, data, guidance, steps):
    """strength 1 on sd_image_variations = diffusers' StableDiffusionImageVariationPipeline (the paper's augmenter)
    called with the same initial latents (each variation's own seeded N(0, 1) draw), guidance and steps."""
    from diffusers import StableDiffusionImageVariationPipeline

    images, labels, ids = data
    v = 2
    aug = Augmenter(make_cfg(pipes, "sd_image_variations", strength=1.0, guidance=guidance, steps=steps, num_variations=v, batch_size=6))
    decoded = []
    decode = aug.pipeline.vae.decode
    aug.pipeline.vae.decode = lambda z, *a, **k: decoded.append(decode(z, *a, **k)[0]) or (decoded[-1],)
    out = aug(images, labels, ids)["image"]

    stock = StableDiffusionImageVariationPipeline.from_pretrained(
        pipes["sd_image_variations"], safety_checker=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    assert dict(stock.scheduler.config) == dict(aug.backend.scheduler.config)  # the tiny pipeline ships DDIM, clip_sample off
    unet = stock.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    latents = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(variation_seed(0, i, k))) for i in ids for k in range(v)]
    )
    # A tensor image skips the pipeline's PIL feature extractor: give it the CLIP input the backend computes.
    pixels = aug.backend.clip_pixels(to_float(images))
    with torch.no_grad():
        expected = stock(
            pixels, num_images_per_prompt=v, guidance_scale=guidance, num_inference_steps=steps, latents=latents, output_type="pt"
        ).images

    assert len(decoded) == 1 and expected.shape == (6, 3, 32, 32)
    ours = (decoded[0].float() / 2 + 0.5).clamp(0, 1)  # the backend's decode, before resizing to the parent's size
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out, to_uint8(resize(expected, (16, 16)).clamp(0, 1)))


def test_image_variations_strength_one_sees_only_the_embedding(pipes, data):
    """At strength 1 the parent's pixels enter only through its CLIP embedding (the VAE encoder never runs);
    below 1 (the SDEdit extension) the encoded parent is the starting point."""
    images, labels, ids = data
    outs = {}
    for strength in (1.0, 0.5):
        aug = Augmenter(make_cfg(pipes, "sd_image_variations", strength=strength, steps=10))
        encoded = []
        encoder = aug.pipeline.vae.encoder
        hook = encoder.register_forward_pre_hook(lambda _m, args, _seen=encoded: _seen.append(args[0].shape))
        emb = aug.backend.conditions(to_float(images[:1]), labels[:1])
        aug.backend.conditions = lambda x, _labels, _emb=emb: tuple(e.expand(len(x), -1, -1) for e in _emb)  # one embedding for any parent
        first = aug(images[:1], labels[:1], ids[:1])["image"]
        second = aug(images[1:2], labels[:1], ids[:1])["image"]  # other pixels, same id (same noise), same embedding
        hook.remove()
        outs[strength] = first
        if strength == 1.0:
            assert encoded == []
            np.testing.assert_array_equal(first, second)
        else:
            assert len(encoded) == 2
            assert not np.array_equal(first, second)
    assert not np.array_equal(outs[1.0], outs[0.5])


def test_guidance_one_skips_the_unconditional_pass(pipes, data):
    images, labels, ids = data
    seen = []
    for guidance in (1.0, 3.0):
        aug = Augmenter(make_cfg(pipes, guidance=guidance, steps=4, strength=0.5), CLASSES)
        unet = aug.pipeline.unet
        hook = unet.register_forward_pre_hook(lambda _m, args, kw, g=guidance: seen.append((g, args[0].shape[0])), with_kwargs=True)
        aug(images, labels, ids)
        hook.remove()
    assert {b for g, b in seen if g == 1.0} == {4, 2}  # batch_size 4 -> chunks of 2 parents x 2 variations, then 1 x 2
    assert {b for g, b in seen if g == 3.0} == {8, 4}  # cond + uncond in one batched pass


def test_sd_resizes_to_the_pipeline_resolution_and_back(pipes, data):
    images, labels, ids = data
    aug = Augmenter(make_cfg(pipes, "sd_img2img", image_resolution=48), CLASSES)
    sizes = []
    hook = aug.pipeline.vae.encoder.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[-2:])))
    out = aug(images[:1], labels[:1], ids[:1])
    hook.remove()
    assert sizes == [(48, 48)] and out["image"].shape == (2, 16, 16, 3)
    default = Augmenter(make_cfg(pipes, "sd_img2img"), CLASSES).backend
    assert default.resolution == 32  # sample_size 16 x vae factor 2
    assert type(default.scheduler).__name__ == "DDIMScheduler" and default.scheduler.config.clip_sample is False
    with pytest.raises(AugmentError, match="multiple of 4"):
        Augmenter(make_cfg(pipes, "sd_img2img", image_resolution=30), CLASSES)


def test_sd_img2img_prompts_come_from_the_template(pipes, data):
    images, labels, ids = data
    aug = Augmenter(make_cfg(pipes, "sd_img2img", prompt_template="a photo of a {label}"), CLASSES)
    prompts = []
    original = aug.pipeline.encode_prompt
    aug.pipeline.encode_prompt = lambda prompt, *a, **k: prompts.append(prompt) or original(prompt, *a, **k)
    aug(images, labels, ids)
    assert prompts == ["a photo of a cat", "a photo of a dog", "a photo of a ship"]  # one per class, cached
    with pytest.raises(AugmentError, match="class names"):
        Augmenter(make_cfg(pipes, "sd_img2img"))


def test_missing_model_names_the_config_field(tmp_path, pipes):
    for model in ("acme/no-such-model", str(tmp_path / "missing")):
        with pytest.raises(AugmentError, match=r"augment\.model = .*could not be loaded"):
            Augmenter(AugmentConfig(model=model, device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AugmentError, match="model_index.json"):
        Augmenter(AugmentConfig(model=str(tmp_path / "empty"), device="cpu"))
    assert issubclass(AugmentError, ConfigError)  # job CLIs print it as one error line


def test_backend_model_mismatch_suggests_the_backend(pipes):
    with pytest.raises(AugmentError, match="augment.backend=sd_image_variations"):
        Augmenter(AugmentConfig(backend="local_prior", model=str(pipes["sd_image_variations"]), device="cpu"))


def test_xformers_missing_is_a_clear_error(pipes, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers -> ImportError
    with pytest.raises(AugmentError, match=r"xformers is not installed; pip install 'dda_ray\[gpu\]'"):
        Augmenter(make_cfg(pipes, xformers=True))


def test_half_precision_on_cpu_falls_back_to_float32(pipes):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aug = Augmenter(make_cfg(pipes, dtype="float16"))
    assert any("float32" in str(w.message) for w in caught)
    assert aug.pipeline.unet.dtype == torch.float32


def test_bad_inputs_are_refused(pipes, data):
    images, labels, ids = data
    aug = Augmenter(make_cfg(pipes))
    with pytest.raises(ValueError, match="uint8"):
        aug(images.astype(np.float32), labels, ids)
    with pytest.raises(ValueError, match="class labels must lie in"):
        aug(images, np.array([0, 1, 7]), ids)
    empty = aug(images[:0], labels[:0], ids[:0])
    assert empty["image"].shape == (0, 16, 16, 3) and len(empty["id"]) == 0
