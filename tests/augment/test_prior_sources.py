"""Prior training sources beyond the bank: an unlabeled image folder (or archive) and the packaged
photographs; crops, teacher / null labels, validation, and that the dataset is never read."""

from __future__ import annotations

import importlib.util
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dda_ray.augment.prior
import dda_ray.data
import dda_ray.data.datasets
from dda_ray.augment.augmenter import Augmenter
from dda_ray.augment.pipeline_class_img2img import ClassConditionalImg2ImgPipeline
from dda_ray.augment.prior import train_prior
from dda_ray.augment.prior_sources import (
    PACKAGED_PHOTOS,
    build_prior_source,
    crop_boxes,
    load_folder_images,
    load_packaged_photos,
    random_resized_crops,
)
from dda_ray.config import AugmentConfig, ConfigError, load_config
from dda_ray.data.transforms import to_float
from dda_ray.models.checkpoint import load_teacher, save_classifier
from dda_ray.runtime import read_jsonl

from .._helpers import teacher_with_stats, tiny_cfg, write_bank
from .._tiny_pipelines import random_images

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = [(48, 64), (40, 40), (80, 60), (36, 90)]  # (height, width) of the folder's images


pytestmark = pytest.mark.usefixtures("offline_single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny random teacher, and a folder of PNG/JPEG images (plus a broken file and a non-image)
    with .tar.gz, .tar, .tgz and .zip archives of it."""
    root = tmp_path_factory.mktemp("prior_sources")
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for k, (h, w) in enumerate(SIZES):
        img = random_images(1, max(h, w) * 2, seed=10 + k)[0][:h, :w]
        name = f"sub/img{k}.jpg" if k == 3 else f"img{k}.png"
        Image.fromarray(img).save(folder / name, quality=95)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    for suffix, mode in ((".tar.gz", "w:gz"), (".tar", "w"), (".tgz", "w:gz")):
        with tarfile.open(root / f"images{suffix}", mode) as tf:
            tf.add(folder, arcname="images")
    with zipfile.ZipFile(root / "images.zip", "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"images/{p.relative_to(folder).as_posix()}")
    return root


def make_cfg(assets: Path, tmp_path: Path, *extra: str):
    """A full config: a data.path that does not exist, the tiny teacher, a tiny fast prior."""
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'runs'}",
            f"data.path={tmp_path / 'no-such-dataset.tar.gz'}",
            "data.num_classes=10",
            "data.image_size=32",
            "teacher.arch=wrn16_1",
            f"teacher.checkpoint={assets / 'teacher'}",
            f"augment.model={tmp_path / 'prior'}",
            "augment.device=cpu",
            "augment.prior_channels=[8, 8]",
            "augment.prior_steps=3",
            "augment.prior_batch_size=8",
            "augment.prior_log_every=1",
            "augment.prior_ema=0.9",
            *extra,
        ],
    )


def augment_once(prior_dir: Path, **kw) -> np.ndarray:
    """Reload the prior the way a run does (Augmenter, backend local_prior) and augment 3 images."""
    cfg = AugmentConfig(backend="local_prior", model=str(prior_dir), strength=0.5, num_variations=2, steps=4, device="cpu", **kw)
    out = Augmenter(cfg)(random_images(3, 32, seed=5), np.array([0, 3, 9]), np.array(["a", "b", "c"]))
    assert out["image"].shape == (6, 32, 32, 3) and out["image"].dtype == np.uint8
    return out["image"]


def _load_job():
    spec = importlib.util.spec_from_file_location("train_prior_job", REPO_ROOT / "jobs" / "train_prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- packaged photos
def test_packaged_photos_load_offline_as_rgb():
    photos = load_packaged_photos()
    assert photos.names == [p.name for p in PACKAGED_PHOTOS] and len(photos) == 9
    for photo, image in zip(PACKAGED_PHOTOS, photos.images, strict=True):
        assert image.dtype == np.uint8 and image.shape == (photo.size[1], photo.size[0], 3), photo.name
        assert image.std() > 10, photo.name  # a photograph, not a flat image
    assert {p.name: p.cifar10 for p in PACKAGED_PHOTOS if p.cifar10} == {"skimage/data/chelsea.png": "cat"}
    small = load_packaged_photos(max_short_side=64)
    assert all(min(img.shape[:2]) == 64 for img in small.images)


# ----------------------------------------------------------------- crops
def test_crops_shape_dtype_and_seeded_reproducibility():
    images = [random_images(1, 128, seed=s)[0][: 60 + 20 * s] for s in range(3)]
    a = random_resized_crops(images, 12, 32, torch.Generator().manual_seed(3), scale=(0.1, 0.5), jitter=0.2)
    b = random_resized_crops(images, 12, 32, torch.Generator().manual_seed(3), scale=(0.1, 0.5), jitter=0.2)
    c = random_resized_crops(images, 12, 32, torch.Generator().manual_seed(4), scale=(0.1, 0.5), jitter=0.2)
    assert a.images.shape == (12, 32, 32, 3) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.images, c.images)
    assert 0 < int(a.flipped.sum()) < 12


def test_whole_image_crops_are_the_image_and_flips_mirror_it():
    image = random_images(1, 32, seed=1)[0]
    crops = random_resized_crops([image], 16, 32, torch.Generator().manual_seed(0), scale=(1.0, 1.0), hflip=True, jitter=0.0)
    assert (crops.boxes == torch.tensor([0, 0, 32, 32])).all()
    for crop, flipped in zip(crops.images.numpy(), crops.flipped.tolist(), strict=True):
        np.testing.assert_array_equal(crop, image[:, ::-1] if flipped else image)


@pytest.mark.parametrize("scale", [(0.02, 0.5), (0.3, 0.3), (0.6, 1.0)])
def test_crop_boxes_respect_the_scale_range_and_the_image(scale):
    shapes = torch.tensor([[300, 400], [400, 300], [60, 900], [257, 257]])
    index = torch.arange(4).repeat(500)
    boxes = crop_boxes(shapes, index, scale, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    H, W = shapes[index].T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    frac = (h * w).double() / (H * W).double()
    slack = (h + w + 1).double() / (H * W).double()  # rounding each side to whole pixels
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all(), (frac.min(), frac.max())
    ratio = (w / h).double()[index != 2]  # the 60x900 strip forces clamped boxes
    assert ratio.min() > 0.7 and ratio.max() < 1.43


# ----------------------------------------------------------------- labels
def test_teacher_labels_are_the_teachers_argmax_on_the_crops(assets, tmp_path, no_dataset):
    cfg = make_cfg(assets, tmp_path, "augment.prior_source=photos", "augment.prior_labels=teacher")
    source = build_prior_source(cfg)
    assert source.label_mode == "teacher" and source.image_size == 32 and source.num_classes == 10
    images, labels = source.sample(16, torch.Generator().manual_seed(0))
    assert images.shape == (16, 32, 32, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    model, normalize, _ = load_teacher(cfg)
    with torch.no_grad():
        expected = model(normalize(to_float(images))).argmax(1)
    assert torch.equal(labels, expected)
    assert not no_dataset


def test_none_labels_train_the_null_class_and_make_guidance_inert(assets, tmp_path, monkeypatch, no_dataset):
    cfg = make_cfg(assets, tmp_path, "augment.prior_source=photos", "augment.prior_labels=none")
    source = build_prior_source(cfg)
    assert source.label_mode == "none" and source.sample(4, torch.Generator().manual_seed(0))[1] is None

    seen = []
    build = dda_ray.augment.prior.build_prior_pipeline

    def spying_build(*args, **kwargs):
        pipe = build(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
        return pipe

    monkeypatch.setattr(dda_ray.augment.prior, "build_prior_pipeline", spying_build)
    summary = train_prior(source, tmp_path / "prior", cfg.augment, num_classes=10, progress=False)
    assert summary["labels"] == "none" and len(seen) == 3
    assert all((y == 10).all() for y in seen)  # every crop is the null class
    emb = ClassConditionalImg2ImgPipeline.from_pretrained(tmp_path / "prior").unet.class_embedding.weight
    assert torch.equal(emb[:10], emb[10:].expand(10, -1))  # every class is the null class
    plain, guided = augment_once(tmp_path / "prior", guidance=1.0), augment_once(tmp_path / "prior", guidance=4.0)
    assert np.abs(plain.astype(int) - guided.astype(int)).max() <= 1
    assert not no_dataset


# ----------------------------------------------------------------- whole runs
def test_prior_training_never_opens_the_dataset(assets, tmp_path, no_dataset):
    """photos + teacher labels through the job: data.path does not exist and its loaders refuse."""
    cfg = make_cfg(assets, tmp_path, "augment.prior_source=photos", "augment.prior_labels=teacher", "run.name=photos")
    summary = _load_job().main(cfg)
    assert not no_dataset and not Path(cfg.data.path).exists()
    prior = tmp_path / "prior"
    info = json.loads((prior / "training.json").read_text())
    assert info["source"] == "photos" and info["labels"] == "teacher" and info["images"] == [p.name for p in PACKAGED_PHOTOS]
    assert set(info["packages"]) == {"scikit-image", "scikit-learn", "matplotlib"} and info["crop_scale"] == [0.02, 0.5]
    assert info["num_classes"] == 10 and info["image_size"] == 32 and summary["steps"] == 3
    assert [r["step"] for r in read_jsonl(prior / "loss.jsonl")] == [1, 2, 3]
    assert (tmp_path / "runs" / "photos" / "prior_loss.jsonl").exists()
    pipe = ClassConditionalImg2ImgPipeline.from_pretrained(prior)
    assert pipe.num_classes == 10 and pipe.image_size == 32
    augment_once(prior)


@pytest.mark.parametrize("where", ["images", "images.tar.gz"])
def test_folder_prior_trains_saves_reloads_and_augments(assets, tmp_path, where, no_dataset):
    cfg = make_cfg(assets, tmp_path, "augment.prior_source=folder", f"augment.prior_folder={assets / where}")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        source = build_prior_source(cfg)
    summary = train_prior(source, tmp_path / "prior", cfg.augment, num_classes=10, progress=False)
    info = json.loads((tmp_path / "prior" / "training.json").read_text())
    prefix = "" if where == "images" else "images/"
    assert info["source"] == "folder" and info["folder"] == str(assets / where) and info["labels"] == "teacher"
    assert info["images"] == [f"{prefix}{n}" for n in ("img0.png", "img1.png", "img2.png", "sub/img3.jpg")]
    assert info["skipped"] == [f"{prefix}broken.png"] and summary["num_images"] == 4
    augment_once(tmp_path / "prior")
    assert not no_dataset


@pytest.mark.filterwarnings("ignore:augment.prior_folder. skipped")
def test_folder_and_archives_decode_the_same_images(assets):
    folder = load_folder_images(assets / "images")
    assert [img.shape[:2] for img in folder.images] == SIZES
    for name in ("images.tar.gz", "images.tar", "images.tgz", "images.zip"):
        archive = load_folder_images(assets / name)
        assert archive.names == [f"images/{n}" for n in folder.names], name
        for a, b in zip(archive.images, folder.images, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [min(img.shape[:2]) for img in load_folder_images(assets / "images", max_short_side=36).images] == [36, 36, 36, 36]


def test_bank_source_with_no_labels(tmp_path):
    bank = write_bank(tmp_path / "bank")
    summary = train_prior(bank, tmp_path / "prior", tiny_cfg(prior_steps=2, prior_labels="none"), num_classes=4, progress=False)
    assert summary["source"] == "bank" and summary["labels"] == "none"


# ----------------------------------------------------------------- validation
def test_config_values_are_validated():
    cfg = load_config(None, ["augment.prior_source=photos", "augment.prior_crop_scale=[0.1, 0.9]", "augment.prior_labels=none"])
    assert cfg.augment.prior_crop_scale == [0.1, 0.9] and cfg.augment.prior_labels == "none"
    bad = {
        "augment.prior_source=cifar10": "prior_source",
        "augment.prior_labels=bank": "prior_labels",
        "augment.prior_crop_scale=[0.5, 0.1]": "prior_crop_scale",
        "augment.prior_crop_scale=[0, 0.5]": "prior_crop_scale",
        "augment.prior_crop_scale=[0.1]": "prior_crop_scale",
        "augment.prior_crop_scale=[0.1, 1.5]": "prior_crop_scale",
        "augment.prior_crop_scale=[0.1, x]": "prior_crop_scale",
        "augment.prior_color_jitter=1.0": "prior_color_jitter",
    }
    for override, field in bad.items():
        with pytest.raises(ConfigError, match=field):
            load_config(None, [override])


def test_missing_or_empty_sources_are_clear_errors(assets, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    (empty / "deep" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (empty / "readme.txt").write_text("no images here")
    (tmp_path / "plain.txt").write_text("x")
    cases = {
        ("augment.prior_source=folder",): "augment.prior_folder is not set",
        ("augment.prior_source=folder", f"augment.prior_folder={tmp_path / 'nope'}"): "does not exist",
        ("augment.prior_source=folder", f"augment.prior_folder={empty}"): r"holds no readable image .*1 file\(s\) failed",
        ("augment.prior_source=folder", f"augment.prior_folder={tmp_path / 'plain.txt'}"): "not a .* archive",
        ("augment.prior_source=bank",): "augment.prior_bank is not set",
        ("augment.prior_source=bank", f"augment.prior_bank={tmp_path / 'nobank'}"): r"augment.prior_bank = .* does not exist",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_prior_source(make_cfg(assets, tmp_path, *overrides))
    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read the archive"):
        load_folder_images(bad_tar)
    monkeypatch.setattr("dda_ray.data.photos._module_dir", lambda module: None)
    with pytest.raises(ConfigError, match="pip install scikit-image"):
        build_prior_source(make_cfg(assets, tmp_path, "augment.prior_source=photos", "augment.prior_labels=none"))
    job = _load_job()
    with pytest.raises(ConfigError, match="augment.prior_folder is not set"):
        job.main(make_cfg(assets, tmp_path, "augment.prior_source=folder"))


def test_shipped_photo_prior_was_trained_on_the_packaged_photos_and_augments():
    """checkpoints/photo_prior: trained on crops of the packaged photographs only (teacher labels),
    loads through from_pretrained and makes class-conditional variations."""
    prior = REPO_ROOT / "checkpoints" / "photo_prior"
    info = json.loads((prior / "training.json").read_text())
    assert info["source"] == "photos" and info["labels"] == "teacher"
    assert info["images"] == [p.name for p in PACKAGED_PHOTOS] and info["skipped"] == []
    assert "data" not in info and "bank" not in info  # no dataset path, no bank
    pipe = ClassConditionalImg2ImgPipeline.from_pretrained(prior)
    assert pipe.num_classes == 10 and pipe.image_size == 32
    out = augment_once(prior)
    assert out.std() > 5  # an image, not a constant
