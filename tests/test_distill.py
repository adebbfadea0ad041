import math

import pytest
import torch
import torch.nn.functional as F

from dda_ray.config import DistillConfig
from dda_ray.data import to_float
from dda_ray.distill import Distiller, feature_loss, kd_loss, load_training_state, save_training_state
from dda_ray.models import build_model

from .test_synthesis import NORM, small_cfg, teacher_with_stats


def test_kd_loss_matches_hand_computed_value():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    assert kd_loss(s, t, T).item() == pytest.approx(kl * T * T, rel=1e-6)
    assert kd_loss(t, t, 20.0).item() == pytest.approx(0.0, abs=1e-3)


def test_feature_loss_is_mse():
    a, b = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert feature_loss(a, b).item() == pytest.approx(1.0)


def _synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dda_ray.synthesis import Synthesizer

    syn = Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(batch_size=n, g_steps=4))
    b = syn.run_round(0, seed=seed).batch
    return torch.from_numpy(b.images), torch.from_numpy(b.labels)


def _heldout_kl(d: Distiller, images: torch.Tensor) -> float:
    d.student_module.eval()
    with torch.no_grad():
        x = NORM(to_float(images))
        kl = F.kl_div(F.log_softmax(d.student_module(x), 1), F.softmax(d.teacher(x), 1), reduction="batchmean").item()
    d.student_module.train()
    return kl


def test_short_kd_run_reduces_kl_to_teacher_on_heldout_synthetic_images():
    torch.manual_seed(0)
    train_x, train_y = _synthetic_images(32, seed=1)
    held_x, _ = _synthetic_images(32, seed=2)
    teacher = teacher_with_stats()
    d = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=1, lr=0.05, temperature=4.0, fea=1.0, ce=0.0))
    before = _heldout_kl(d, held_x)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        losses = d.train_step(train_x, train_y, g)
    assert set(losses) == {"loss", "kd", "ce", "fea", "rot"}
    after = _heldout_kl(d, held_x)
    assert after < 0.7 * before, (before, after)


def test_training_state_round_trip(tmp_path):
    teacher = teacher_with_stats()
    d1 = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=3))
    x, y = _synthetic_images(8, seed=3)
    d1.train_step(x, y)
    d1.scheduler.step()
    g = torch.Generator().manual_seed(7)
    save_training_state(tmp_path / "state.pt", d1, 1, {"next_round": 12}, g)
    assert not list(tmp_path.glob(".*tmp"))
    d2 = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=3))
    g2 = torch.Generator().manual_seed(99)
    epoch, extra = load_training_state(tmp_path / "state.pt", d2, g2)
    assert epoch == 1 and extra == {"next_round": 12}
    assert torch.equal(g.get_state(), g2.get_state())
    assert d2.lr == pytest.approx(d1.lr)
    for (k, a), b in zip(d1.student_module.state_dict().items(), d2.student_module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_rotation_head_reset_restores_fresh_weights_and_keeps_its_optimiser():
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1))
    x, y = _synthetic_images(8, seed=4)
    w0 = d.rot_head.net[0].weight.clone()
    d.train_step(x, y)
    trained = d.rot_head.net[0].weight.clone()
    assert not torch.equal(w0, trained)  # the head takes a step after each KD step
    momentum = {k: v["momentum_buffer"].clone() for k, v in enumerate(d.rot_optimizer.state.values())}
    assert momentum  # momentum buffers exist
    d.reset_rotation_head(torch.Generator().manual_seed(3))
    fresh = d.rot_head.net[0].weight.clone()
    assert not torch.equal(fresh, trained)
    assert fresh.std().item() == pytest.approx(0.02, rel=0.2)  # N(0, 0.02), as the reference re-initialises it
    d.reset_rotation_head(torch.Generator().manual_seed(3))
    assert torch.equal(d.rot_head.net[0].weight, fresh)  # seeded
    # the optimiser (SGD lr 0.1, momentum 0.9, wd 1e-4) and its momentum survive the reset, as in the reference
    group = d.rot_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    for k, v in enumerate(d.rot_optimizer.state.values()):
        assert torch.equal(v["momentum_buffer"], momentum[k])


def test_rotation_step_leaves_the_students_batchnorm_statistics_alone():
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1))
    x, y = _synthetic_images(8, seed=5)
    xf = d.transform(to_float(x))
    before = {k: v.clone() for k, v in d.student_module.state_dict().items()}
    head_before = d.rot_head.net[0].weight.clone()
    d.rotation_step(xf, y)
    assert d.student_module.training  # the mode is restored
    assert not torch.equal(d.rot_head.net[0].weight, head_before)  # the head did learn
    for k, v in d.student_module.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean/var and num_batches_tracked unchanged


def test_rotation_head_trains_every_kth_step_and_never_when_no_round_uses_it():
    from dda_ray.config import load_config
    from dda_ray.distill import rotation_every

    x, y = _synthetic_images(8, seed=6)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1), rotation_every=2)
    w = d.rot_head.net[0].weight.clone()
    first = d.train_step(x, y)
    assert "rot" not in first and torch.equal(d.rot_head.net[0].weight, w)
    second = d.train_step(x, y)
    assert "rot" in second and not torch.equal(d.rot_head.net[0].weight, w)
    assert d.state_dict()["kd_steps"] == 2  # saved: a resumed run trains the head on the same steps
    never = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1), rotation_every=0)
    w = never.rot_head.net[0].weight.clone()
    assert "rot" not in never.train_step(x, y) and torch.equal(never.rot_head.net[0].weight, w)
    cfg = load_config("configs/cifar10_cpu_smoke.yaml", ["synthesis.rotation_every=3"])
    assert rotation_every(cfg) == 3
    for off in (["run.mode=real_kd"], ["synthesis.adv=0"], ["synthesis.rounds_per_epoch=0"]):
        assert rotation_every(load_config("configs/cifar10_cpu_smoke.yaml", off)) == 0, off
