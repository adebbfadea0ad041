import numpy as np
import pytest
import torch
from torch import nn

from dda_ray.config import SynthesisConfig
from dda_ray.data import Normalize
from dda_ray.models import Generator, RotationHead, build_model, rotate_batch
from dda_ray.synthesis import BNStatsHook, Synthesizer, bn_hooks

NORM = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def small_cfg(**kw) -> SynthesisConfig:
    base = dict(nz=32, ngf=16, batch_size=8, g_steps=6, adv=10.0)
    base.update(kw)
    return SynthesisConfig(**base)


def teacher_with_stats(seed: int = 0) -> nn.Module:
    """A random wrn16_1 whose BN running stats are non-trivial (as after training)."""
    torch.manual_seed(seed)
    t = build_model("wrn16_1", 10)
    for m in t.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return t.eval()


def test_bn_loss_zero_when_batch_matches_running_stats_and_positive_otherwise():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(16, 4, 5, 5) * 2 + 1
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.permute(1, 0, 2, 3).reshape(4, -1).var(1, unbiased=False))
    hook = BNStatsHook(bn)
    bn(x)
    assert hook.loss.item() == pytest.approx(0.0, abs=1e-5)
    bn(x * 3 + 2)
    assert hook.loss.item() > 1.0
    hook.remove()
    hook.loss = None
    bn(x)
    assert hook.loss is None  # removed hooks stop recording


def test_bn_hooks_cover_every_batchnorm_layer():
    t = teacher_with_stats()
    hooks = bn_hooks(t)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in t.modules())
    assert len(hooks) == n_bn > 0
    t(torch.rand(2, 3, 32, 32))
    assert all(h.loss is not None and h.loss.item() > 0 for h in hooks)
    for h in hooks:
        h.remove()


def test_rotation_labels_and_head_shapes():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = torch.tensor([1, 7])
    xr, yr = rotate_batch(x, y, 10)
    assert xr.shape == (8, 3, 4, 4)
    assert yr.tolist() == [4, 28, 5, 29, 6, 30, 7, 31]  # 4*y + k, k-major
    assert torch.equal(xr[:2], x)
    assert torch.equal(xr[2], torch.rot90(x[0], 1, dims=(1, 2)))
    assert torch.equal(xr[4 + 1], torch.rot90(x[1], 2, dims=(1, 2)))
    head = RotationHead(64, 10)
    out = head(torch.randn(8, 64) * 1e3)
    assert out.shape == (8, 40)
    # L2-normalised output: logits on the unit sphere, so the adversarial -CE the generator maximises is bounded
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-5)


def test_generator_output_range_and_seeded_reinit():
    g = Generator(nz=32, ngf=16, img_size=32)
    out = g(torch.randn(4, 32))
    assert out.shape == (4, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    g.reset_parameters(torch.Generator().manual_seed(1))
    w1 = g.l1.weight.clone()
    g.reset_parameters(torch.Generator().manual_seed(1))
    assert torch.equal(w1, g.l1.weight)
    g.reset_parameters(torch.Generator().manual_seed(2))
    assert not torch.equal(w1, g.l1.weight)


def test_synthesis_round_decreases_loss_and_returns_bank_rows():
    torch.manual_seed(0)
    syn = Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(g_steps=25))
    res = syn.run_round(3, seed=11)
    assert len(res.losses) == 25
    assert res.best_loss < res.losses[0]
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    b = res.batch
    assert b.images.shape == (8, 32, 32, 3) and b.images.dtype == np.uint8
    assert b.teacher_logits.shape == (8, 10) and b.teacher_embedding.shape == (8, 64)
    assert (b.rounds == 3).all() and (b.seeds == 11).all()
    assert len(set(b.ids)) == 8 and b.ids[0] == "r00003-s11-00000"
    assert ((b.labels >= 0) & (b.labels < 10)).all()


def test_generator_is_reinitialised_every_round_and_rounds_are_reproducible():
    syn = Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(g_steps=3))
    syn.run_round(0, seed=5)
    after_first = syn.generator.l1.weight.clone()
    r_a = syn.run_round(1, seed=6)
    # A new round starts from fresh weights, not from where the last round ended ...
    fresh = Generator(32, 16, 32)
    fresh.reset_parameters(torch.Generator().manual_seed(6))
    syn.generator.reset_parameters(torch.Generator().manual_seed(6))
    assert torch.equal(syn.generator.l1.weight, fresh.l1.weight)
    assert not torch.equal(after_first, fresh.l1.weight)
    # ... so the same seed gives the same images whatever ran before.
    r_b = syn.run_round(1, seed=6)
    assert np.array_equal(r_a.batch.images, r_b.batch.images)


def test_adversarial_term_uses_student_without_changing_it():
    from dda_ray.config import DistillConfig
    from dda_ray.distill import Distiller

    teacher = teacher_with_stats()
    d = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=1))
    before = {k: v.clone() for k, v in d.student_module.state_dict().items()}
    syn = Synthesizer(teacher, NORM, 10, small_cfg(g_steps=3))
    plain = syn.run_round(0, seed=1, adv=0.0)
    adv = syn.run_round(0, seed=1, student=d.student_module, rot_head=d.rot_head)
    assert not np.allclose(plain.losses[1:], adv.losses[1:])  # the adversarial term changes the objective
    for k, v in d.student_module.state_dict().items():
        assert torch.equal(v, before[k]), k  # student weights and BN stats untouched
    assert all(p.grad is None for p in d.student_module.parameters())


def test_teacher_without_batchnorm_is_refused():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x, return_features=False):
            return self.fc(x.flatten(1))

    with pytest.raises(ValueError, match="BatchNorm"):
        Synthesizer(NoBN(), NORM, 10, small_cfg())
