import math

import pytest
import torch
import torch.nn.functional as F

from dda_ray.config import DistillConfig
from dda_ray.data import to_float
from dda_ray.distill.kd import Distiller, feature_loss, kd_loss, load_training_state, save_training_state
from dda_ray.models import build_model

from .._helpers import NORM, small_cfg, teacher_with_stats


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
    from dda_ray.synthesis.synthesizer import Synthesizer

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
    from dda_ray.distill.kd import rotation_every

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
    for off in (["run.mode=real_kd"], ["synthesis.adv=0"], ["synthesis.rounds_per_epoch=0"], ["synthesis.method=fast"], ["synthesis.adv_term=kl"]):
        assert rotation_every(load_config("configs/cifar10_cpu_smoke.yaml", off)) == 0, off


def test_rotate_views_draws_distinct_rotations_per_image_with_joint_labels():
    from dda_ray.distill.kd import rotate_views
    from dda_ray.models import rotate_batch

    x = torch.randn(6, 3, 8, 8)
    y = torch.arange(6)
    full, full_y = rotate_views(x, y, 4)
    ref, ref_y = rotate_batch(x, y, 10)
    assert torch.equal(full, ref) and torch.equal(full_y, ref_y)  # 4 views: DDA's batch, no draws
    for views in (1, 2, 3):
        xr, yr = rotate_views(x, y, views, torch.Generator().manual_seed(views))
        assert xr.shape == (views * 6, 3, 8, 8) and yr.shape == (views * 6,)
        ks = (yr - 4 * y.repeat(views)).view(views, 6)
        assert ((ks >= 0) & (ks < 4)).all()
        for i in range(6):
            assert len(set(ks[:, i].tolist())) == views  # distinct rotations of one image
            for v in range(views):
                assert torch.equal(xr[v * 6 + i], torch.rot90(x[i], int(ks[v, i]), dims=(1, 2)))
    assert len({tuple(rotate_views(x, y, 1, torch.Generator().manual_seed(s))[1].tolist()) for s in range(5)}) > 1  # drawn, not fixed


def _one_step(seed: int = 0, **cfg) -> tuple[Distiller, dict]:
    torch.manual_seed(seed)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1, **cfg), rotation_every=1)
    x, y = _synthetic_images(8, seed=8)
    out = d.train_step(x, y, torch.Generator().manual_seed(1))
    return d, out


def test_kd_step_returns_device_tensors_and_channels_last_gives_the_same_step():
    d_cl, cl = _one_step(channels_last=True)
    d_plain, plain = _one_step(channels_last=False)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in cl.values())
    assert set(cl) == {"loss", "kd", "ce", "fea", "rot"}
    conv = next(m for m in d_cl.student_module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4
    for k in cl:
        assert float(cl[k]) == pytest.approx(float(plain[k]), rel=1e-3, abs=1e-5), k  # another convolution order rounds otherwise (~1e-4 here)
    for (k, a), b in zip(d_cl.student_module.state_dict().items(), d_plain.student_module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), k  # float rounding of another convolution order


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_trains_in_float32_weights_close_to_the_full_precision_step(amp, tmp_path):
    d_amp, low = _one_step(amp=amp)
    _, full = _one_step(amp="none")
    assert next(d_amp.student_module.parameters()).dtype == torch.float32  # autocast: the weights stay float32
    assert d_amp.scaler.is_enabled() == (amp == "fp16")
    for k in ("loss", "kd", "ce"):
        assert math.isfinite(float(low[k])) and float(low[k]) == pytest.approx(float(full[k]), rel=0.1), (k, low[k], full[k])
    save_training_state(tmp_path / "s.pt", d_amp, 1)
    d2 = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1, amp=amp))
    load_training_state(tmp_path / "s.pt", d2)
    assert d2.scaler.state_dict() == d_amp.scaler.state_dict()  # fp16: the loss scale survives a resume


def test_compiled_step_matches_the_eager_step_and_saves_plain_weights(tmp_path):
    d_c, compiled = _one_step(compile=True, compile_backend="eager")
    d_e, eager = _one_step()
    assert d_c.student is not d_c.student_module  # the step ran the compiled callable
    for k in compiled:
        assert float(compiled[k]) == pytest.approx(float(eager[k]), rel=1e-5, abs=1e-6), k
    assert not any("_orig_mod" in k for k in d_c.state_dict()["student"])  # checkpoints stay loadable without compile
    save_training_state(tmp_path / "s.pt", d_c, 1)
    load_training_state(tmp_path / "s.pt", Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1)))


def test_fewer_rotation_views_train_the_head_on_that_many_rotations():
    torch.manual_seed(0)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1), rotation_views=1)
    x, y = _synthetic_images(8, seed=9)
    seen = []
    forward = d.student_module.forward
    d.student_module.forward = lambda inp, **kw: (seen.append(inp.shape[0]), forward(inp, **kw))[1]
    w = d.rot_head.net[0].weight.clone()
    d.train_step(x, y, torch.Generator().manual_seed(0))
    assert seen[-1] == 8  # the head's forward: one rotated copy per image, not four
    assert not torch.equal(d.rot_head.net[0].weight, w)


def test_epoch_loop_reads_losses_in_blocks_and_stops_a_diverged_run_at_its_step():
    from dda_ray.distill.kd import SYNC_EVERY, train_loop

    x, y = _synthetic_images(8, seed=10)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1, steps_per_epoch=SYNC_EVERY + 5, lr=0.01))
    step = d.train_step
    calls = []

    def failing(images, labels, generator=None):
        out = step(images, labels, generator)
        calls.append(1)
        if len(calls) == SYNC_EVERY + 3:
            out["loss"] = torch.tensor(float("nan"))
        return out

    class Source:
        def prepare_epoch(self, epoch, distiller):
            return {}

        def batches(self, epoch):
            while True:
                yield x, y

    metrics = train_loop(d, Source(), lambda m: {"acc": 1.0, "loss": 0.0}, lambda m, e: None, progress=False, log=lambda s: None)
    assert metrics["steps"] == SYNC_EVERY + 5 and math.isfinite(metrics["loss_kd"]) and metrics["loss_kd"] > 0
    d.train_step = failing
    d.cfg = DistillConfig(epochs=2, steps_per_epoch=SYNC_EVERY + 5, lr=0.01)
    with pytest.raises(FloatingPointError, match=f"epoch 2, step {SYNC_EVERY + 3}:"):
        train_loop(d, Source(), lambda m: {"acc": 1.0, "loss": 0.0}, lambda m, e: None, start_epoch=1, progress=False, log=lambda s: None)
    assert len(calls) == SYNC_EVERY + 5  # read at the epoch's end: the steps after the bad one ran


# ------------------------------------------- faithfulness to the references (issue #26)
@pytest.mark.parametrize("ce,fea", [(1.0, 30.0), (0.5, 7.0), (0.0, 0.0)])
def test_kd_step_is_kl_plus_ce_plus_feature_mse_on_the_reference_layer(ce, fea):
    """The step's loss, recomputed here from its definition: KL * T^2 + ce * CE(y) + fea * MSE(align(s), t)
    on the WRNs' raw block-3 outputs (DDA's features[-2], before the final BN/ReLU)."""
    import copy

    torch.manual_seed(0)
    x, y = _synthetic_images(8, seed=3)
    teacher = build_model("wrn16_2", 10).eval()
    d = Distiller(build_model("wrn16_1", 10), teacher, NORM, 10, DistillConfig(epochs=1, temperature=4.0, ce=ce, fea=fea))
    student, align = copy.deepcopy(d.student_module), copy.deepcopy(d.align_module)
    g = torch.Generator().manual_seed(5)
    xa = d.transform(to_float(x), torch.Generator().manual_seed(5))  # the step's own draws
    out = d.train_step(x, y, g)
    with torch.no_grad():
        t_logits, s_logits = teacher(xa), student(xa)
        t_map, s_map = teacher.blocks(teacher.conv1(xa)), student.blocks(student.conv1(xa))
        kl = F.kl_div(F.log_softmax(s_logits / 4, 1), F.softmax(t_logits / 4, 1), reduction="batchmean") * 16
        expected = kl + ce * F.cross_entropy(s_logits, y) + fea * F.mse_loss(align(s_map, t_map.shape[-2:]), t_map)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out["kd"].item() == pytest.approx(kl.item(), rel=1e-4)


def test_kd_terms_follow_the_method_that_made_the_rows():
    from dda_ray.config import load_config

    def terms(*ov):
        dc = load_config(None, list(ov)).distill
        return dc.ce, dc.fea

    assert terms("synthesis.method=dda") == (1.0, 30.0)  # DDA: KL + CE on the round's targets + feature term
    assert terms("synthesis.method=fast") == (0.0, 0.0)  # every other method of the references: KL alone
    assert terms("synthesis.method=cmi", "synthesis.cr=0.8") == (0.0, 0.0)
    assert terms("synthesis.method=fast", "run.mode=dda") == (0.0, 0.0)  # augmented fast rows: still fast's rows
    assert terms("synthesis.method=fast", "run.mode=real_kd") == (1.0, 30.0)  # real rows, real labels
    assert terms("synthesis.method=fast", "distill.ce=0.3") == (0.3, 0.0)  # unless the config says
    x, y = _synthetic_images(8, seed=4)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, load_config(None, ["synthesis.method=fast"]).distill)
    out = d.train_step(x, y, torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(out["kd"].item(), rel=1e-6)  # KL alone


def test_building_the_distiller_leaves_the_students_batchnorm_statistics_alone():
    student = build_model("wrn16_1", 10)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    Distiller(student, teacher_with_stats(), NORM, 10, DistillConfig(epochs=1))
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert student.training


def test_under_cutmix_the_rotation_head_trains_on_the_unmixed_images_its_labels_describe():
    x, y = _synthetic_images(8, seed=7)
    d = Distiller(build_model("wrn16_1", 10), teacher_with_stats(), NORM, 10, DistillConfig(epochs=1, mix="cutmix"), rotation_every=1)
    seen = []
    step = d.rotation_step
    d.rotation_step = lambda xs, ys, gen=None: (seen.append(xs.clone()), step(xs, ys, gen))[1]
    d.train_step(x, y, torch.Generator().manual_seed(3))
    unmixed = d.transform(to_float(x), torch.Generator().manual_seed(3))
    torch.testing.assert_close(seen[0], unmixed)


def test_align_head_is_ddas_regressor():
    from torch import nn

    from dda_ray.models import AlignHead

    head = AlignHead(16, 32).eval()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 16, 1, 1), (64, 64, 3, 3), (32, 64, 1, 1)]  # 2 x teacher channels inside
    assert all(c.bias is None for c in convs)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(head(x, (4, 4)), head.net(F.adaptive_avg_pool2d(x, (4, 4))))  # pooled before, not after
        assert head(x, (8, 8)).shape == (2, 32, 8, 8)
