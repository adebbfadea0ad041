import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dda_ray.config import ConfigError, load_config
from dda_ray.models import Generator, RotationHead, build_model, rotate_batch
from dda_ray.synthesis.synthesizer import BNStatsHook, Synthesizer, bn_hooks

from .._helpers import NORM, small_cfg, teacher_with_stats


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


@pytest.mark.parametrize("method", ["dda", "cmi"])
def test_generator_is_reinitialised_every_round_and_rounds_are_reproducible(method):
    syn = Synthesizer(teacher_with_stats(), NORM, 10, small_cfg(g_steps=3, method=method))
    seen = []  # the generator's first-layer weights each time run_round first calls it
    syn.generator.register_forward_pre_hook(lambda m, _in: seen.append(m.l1.weight.detach().clone()))
    syn.run_round(0, seed=5)
    after_first = syn.generator.l1.weight.detach().clone()
    seen.clear()
    r_a = syn.run_round(1, seed=6)
    # The round's generator starts from the initialisation its seed gives, not from where the last round ended ...
    fresh = Generator(32, 16, 32)
    fresh.reset_parameters(torch.Generator().manual_seed(6))
    assert torch.equal(seen[0], fresh.l1.weight) and not torch.equal(seen[0], after_first)
    # ... so the same seed gives the same images after other rounds (dda; cmi's chain differs: its own test)
    if method == "dda":
        syn.run_round(2, seed=9)
        r_b = syn.run_round(1, seed=6)
        assert np.array_equal(r_a.batch.images, r_b.batch.images)


@pytest.mark.parametrize("method", ["dda", "cmi", "fast"])
def test_adversarial_term_uses_student_without_changing_it(method):
    from dda_ray.config import DistillConfig
    from dda_ray.distill.kd import Distiller

    teacher = teacher_with_stats()
    # the kl term (cmi, fast) only sees images both classify alike: a student close to the teacher
    student = build_model("wrn16_1", 10) if method == "dda" else _student_like(teacher)
    d = Distiller(student, teacher, NORM, 10, DistillConfig(epochs=1))
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
    assert all(p.requires_grad for p in d.student_module.parameters())  # unfrozen again for distillation
    assert d.student_module.training and d.rot_head.training


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

    dda = Synthesizer(teacher, NORM, 10, small_cfg())
    assert dda.state_dict() == {"method": "dda"}
    dda.load_state_dict({"method": "dda"})
    dda.load_state_dict({"method": "cmi"})  # a checkpoint from before the rename: the DDA synthesizer carried no state
    with pytest.raises(ValueError, match="'fast'.*'dda'"):
        dda.load_state_dict(state)
    with pytest.raises(ValueError, match="'dda'.*'fast'"):
        resumed.load_state_dict(dda.state_dict())


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
    assert load_config().synthesis.method == "dda" and load_config().synthesis.meta_lr is None
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


# ------------------------------------------- faithfulness to the references (issue #26)
def _student_like(teacher: nn.Module, noise: float = 0.05) -> nn.Module:
    """A student that mostly agrees with the teacher (its weights, perturbed): the masked KL sees images."""
    import copy

    s = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(noise * torch.randn_like(p) * p.abs().mean())
    return s.train()


@pytest.mark.parametrize("term", ["rotation", "kl"])
def test_the_adversarial_term_is_maximised(term):
    """Only the adversarial term (oh = bn = 0): the kept images make the student *more* wrong than
    the round's first images, measured here from scratch; a flipped sign would make it less."""
    from dda_ray.synthesis.synthesizer import kl_adv_loss

    torch.manual_seed(0)
    teacher = teacher_with_stats()
    student = _student_like(teacher)
    head = RotationHead(student.feature_dim, 10)
    cfg = small_cfg(method="dda", adv_term=term, oh=0.0, bn=0.0, adv=1.0, g_steps=12, lr_g=0.02, batch_size=16)
    syn = Synthesizer(teacher, NORM, 10, cfg)
    first = []
    syn.generator.register_forward_hook(lambda m, i, out: first.append(out.detach().clone()) if not first else None)
    res = syn.run_round(0, seed=3, student=student, rot_head=head)
    labels = torch.as_tensor(res.batch.labels)

    def fooled(x):  # the term's value (larger = student more fooled), on un-augmented images
        student.eval()
        with torch.no_grad():
            if term == "rotation":
                xr, yr = rotate_batch(NORM(x), labels, 10)
                return F.cross_entropy(head(student(xr, return_features=True).embedding), yr).item()
            return -kl_adv_loss(student(NORM(x)), teacher(NORM(x))).item()

    kept = torch.as_tensor(res.batch.images).permute(0, 3, 1, 2).float() / 255
    assert fooled(kept) > fooled(first[0]) + 1e-3


def test_kl_adversarial_term_masks_disagreeing_images():
    from dda_ray.synthesis.synthesizer import kl_adv_loss

    t = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # agrees on image 0, not on image 1
    kl0 = F.kl_div(F.log_softmax(s[:1], 1), F.softmax(t[:1], 1), reduction="sum")
    assert kl_adv_loss(s, t).item() == pytest.approx(-kl0.item() / 2, rel=1e-6)
    assert kl_adv_loss(-t, t).item() == 0.0  # no image agrees: no term


def test_round_with_the_student_computes_no_student_weight_gradients():
    teacher = teacher_with_stats()
    student = build_model("wrn16_1", 10).train()
    head = RotationHead(student.feature_dim, 10)
    fired = []
    for p in list(student.parameters()) + list(head.parameters()):
        p.register_hook(lambda g: fired.append(1))
    Synthesizer(teacher, NORM, 10, small_cfg(g_steps=2)).run_round(0, seed=1, student=student, rot_head=head)
    assert not fired  # frozen during the round: no weight gradient was computed
    assert all(p.requires_grad for p in student.parameters()) and student.training


def test_fast_meta_gradient_is_the_sum_of_the_inner_steps_and_its_lr_follows_the_round():
    teacher = teacher_with_stats()
    syn = Synthesizer(teacher, NORM, 10, small_cfg(method="fast", g_steps=2, lr_g=0.004), seed=1)
    inner: dict[str, list[torch.Tensor]] = {}
    for name, p in syn.generator.named_parameters():
        p.register_hook(lambda g, name=name: inner.setdefault(name, []).append(g.detach().clone()))
    seen = {}
    step = syn.meta_optimizer.step

    def meta_step(*a, **k):
        seen["grads"] = {n: p.grad.clone() for n, p in syn.meta_generator.named_parameters()}
        seen["lr"] = syn.meta_optimizer.param_groups[0]["lr"]
        return step(*a, **k)

    syn.meta_optimizer.step = meta_step
    syn.run_round(0, seed=2, g_steps=3)  # a round with other steps than cfg.g_steps (the initial bank's init_g_steps)
    assert seen["lr"] == pytest.approx(0.004 * 3)  # Fast: lr_g * that round's iterations
    for name, grads in inner.items():
        assert len(grads) == 3
        torch.testing.assert_close(seen["grads"][name], torch.stack(grads).sum(0))


def test_memory_bank_fills_then_overwrites_the_oldest_rows():
    from dda_ray.synthesis.synthesizer import MemoryBank

    bank = MemoryBank(5, 2)
    assert len(bank) == 0 and bank.sample(3).shape == (0, 2)
    bank.add(torch.arange(6.0).view(3, 2))
    bank.add(torch.arange(6.0, 14.0).view(4, 2))  # rows 0..6: 5 fit, the 6th and 7th overwrite rows 0 and 1
    assert len(bank) == 5
    assert bank.data[:, 0].tolist() == [10.0, 12.0, 4.0, 6.0, 8.0]
    draw = bank.sample(3, torch.Generator().manual_seed(0))
    assert draw.shape == (3, 2) and len({tuple(r) for r in draw.tolist()}) == 3
    assert bank.sample(99).shape == (5, 2)
    other = MemoryBank(5, 2)
    other.load_state_dict(bank.state_dict())
    other.add(torch.tensor([[99.0, 0.0]]))
    assert other.data[:, 0].tolist() == [10.0, 12.0, 99.0, 6.0, 8.0]


def test_cmi_contrastive_loss_is_infonce_of_local_against_global_views():
    teacher = teacher_with_stats()
    syn = Synthesizer(teacher, NORM, 10, small_cfg(method="cmi", cr_t=0.5))
    d = syn.cmi_dim
    torch.manual_seed(0)
    g, loc = torch.randn(4, d), torch.randn(4, d)
    proj = lambda x: F.normalize(syn.cmi_head.net(x), dim=1)  # noqa: E731
    # empty bank: plain mean of CE(local_i . global_j / T, target i)
    logits = proj(loc) @ proj(g).T / 0.5
    expected = F.cross_entropy(logits, torch.arange(4))
    torch.testing.assert_close(syn.contrastive_loss(g, loc, torch.Generator().manual_seed(0)), expected)
    # with rows in the bank: they join both sides, and the mean is split between batch and bank rows
    syn.memory.add(torch.randn(3, 2 * d))
    cached = syn.memory.data  # 3 rows, fewer than cmi_negatives: all drawn (in a random order)
    got = syn.contrastive_loss(g, loc, torch.Generator().manual_seed(0))
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0))
    cl, cg = cached[order].split(d, dim=1)
    logits = proj(torch.cat([loc, cl])) @ proj(torch.cat([g, cg])).T / 0.5
    ce = F.cross_entropy(logits, torch.arange(7), reduction="none")
    torch.testing.assert_close(got, ce[:4].mean() + ce[4:].mean())


def test_cmi_rounds_fill_the_memory_bank_train_the_head_and_resume_exactly(tmp_path):
    teacher = teacher_with_stats()
    cfg = small_cfg(method="cmi", g_steps=3)
    syn = Synthesizer(teacher, NORM, 10, cfg, seed=2)
    head0 = {k: v.clone() for k, v in syn.cmi_head.state_dict().items()}
    plain = Synthesizer(teacher, NORM, 10, small_cfg(method="dda", g_steps=3, adv=0.0)).run_round(0, seed=7)
    r0 = syn.run_round(0, seed=7, adv=0.0)
    assert len(syn.memory) == 8 and syn.memory.data.shape[1] == 2 * syn.cmi_dim and syn.rounds_done == 1
    assert not all(torch.equal(v, head0[k]) for k, v in syn.cmi_head.state_dict().items())  # the head learns (Adam, lr_g)
    assert r0.losses != plain.losses  # the contrastive term is in the objective
    torch.save(syn.state_dict(), tmp_path / "s.pt")
    expected = syn.run_round(1, seed=8)
    resumed = Synthesizer(teacher, NORM, 10, cfg, seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    got = resumed.run_round(1, seed=8)
    assert got.losses == expected.losses and np.array_equal(got.batch.images, expected.batch.images)
    assert len(resumed.memory) == 16
    resumed.reset_chain()  # a fresh chain: the head from the seed, an empty bank
    assert len(resumed.memory) == 0 and resumed.rounds_done == 0


def test_each_method_takes_its_reference_weights_unless_the_config_sets_them():
    for method, (adv, bn, oh, term) in {"dda": (10.0, 1.0, 1.0, "rotation"), "cmi": (0.5, 1.0, 1.0, "kl"), "fast": (1.1, 10.0, 0.4, "kl")}.items():
        extra = ["synthesis.cr=0.8"] if method == "cmi" else []
        sc = load_config(None, [f"synthesis.method={method}", *extra]).synthesis
        assert (sc.adv, sc.bn, sc.oh, sc.adv_term) == (adv, bn, oh, term), method
    sc = load_config(None, ["synthesis.method=fast", "synthesis.adv=2", "synthesis.adv_term=rotation"]).synthesis
    assert (sc.adv, sc.bn, sc.adv_term) == (2.0, 10.0, "rotation")
    # an old config naming the DDA synthesizer 'cmi' (no contrastive weight) gets one error naming the new name
    with pytest.raises(ConfigError, match="synthesis.method = 'dda'"):
        load_config(None, ["synthesis.method=cmi"])
    with pytest.raises(ConfigError, match="synthesis.cr"):
        load_config(None, ["synthesis.method=dda", "synthesis.cr=0.8"])
    with pytest.raises(ConfigError, match="synthesis.adv_term"):
        load_config(None, ["synthesis.adv_term=foo"])
