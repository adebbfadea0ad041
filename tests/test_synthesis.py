import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dda_ray.config import ConfigError, SynthesisConfig, load_config
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


def teacher_fitted(seed: int = 1) -> nn.Module:
    """A random wrn16_1 whose BN running stats are those of smooth random images through its own
    weights: statistics a generator can actually reach, so progress across rounds shows."""
    torch.manual_seed(seed)
    t = build_model("wrn16_1", 10)
    for m in t.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    t.train()
    with torch.no_grad():
        for _ in range(4):
            t(NORM(F.interpolate(torch.rand(32, 3, 8, 8), size=32, mode="bilinear")))
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
    # the references' initialisation: conv/linear weights N(0, 0.02), zero biases, BN scales N(1, 0.02)
    convs = [m for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 0.002 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    scales = torch.cat([m.weight for m in bns])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01) and scales.std().item() == pytest.approx(0.02, rel=0.3)


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


@pytest.mark.parametrize("method", ["cmi", "fast"])
def test_adversarial_term_uses_student_without_changing_it(method):
    from dda_ray.config import DistillConfig
    from dda_ray.distill import Distiller

    teacher = teacher_with_stats()
    d = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=1))
    before = {k: v.clone() for k, v in d.student_module.state_dict().items()}
    head_before = {k: v.clone() for k, v in d.rot_head.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = Synthesizer(teacher, NORM, 10, small_cfg(g_steps=3, method=method)).run_round(0, seed=1, adv=0.0)
    syn = Synthesizer(teacher, NORM, 10, small_cfg(g_steps=3, method=method))
    adv = syn.run_round(0, seed=1, student=d.student_module, rot_head=d.rot_head)
    assert not np.allclose(plain.losses[1:], adv.losses[1:])  # the adversarial term changes the objective
    for k, v in d.student_module.state_dict().items():
        assert torch.equal(v, before[k]), k  # student weights and BN stats untouched
    for k, v in d.rot_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in d.student_module.parameters())
    assert all(p.grad is None for p in d.rot_head.parameters())


def test_teacher_without_batchnorm_is_refused():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x, return_features=False):
            return self.fc(x.flatten(1))

    with pytest.raises(ValueError, match="BatchNorm"):
        Synthesizer(NoBN(), NORM, 10, small_cfg())


# ----------------------------------------------------------------- fast (meta-synthesis)
def test_fast_meta_generator_learns_across_rounds_and_keeps_bn_momentum_stats():
    teacher = teacher_with_stats()
    syn = Synthesizer(teacher, NORM, 10, small_cfg(method="fast", g_steps=3), seed=4)
    assert syn.bn_momentum_stats is None and syn.rounds_done == 0
    meta_before = {k: v.clone() for k, v in syn.meta_generator.state_dict().items()}
    res = syn.run_round(0, seed=5)
    assert len(res.losses) == 3 and res.batch.images.shape == (8, 32, 32, 3)
    changed = [k for k, v in syn.meta_generator.named_parameters() if not torch.equal(v, meta_before[k])]
    assert changed == [k for k, _ in syn.meta_generator.named_parameters()]  # one meta step moved every weight
    assert all(p.grad is None for p in syn.meta_generator.parameters())
    assert syn.rounds_done == 1
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(syn.bn_momentum_stats) == len(layers)
    for (mean, var), bn in zip(syn.bn_momentum_stats, layers, strict=True):
        assert mean.shape == var.shape == bn.running_mean.shape and not mean.requires_grad
    # the meta-generator's initialisation is seeded by the synthesizer's seed
    other = Synthesizer(teacher, NORM, 10, small_cfg(method="fast"), seed=4)
    assert torch.equal(other.meta_generator.l1.weight, meta_before["l1.weight"])
    assert not torch.equal(Synthesizer(teacher, NORM, 10, small_cfg(method="fast"), seed=5).meta_generator.l1.weight, meta_before["l1.weight"])
    # bn_momentum = 0 turns the momentum statistics off
    off = Synthesizer(teacher, NORM, 10, small_cfg(method="fast", g_steps=2, bn_momentum=0.0))
    off.run_round(0, seed=5)
    assert off.bn_momentum_stats is None and off.rounds_done == 1


def test_fast_chain_is_deterministic_for_a_seed():
    def chain(seed):
        syn = Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(method="fast", g_steps=2), seed=seed)
        return [syn.run_round(r, seed=10 + r).batch.images for r in range(3)]

    a, b, c = chain(0), chain(0), chain(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])


def test_fast_state_dict_resumes_the_chain_exactly(tmp_path):
    teacher = teacher_with_stats()
    cfg = small_cfg(method="fast", g_steps=2)
    full = Synthesizer(teacher, NORM, 10, cfg, seed=3)
    full.run_round(0, seed=20)
    expected = full.run_round(1, seed=21)

    first = Synthesizer(teacher, NORM, 10, cfg, seed=3)
    first.run_round(0, seed=20)
    torch.save(first.state_dict(), tmp_path / "synthesis.pt")
    state = torch.load(tmp_path / "synthesis.pt", weights_only=True)
    resumed = Synthesizer(teacher, NORM, 10, cfg, seed=99)  # the state, not the seed, decides
    resumed.load_state_dict(state)
    assert resumed.rounds_done == 1
    got = resumed.run_round(1, seed=21)
    assert np.array_equal(got.batch.images, expected.batch.images)
    assert got.losses == expected.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed.meta_generator.state_dict().values(), full.meta_generator.state_dict().values(), strict=True))

    cmi = Synthesizer(teacher, NORM, 10, small_cfg())
    assert cmi.state_dict() == {"method": "cmi"}
    cmi.load_state_dict({"method": "cmi"})
    with pytest.raises(ValueError, match="'fast'.*'cmi'"):
        cmi.load_state_dict(state)
    with pytest.raises(ValueError, match="'cmi'.*'fast'"):
        resumed.load_state_dict(cmi.state_dict())


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_meta_learning_lowers_the_loss_of_few_step_rounds(seed):
    teacher = teacher_fitted(1)

    def best_losses(**kw):
        syn = Synthesizer(teacher, NORM, 10, small_cfg(method="fast", g_steps=2, adv=0.0, batch_size=16, lr_g=5e-3, **kw), seed=seed)
        return [syn.run_round(r, seed=100 * seed + r).best_loss for r in range(6)]

    meta = best_losses()
    assert meta[5] < 0.9 * meta[0]
    if seed == 0:  # without meta updates the same rounds do not improve
        frozen = best_losses(meta_lr=1e-9)
        assert frozen[0] == meta[0] and frozen[5] > 0.95 * frozen[0] and meta[5] < 0.8 * frozen[5]


def test_bn_momentum_target_blends_batch_and_momentum_statistics():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 2.0]))
    # channel 0: values 1 and 3 (mean 2, var 1); channel 1: values 0 and 4 (mean 2, var 4)
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    mmt = (torch.tensor([4.0, 0.0]), torch.tensor([3.0, 1.0]))
    hook = BNStatsHook(bn, momentum=0.9, momentum_stats=mmt)
    bn(x)
    # target mean = 0.1 * (2, 2) + 0.9 * (4, 0) = (3.8, 0.2); target var = 0.1 * (1, 4) + 0.9 * (3, 1) = (2.8, 1.3)
    expected = np.hypot(0.0 - 3.8, 1.0 - 0.2) + np.hypot(1.0 - 2.8, 2.0 - 1.3)
    assert hook.loss.item() == pytest.approx(expected, rel=1e-6)
    mean, var = hook.next_momentum_stats()  # 0.9 * momentum + 0.1 * batch
    assert torch.allclose(mean, torch.tensor([3.8, 0.2])) and torch.allclose(var, torch.tensor([2.8, 1.3]))
    hook.remove()
    # no momentum statistics yet (first round): the plain batch statistics, which become the momentum
    first = BNStatsHook(bn, momentum=0.9)
    bn(x)
    assert first.loss.item() == pytest.approx(np.hypot(2.0, 1.0) + np.hypot(0.0, 2.0), rel=1e-6)
    mean, var = first.next_momentum_stats()
    assert torch.equal(mean, torch.tensor([2.0, 2.0])) and torch.equal(var, torch.tensor([1.0, 4.0]))
    first.remove()
    # momentum 0: the batch statistics even when a momentum estimate is given
    plain = BNStatsHook(bn, momentum=0.0, momentum_stats=mmt)
    bn(x)
    assert plain.loss.item() == pytest.approx(np.hypot(2.0, 1.0) + np.hypot(0.0, 2.0), rel=1e-6)
    plain.remove()


def test_synthesis_config_validates_the_fast_fields():
    cfg = load_config(None, ["synthesis.method=fast", "synthesis.meta_lr=0.02", "synthesis.bn_momentum=0"])
    assert cfg.synthesis.method == "fast" and cfg.synthesis.meta_lr == 0.02 and cfg.synthesis.bn_momentum == 0.0
    assert load_config().synthesis.method == "cmi" and load_config().synthesis.meta_lr is None
    for override, field in [
        ("synthesis.method=foo", "synthesis.method"),
        ("synthesis.bn_momentum=1", "synthesis.bn_momentum"),
        ("synthesis.bn_momentum=-0.1", "synthesis.bn_momentum"),
        ("synthesis.lr_z=0", "synthesis.lr_z"),
        ("synthesis.meta_lr=0", "synthesis.meta_lr"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config(None, [override])
    with pytest.raises(ValueError, match="method"):
        Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(method="foo"))
