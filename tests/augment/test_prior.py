"""Local prior training on a synthetic bank; the saved pipeline reloads and augments (other sources: test_prior_sources.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dda_ray.augment.augmenter import Augmenter
from dda_ray.augment.pipeline_class_img2img import ClassConditionalImg2ImgPipeline
from dda_ray.augment.prior import build_prior_unet, train_prior
from dda_ray.config import AugmentConfig, ConfigError, load_config
from dda_ray.runtime import read_jsonl

from .._helpers import tiny_cfg, write_bank
from .._tiny_pipelines import offline, random_images, single_thread

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    offline(monkeypatch)
    with single_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    bank = write_bank(root / "bank")
    with single_thread():
        summary = train_prior(bank, root / "prior", tiny_cfg(), num_classes=4, log_path=root / "run" / "prior_loss.jsonl", progress=False)
    return root, summary


def test_loss_log_exists_and_decreases(trained):
    root, summary = trained
    log = read_jsonl(root / "run" / "prior_loss.jsonl")
    assert [r["step"] for r in log] == list(range(1, 31))
    losses = np.array([r["loss"] for r in log])
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    assert read_jsonl(root / "prior" / "loss.jsonl") == log  # copied beside the weights
    info = json.loads((root / "prior" / "training.json").read_text())
    assert info["num_images"] == 48 and info["num_classes"] == 4 and info["steps"] == 30
    assert info["source"] == "bank" and info["labels"] == "bank" and info["images"] == ["round-00000.parquet", "round-00001.parquet"]
    assert summary["final_loss"] == pytest.approx(log[-1]["loss"])


def test_saved_prior_reloads_and_augments(trained):
    root, _ = trained
    pipe = ClassConditionalImg2ImgPipeline.from_pretrained(root / "prior")
    assert pipe.num_classes == 4 and pipe.unet.config.num_class_embeds == 5  # + the null class
    assert pipe.scheduler.config.steps_offset == 1
    aug = Augmenter(AugmentConfig(model=str(root / "prior"), strength=0.3, num_variations=2, steps=5, device="cpu"))
    images = random_images(3, 16, seed=9)
    out = aug(images, np.array([0, 1, 2]), np.array(["a", "b", "c"]))
    assert out["image"].shape == (6, 16, 16, 3) and out["image"].dtype == np.uint8


def test_training_is_reproducible_and_replaces_atomically(tmp_path, trained):
    root, summary = trained
    again = train_prior(root / "bank", tmp_path / "prior", tiny_cfg(prior_steps=3), num_classes=4, progress=False)
    assert again["steps"] == 3
    first = read_jsonl(tmp_path / "prior" / "loss.jsonl")
    train_prior(root / "bank", tmp_path / "prior", tiny_cfg(prior_steps=3), num_classes=4, progress=False)  # overwrite in place
    assert [r["loss"] for r in read_jsonl(tmp_path / "prior" / "loss.jsonl")] == [r["loss"] for r in first]  # same seed, same losses
    assert not list(tmp_path.glob(".prior.*"))  # no temporary directories left behind


def test_bad_banks_and_labels_are_refused(tmp_path, trained):
    root, _ = trained
    with pytest.raises(ConfigError, match="num_classes = 2"):
        train_prior(root / "bank", tmp_path / "p", tiny_cfg(), num_classes=2, progress=False)
    with pytest.raises(ConfigError, match="multiple of 32"):
        train_prior(root / "bank", tmp_path / "p", tiny_cfg(prior_channels=[8] * 6), num_classes=4, progress=False)


def test_unet_sizes_and_config_lists():
    assert 1.0e6 < sum(p.numel() for p in build_prior_unet(10).parameters()) < 1.3e6  # DESIGN.md's (32, 64, 64): ~1.1 M
    unet = build_prior_unet(10, channels=(32, 64, 64), attention=True)
    assert "AttnDownBlock2D" in unet.config.down_block_types and unet.config.num_class_embeds == 11
    cfg = load_config(None, ["augment.prior_channels=[16, 32]"])
    assert cfg.augment.prior_channels == [16, 32]
    for bad in ("augment.prior_channels=[16, x]", "augment.prior_channels=16", "augment.prior_label_dropout=1.0"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def _load_job():
    spec = importlib.util.spec_from_file_location("train_prior_job", REPO_ROOT / "jobs" / "train_prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_arguments_and_refusals(tmp_path, trained):
    job = _load_job()
    assert job._split_argv(["--config", "c.yaml", "--bank", "b", "--overwrite", "x.y=1"]) == (["--config", "c.yaml", "x.y=1"], "b", None, True)
    assert job._split_argv(["--bank=b2"]) == ([], "b2", None, False)
    assert job._split_argv(["--folder", "imgs", "x.y=1"]) == (["x.y=1"], None, "imgs", False)
    assert job.source_overrides(None, "imgs") == ["augment.prior_source=folder", "augment.prior_folder=imgs"]
    assert job.source_overrides("b", None) == ["augment.prior_source=bank", "augment.prior_bank=b"]
    with pytest.raises(SystemExit, match="not both"):
        job._split_argv(["--bank", "b", "--folder=f"])
    root, _ = trained
    base = [f"run.output_dir={tmp_path}", "data.num_classes=4", "augment.device=cpu", "augment.prior_channels=[8, 16]", "augment.prior_steps=2"]
    base.append("tracking.enabled=false")  # MLflow logging of this job: tests/test_tracking.py
    with pytest.raises(ConfigError, match="augment.prior_bank is not set"):
        job.main(load_config(None, base))
    with pytest.raises(ConfigError, match="--overwrite"):
        job.main(load_config(None, [*base, f"augment.prior_bank={root / 'bank'}", f"augment.model={root / 'prior'}"]))
    out = tmp_path / "new_prior"
    summary = job.main(load_config(None, [*base, f"augment.prior_bank={root / 'bank'}", f"augment.model={out}", "run.name=p"]))
    assert summary["steps"] == 2 and (out / "model_index.json").exists() and (tmp_path / "p" / "prior_loss.jsonl").exists()
