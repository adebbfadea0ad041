"""CosineFilter: scores, thresholds, references, reports, and a real teacher behind the Augmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dda_ray.augment.augmenter import Augmenter
from dda_ray.augment.filter import AllRejectedError, AllRejectedWarning, CosineFilter, FilterReport
from dda_ray.config import AugmentConfig, FilterConfig
from dda_ray.data.columns import encode_image_column
from dda_ray.data.datasets import NORMALIZATION
from dda_ray.models import build_model
from dda_ray.models.checkpoint import load_classifier

from .._tiny_pipelines import build_tiny_prior, random_images

REPO_ROOT = Path(__file__).resolve().parents[2]
TEACHER_CKPT = REPO_ROOT / "checkpoints/cifar10_wrn16_2"


pytestmark = pytest.mark.usefixtures("offline_single_thread")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("wrn16_1", 10).eval()


def make_filter(teacher, threshold=0.5, **kw) -> CosineFilter:
    cfg_kw = {k: kw.pop(k) for k in ("on_all_rejected", "reference", "hist_bins") if k in kw}
    return CosineFilter(FilterConfig(threshold=threshold, **cfg_kw), teacher, NORMALIZATION["cifar10"], **kw)


@pytest.fixture(scope="module")
def batch():
    """Two originals (variation -1) + 4 variations each with growing noise: scores spread out."""
    rng = np.random.default_rng(0)
    parents = random_images(2, 32, seed=3)
    ids = np.array(["p0", "p1"])
    rows = {"id": list(ids), "parent_id": list(ids), "image": list(parents), "label": [0, 1], "variation": [-1, -1]}
    for i, pid in enumerate(ids):
        for k, sigma in enumerate((4, 30, 80, 160)):
            noisy = np.clip(parents[i].astype(np.float32) + rng.normal(0, sigma, parents[i].shape), 0, 255).astype(np.uint8)
            rows["id"].append(f"{pid}-v{k}")
            rows["parent_id"].append(pid)
            rows["image"].append(noisy)
            rows["label"].append(i)
            rows["variation"].append(k)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["image"] = np.stack(rows["image"])
    return out


def test_every_row_gets_score_and_kept_and_originals_pass(teacher, batch):
    out, report = make_filter(teacher, threshold=0.9).filter(batch)
    orig = batch["variation"] == -1
    assert out["score"].dtype == np.float32 and out["kept"].dtype == bool and len(out["score"]) == len(batch["id"])
    assert np.all(out["kept"][orig]) and np.allclose(out["score"][orig], 1.0)
    assert np.array_equal(out["kept"][~orig], out["score"][~orig] >= 0.9)
    assert report.n_variations == 8 and report.hist.sum() == 8 and len(report.hist) == 10
    assert out["score"][~orig].max() < 1.0
    # the lightest noise keeps the teacher's view; the heaviest moves it
    assert out["score"][2] > out["score"][5]


def test_kept_fraction_never_rises_with_the_threshold(teacher, batch):
    f = make_filter(teacher)
    scores = f.filter(batch)[0]["score"]
    fractions = []
    for thr in np.linspace(-1.0, 1.0, 9):
        f.cfg.threshold = float(thr)
        with pytest.warns(AllRejectedWarning) if thr > scores[batch["variation"] >= 0].max() else _nothing():
            fractions.append(f.filter(batch)[1].kept_fraction)
    assert fractions[0] == 1.0  # -1 keeps everything
    assert np.all(np.diff(fractions) <= 0), fractions


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_threshold_above_every_score_warns_or_raises(teacher, batch):
    out, report = None, None
    with pytest.warns(AllRejectedWarning, match="filter.threshold = 1.0 is above every score"):
        out, report = make_filter(teacher, threshold=1.0).filter(batch)
    assert report.n_kept == 0 and report.kept_fraction == 0.0
    assert np.array_equal(out["kept"], batch["variation"] == -1)  # originals still pass
    with pytest.raises(AllRejectedError, match="rejected all 8 variations"):
        make_filter(teacher, threshold=1.0, on_all_rejected="error").filter(batch)


def test_reference_sources_agree(teacher, batch):
    """In-batch originals, a parent_image column and a parent_embedding column give the same scores."""
    f = make_filter(teacher)
    in_batch = f.filter(batch)[0]["score"]
    index = {pid: i for i, pid in enumerate(batch["id"]) if batch["variation"][i] == -1}
    parent_rows = [index[p] for p in batch["parent_id"]]
    with_images = {**batch, "parent_image": encode_image_column(batch["image"][parent_rows]), "image": encode_image_column(batch["image"])}
    np.testing.assert_allclose(f.filter(with_images)[0]["score"], in_batch, atol=1e-5)
    emb = f.embed(batch["image"])[parent_rows]
    with_emb = {**batch, "parent_embedding": np.array(list(emb), dtype=object)}
    np.testing.assert_allclose(f.filter(with_emb)[0]["score"], in_batch, atol=1e-5)
    # reference=recompute ignores a (here deliberately wrong) stored embedding
    wrong = {**with_images, "parent_embedding": -emb}
    np.testing.assert_allclose(make_filter(teacher, reference="recompute").filter(wrong)[0]["score"], in_batch, atol=1e-5)
    variations_only = {k: v[batch["variation"] >= 0] for k, v in batch.items()}
    with pytest.raises(KeyError, match="needs each variation's original"):
        f.filter(variations_only)


def test_report_numbers(teacher, batch):
    report = make_filter(teacher, threshold=0.9).filter(batch)[1]
    d = report.to_dict()
    assert sum(d["hist"]) == 8 and len(d["bin_edges"]) == 11 and 0 <= d["kept_fraction"] <= 1
    empty = FilterReport.from_scores(np.zeros(0), np.zeros(0, bool))
    assert empty.kept_fraction == 1.0 and empty.to_dict()["mean_score"] is None


def test_small_strength_keeps_the_teachers_view(tmp_path):
    """A real teacher (the project checkpoint if present, else a random wrn16_1) behind the local prior."""
    if TEACHER_CKPT.exists():
        model, meta = load_classifier(TEACHER_CKPT, "wrn16_2", 10)
        f = CosineFilter(FilterConfig(threshold=0.9), model, (meta["mean"], meta["std"]))
    else:
        torch.manual_seed(0)
        f = CosineFilter(FilterConfig(threshold=0.9), build_model("wrn16_1", 10), NORMALIZATION["cifar10"])
    prior = build_tiny_prior(tmp_path / "prior", num_classes=10, image_size=32)
    images = random_images(4, 32, seed=5)
    ids = np.array([f"r00000-s0-{i:05d}" for i in range(4)])
    aug = Augmenter(AugmentConfig(model=str(prior), strength=0.1, steps=10, num_variations=2, device="cpu"))
    out, report = f.filter({**aug(images, np.arange(4), ids), "parent_embedding": np.repeat(f.embed(images), 2, 0)})
    assert out["score"].min() > 0.9, out["score"]
    assert report.kept_fraction == 1.0
