"""The accuracy benchmark's control arms: batch mixing (cutmix / mixup) and banks of photo crops as
extra KD rows (``distill.extra_banks``), beside the synthetic bank or alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dda_ray.augment.crops as crops_module
from dda_ray.augment.crops import read_extra_banks, write_crop_bank
from dda_ray.config import ConfigError
from dda_ray.data.bank import bank_files, read_bank, read_provenance
from dda_ray.data.transforms import to_float
from dda_ray.distill.kd import mix_batch
from dda_ray.engines.local import run_local
from dda_ray.models.checkpoint import fingerprint, load_teacher

from .._helpers import teacher_with_stats, tiny_config

pytestmark = pytest.mark.usefixtures("offline_single_thread")


# ----------------------------------------------------------------- mixing
def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_own_share():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()  # image i is all i
    mixed, perm, lam = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(6))
    for i in range(6):
        own = (mixed[i] == i).all(0)  # pixels still from image i
        other = (mixed[i] == perm[i]).all(0)
        if perm[i] == i:
            continue
        assert (own | other).all()
        rows, cols = torch.nonzero(other, as_tuple=True)
        if len(rows):  # the partner's pixels form one rectangle
            assert other[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert own.float().mean().item() == pytest.approx(lam)
    again = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and again[2] == lam


def test_mixup_blends_pixels_with_lam():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed, perm, lam = mix_batch(x, "mixup", 0.4, torch.Generator().manual_seed(1))
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


def test_mixed_runs_are_reproducible_and_differ_from_unmixed(tmp_path, tiny_teacher, cifar10_decoded):
    common = {"distill.epochs": 1, "synthesis.rounds_per_epoch": 0}
    a = run_local(tiny_config(tmp_path / "a", tiny_teacher, cifar10_decoded, **common, **{"distill.mix": "cutmix"}), progress=False)
    b = run_local(tiny_config(tmp_path / "b", tiny_teacher, cifar10_decoded, **common, **{"distill.mix": "cutmix"}), progress=False)
    c = run_local(tiny_config(tmp_path / "c", tiny_teacher, cifar10_decoded, **common), progress=False)
    assert a["loss_kd"] == b["loss_kd"] and a["test_acc"] == b["test_acc"]
    assert a["loss_kd"] != c["loss_kd"]


# ----------------------------------------------------------------- crop banks
@pytest.fixture
def crop_cfg(tmp_path, tiny_teacher, cifar10_decoded):
    return tiny_config(
        tmp_path, tiny_teacher, cifar10_decoded, **{"augment.prior_source": "photos", "augment.prior_crop_scale": "[0.05, 0.3]"}
    )


def test_crop_bank_is_teacher_labelled_resumable_and_never_reads_the_dataset(crop_cfg, tmp_path, monkeypatch, no_dataset):
    monkeypatch.setattr(crops_module, "CHUNK", 8)
    out = write_crop_bank(crop_cfg, tmp_path / "crops", 20, seed=4, progress=False)
    files = bank_files(out)
    assert len(files) == 3 and no_dataset == []
    bank = read_bank(out)
    assert len(bank) == 20 and len(set(bank.ids.tolist())) == 20 and all(i.startswith("crop-s4-") for i in bank.ids)
    teacher, normalize, _ = load_teacher(crop_cfg)
    with torch.no_grad():
        out_t = teacher(normalize(to_float(torch.from_numpy(bank.images))), return_features=True)
    assert np.array_equal(bank.labels, out_t.logits.argmax(1).numpy())
    assert np.allclose(bank.teacher_embedding, out_t.embedding.numpy(), atol=1e-5)
    assert read_provenance(files[0])["teacher"] == fingerprint(teacher)
    # cut off half-way: the missing file is made again, identical; a complete bank is left alone
    before = [f.read_bytes() for f in files]
    files[1].unlink()
    write_crop_bank(crop_cfg, out, 20, seed=4, progress=False)
    assert [f.read_bytes() for f in bank_files(out)] == before
    # another seed draws other crops
    other = read_bank(write_crop_bank(crop_cfg, tmp_path / "crops5", 20, seed=5, progress=False))
    assert not np.array_equal(other.images, bank.images)


def test_extra_banks_are_checked_against_the_teacher_and_must_hold_rows(crop_cfg, tmp_path, tiny_teacher, cifar10_decoded):
    out = write_crop_bank(crop_cfg, tmp_path / "crops", 6, seed=0, progress=False)
    assert len(read_extra_banks([str(out)], fingerprint(load_teacher(crop_cfg)[0]))) == 6
    with pytest.raises(ConfigError, match="another teacher"):
        read_extra_banks([str(out)], fingerprint(teacher_with_stats(seed=99)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no bank files"):
        read_extra_banks([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="crop bank is cut from photos or a folder"):
        write_crop_bank(tiny_config(tmp_path / "b", tiny_teacher, cifar10_decoded), tmp_path / "x", 4, seed=0)


def test_config_refuses_extra_banks_in_real_kd_and_unknown_mix(tmp_path, tiny_teacher, cifar10_decoded):
    with pytest.raises(ConfigError, match="extra_banks"):
        tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"run.mode": "real_kd", "distill.extra_banks": f"[{tmp_path}]"})
    with pytest.raises(ConfigError, match="distill.mix"):
        tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"distill.mix": "mosaic"})
    with pytest.raises(ConfigError, match="distill.mix_prob"):
        tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"distill.mix_prob": 1.5})


def test_crops_join_the_pool_beside_the_bank_or_alone(crop_cfg, tmp_path, tiny_teacher, cifar10_decoded):
    crops = write_crop_bank(crop_cfg, tmp_path / "crops", 24, seed=0, progress=False)
    extra = {"distill.extra_banks": f"[{crops}]", "distill.epochs": 1}
    beside = run_local(tiny_config(tmp_path / "beside", tiny_teacher, cifar10_decoded, **extra), progress=False)
    assert beside["pool_rows"] == 2 * 16 + 16 + 24  # initial bank + the epoch's round + the crops
    alone_cfg = tiny_config(
        tmp_path / "alone", tiny_teacher, cifar10_decoded, **extra, **{"synthesis.init_rounds": 0, "synthesis.rounds_per_epoch": 0}
    )
    alone = run_local(alone_cfg, progress=False)
    assert alone["pool_rows"] == 24 and alone["steps"] == 3 and np.isfinite(alone["loss_kd"])
    assert bank_files(alone_cfg.run_dir / "bank") == [] and bank_files(alone_cfg.run_dir / "rounds") == []
