"""The augment/filter stages in-process: the variation cache and the fused stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dda_ray.config import load_config
from dda_ray.data.columns import decode_image_column, encode_image_column
from dda_ray.engines.stages import AugmentStage, FilterStage, FusedStage, augment_cache_dir, augment_cache_key
from dda_ray.models.checkpoint import save_classifier

from .._helpers import teacher_with_stats
from .._tiny_pipelines import build_tiny_prior


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_assets")
    build_tiny_prior(root / "prior", num_classes=10, image_size=16)
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    return root


def stage_cfg(tmp_path, assets, **overrides):
    base = {
        "run.output_dir": str(tmp_path),
        "data.image_size": 16,
        "teacher.arch": "wrn16_1",
        "teacher.checkpoint": str(assets / "teacher"),
        "augment.model": str(assets / "prior"),
        "augment.num_variations": 2,
        "augment.steps": 4,
        "augment.strength": 0.5,
        "filter.threshold": 0.0,
        "filter.grid_batches": 0,
        "resources.torch_threads": 1,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def bank_batch(ids, seed):
    images = np.random.default_rng(seed).integers(0, 256, (len(ids), 16, 16, 3), dtype=np.uint8)
    return {"id": np.array(ids), "image": encode_image_column(images), "label": np.arange(len(ids)) % 10}


def test_cache_hits_need_the_same_id_and_the_same_pixels(tmp_path, assets):
    cfg = stage_cfg(tmp_path, assets)
    stage = AugmentStage(cfg.to_dict())
    first = stage(bank_batch(["a", "b"], seed=0))
    again = AugmentStage(cfg.to_dict())(bank_batch(["a", "b"], seed=0))  # a restarted actor: all from the cache
    assert np.array_equal(np.stack(first["image"]), np.stack(again["image"]))
    assert len(list(augment_cache_dir(cfg).glob("*.npy"))) == 2
    # Same ids, other pixels (another run's round with its own student): recomputed, not served stale.
    other = AugmentStage(cfg.to_dict())(bank_batch(["a", "b"], seed=1))
    assert len(list(augment_cache_dir(cfg).glob("*.npy"))) == 4
    v_first = decode_image_column(first["image"][2:], (16, 16, 3))
    v_other = decode_image_column(other["image"][2:], (16, 16, 3))
    assert not np.array_equal(v_first, v_other)


def test_a_stage_whose_parents_are_all_cached_never_loads_the_prior(tmp_path, assets):
    """The pipeline is loaded at the first cache miss: a warm stage (a trial with seen (strength, guidance), a
    later pass) neither imports diffusers nor reads the prior. Proved on a prior made unloadable after the
    cache was filled, with its files' sizes and mtimes (the cache key) kept: hits still work, a miss fails."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from dda_ray.augment.augmenter import AugmentError
    from dda_ray.runtime import read_jsonl

    prior = tmp_path / "prior"
    shutil.copytree(assets / "prior", prior)
    cfg = stage_cfg(tmp_path, assets, **{"augment.model": str(prior)})
    batch = bank_batch(["a", "b"], seed=0)
    cold = AugmentStage(cfg.to_dict())
    assert not cold.loaded  # nothing loaded before a batch needs it
    first = cold(batch)
    assert cold.loaded
    key = augment_cache_dir(cfg)

    for weights in prior.rglob("*.safetensors"):  # garbage of the same size, same mtime: same cache key
        st = weights.stat()
        weights.write_bytes(b"\0" * st.st_size)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert augment_cache_dir(cfg) == key

    warm = AugmentStage(cfg.to_dict())
    again = warm(batch)
    assert not warm.loaded and warm.totals == {"parents": 2, "cache_hits": 2}
    assert np.array_equal(np.stack(first["image"]), np.stack(again["image"]))
    with pytest.raises(AugmentError, match="augment.model"):
        warm(bank_batch(["c"], seed=3))  # a miss needs the pipeline: now it loads (and this one cannot)
    loads = [e for e in read_jsonl(cfg.run_dir / "timeline.jsonl") if e["event"] == "prior_loaded"]
    assert len(loads) == 1  # the cold stage's only

    # In a fresh process: serving hits imports no diffusers at all (seconds per actor start).
    code = (
        "import json, sys; import numpy as np; from dda_ray.engines.stages import AugmentStage; from dda_ray.data.columns import encode_image_column; "
        "cfg, ids = json.loads(sys.argv[1]), ['a', 'b']; "
        "images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8); "
        "stage = AugmentStage(cfg); stage({'id': np.array(ids), 'image': encode_image_column(images), 'label': np.arange(2)}); "
        "print(json.dumps({'hits': stage.totals['cache_hits'], 'loaded': stage.loaded, 'diffusers': 'diffusers' in sys.modules}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"hits": 2, "loaded": False, "diffusers": False}


def test_a_retrained_model_at_the_same_path_gets_a_new_cache_key(tmp_path, assets):
    import shutil

    prior = tmp_path / "prior"
    shutil.copytree(assets / "prior", prior)
    cfg = stage_cfg(tmp_path, assets, **{"augment.model": str(prior)})
    before = augment_cache_dir(cfg)
    weights = next(prior.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten in place, as a retraining would
    assert augment_cache_dir(cfg) != before


def test_stock_image_variations_get_their_own_cache_key(tmp_path):
    """sd_image_variations at strength 1 (now the stock pipeline) must not read caches written when it was SDEdit;
    every other setting keeps its key, so existing caches stay valid."""
    import hashlib
    import json

    def old_key(cfg):
        a = cfg.augment
        raw = [a.backend, a.model, a.strength, a.guidance, a.steps, a.num_variations, a.seed, a.prompt_template, a.image_resolution]
        raw.append(cfg.data.image_size)
        return hashlib.sha1(json.dumps(raw).encode()).hexdigest()[:16]

    hub = "augment.model=lambdalabs/sd-image-variations-diffusers"  # not a local path: the key hashes the name only
    for backend, strength in [("sd_image_variations", 0.5), ("sd_img2img", 1.0), ("local_prior", 1.0)]:
        cfg = load_config(None, [f"run.output_dir={tmp_path}", hub, f"augment.backend={backend}", f"augment.strength={strength}"])
        assert augment_cache_key(cfg) == old_key(cfg)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", hub, "augment.backend=sd_image_variations", "augment.strength=1.0"])
    assert augment_cache_key(cfg) != old_key(cfg)


def test_fused_stage_equals_augment_then_filter(tmp_path, assets):
    cfg = stage_cfg(tmp_path, assets)
    batch = bank_batch(["a", "b", "c"], seed=2)
    separate = FilterStage(cfg.to_dict())(AugmentStage(cfg.to_dict())(batch))
    fused = FusedStage(cfg.to_dict())(batch)
    assert set(fused) == set(separate) == {"id", "parent_id", "image", "label", "variation", "score"}
    assert fused["id"].tolist() == separate["id"].tolist()
    assert np.allclose(fused["score"], separate["score"])
    assert sum(v == -1 for v in fused["variation"]) == 3  # originals always pass


def test_each_stage_runs_on_the_device_its_resources_give_it():
    """Device choice with fake GPU lists: a stage that reserves GPUs uses the one Ray assigned
    (cuda:0 after Ray narrows CUDA_VISIBLE_DEVICES); one that reserves none stays on the CPU even
    where GPUs are visible; an explicit device wins; outside Ray, auto means CUDA when present."""
    import torch

    from dda_ray.engines.stages import stage_device

    assert stage_device("auto", 1.0, [3]) == torch.device("cuda:0")
    assert stage_device("auto", 0.5, ["0"]) == torch.device("cuda:0")
    assert stage_device("auto", 0.0, [0, 1]) == torch.device("cpu")  # visible, but not reserved
    assert stage_device("auto", 1.0, []) == torch.device("cpu")  # reserved on paper, none assigned
    assert stage_device("cuda:1", 0.0, []) == torch.device("cuda:1")
    assert stage_device("cpu", 1.0, [0]) == torch.device("cpu")
    assert stage_device("auto", 0.0, None, cuda_available=True) == torch.device("cuda")
    assert stage_device("auto", 1.0, None, cuda_available=False) == torch.device("cpu")


def test_stages_built_outside_ray_keep_the_cpu_on_this_machine(tmp_path, tiny_assets):
    """The local engine's stages (no Ray actor): augment and filter models on the CPU here."""
    from dda_ray.config import load_config
    from dda_ray.engines.stages import AugmentStage, FilterStage

    overrides = {
        "run.output_dir": tmp_path,
        "teacher.arch": "wrn16_1",
        "teacher.checkpoint": tiny_assets / "teacher",
        "augment.model": tiny_assets / "prior",
        "resources.filter_gpus": 1,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert AugmentStage(cfg.to_dict()).augmenter.device.type == "cpu"
    assert next(FilterStage(cfg.to_dict()).filter.teacher.parameters()).device.type == "cpu"


def test_a_batch_rejected_whole_is_counted_in_the_stream_log_not_printed_per_batch(tmp_path, assets, capsys):
    """The filter stage says nothing per batch; its log lines mark the batches it kept no variation
    of (with their best score), and the epoch's stream totals count them for the one epoch line."""
    from dda_ray.augment.filter import all_rejected_line
    from dda_ray.engines.stages import read_stream_stats

    cfg = stage_cfg(tmp_path, assets, **{"filter.threshold": 1.0})
    augment, filt = AugmentStage(cfg.to_dict()), FilterStage(cfg.to_dict())
    for i in range(3):
        filt(augment(bank_batch([f"a{i}", f"b{i}"], seed=i)))
    assert "rejected" not in capsys.readouterr().out
    st = read_stream_stats(cfg.run_dir)
    assert (st["filter_batches"], st["all_rejected_batches"], st["variations"], st["kept"]) == (3, 3, 12, 0)
    assert -1.0 <= st["all_rejected_max_score"] < 1.0
    line = all_rejected_line(4, st)
    assert line.startswith("warning: epoch 4: the cosine filter rejected every variation of 3 of 3 batches")
    assert "kept 0 of 12 variations" in line
    assert all_rejected_line(4, {**st, "all_rejected_batches": 0}) is None
