"""Knowledge distillation: the losses, one KD step, and THE epoch loop.

``train_loop`` is the only distillation loop in the project; the run driver
(:func:`dda_ray.distill.driver.drive`) runs it on both engines, the single-process one
(:mod:`dda_ray.engines.local`) and every Ray Train worker (:mod:`dda_ray.engines.ray_train`), each with its own
:class:`TrainSource` (where batches come from) and way of reporting (where checkpoints go).

KD step: ``KL(student/T || teacher/T) * T^2 + ce * CE(student, y)
+ fea * MSE(align(student map), teacher map)``; the teacher runs on the fly (under
``torch.inference_mode``) on the same randomly cropped/flipped batch. ``ce`` and ``fea`` follow the
reference of the method that made the rows unless the config sets them (``DistillConfig``: DDA's
rows CE + feature term, CMI's and Fast's KL alone); the maps are each network's
``ModelOutput.feature_map``, the layer DDA aligns. After every
``rotation_every``-th KD step the rotation head (used by the adversarial synthesis term) takes one
SGD step on rotated copies of the batch (``rotation_views`` of the four rotations per image), with
the student in eval mode and its features detached: the step must not move the student's BatchNorm
statistics (evaluation would otherwise use statistics of rotated images).

Speed switches (``DistillConfig``): ``channels_last`` memory format for the models and batches,
``amp`` (bf16 / fp16 autocast; fp16 with a gradient scaler) and ``compile`` (``torch.compile`` of the
student and teacher forward). The loss terms stay on the device: a step makes no host sync, and
the epoch loop reads them (and checks they are finite) every ``SYNC_EVERY`` steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import DistillConfig
from ..data.transforms import Normalize, TrainTransform, to_float
from ..models import AlignHead, Classifier, RotationHead, rotate_batch
from ..progress import bar as progress_bar


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: batch-mean KL(softmax(t/T) || softmax(s/T)) scaled by T^2."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def mix_batch(x: torch.Tensor, mode: str, alpha: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a shuffled copy of itself: ``cutmix`` pastes a box of the partner image
    (area ``1 - lam``), ``mixup`` blends the pixels ``lam : 1 - lam``, with ``lam ~ Beta(alpha,
    alpha)``. Returns (mixed batch, partner index per row, ``lam`` = the share of the own image;
    for cutmix the box's exact area after clipping). Draws only from ``generator``."""
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=generator).to(x.device)
    draw = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(draw).beta(alpha, alpha))
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    if mode != "cutmix":
        raise ValueError(f"unknown mix mode {mode!r}")
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = (int(v) for v in torch.randint(0, 2**31 - 1, (2,), generator=generator))
    cy, cx = cy % h, cx % w
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return mixed, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def feature_loss(aligned: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(aligned, teacher_map)


SYNC_EVERY = 25  # KD steps between the epoch loop's reads of the loss terms (one host sync each)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rotate_views(x: torch.Tensor, labels: torch.Tensor, views: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``views`` distinct rotations (of 0/90/180/270 degrees) of every image, drawn at random per
    image (all four, in order, when ``views`` is 4: DDA's batch); joint labels ``4 * y + k``.
    Fewer views give the rotation head an unbiased estimate of the same loss for a
    ``views / 4`` share of the student forward."""
    if views >= 4:
        return rotate_batch(x, labels, 4)
    n = x.shape[0]
    ks = torch.rand(n, 4, generator=generator).argsort(dim=1)[:, :views]  # distinct rotations per image
    out, ys = [], []
    for v in range(views):
        k = ks[:, v].to(x.device)
        rot = x.clone()
        for r in range(1, 4):
            sel = k == r
            if bool(sel.any()):
                rot[sel] = torch.rot90(x[sel], r, dims=(2, 3))
        out.append(rot)
        ys.append(labels * 4 + k)
    return torch.cat(out), torch.cat(ys)


class Distiller:
    """Student + heads + optimisers; one KD step at a time. Teacher stays frozen (eval)."""

    def __init__(
        self,
        student: Classifier,
        teacher: Classifier,
        normalize: Normalize,
        num_classes: int,
        cfg: DistillConfig,
        rotation_lr: float = 0.1,
        device: torch.device | str = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        rotation_every: int = 1,
        rotation_views: int = 4,
    ):
        """``wrap`` (e.g. ``ray.train.torch.prepare_model``) turns the trained modules into DDP
        modules; ``student_module`` always stays the plain model (synthesis, evaluation, saving).
        A ``cfg`` whose ``ce`` / ``fea`` are null (not built through a ``Config``) gets DDA's terms."""
        if cfg.ce is None or cfg.fea is None:
            cfg = dataclasses.replace(cfg)
            cfg.resolve("inversion", "dda")
        self.ce, self.fea = cfg.ce, cfg.fea  # the loss's weights, fixed for the distiller's life
        self.device = torch.device(device)
        self.cfg, self.num_classes, self.normalize = cfg, num_classes, normalize
        self.transform = TrainTransform(normalize.mean.flatten().tolist(), normalize.std.flatten().tolist())
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.student_module = student.to(self.device, memory_format=self.memory_format).train()
        self.teacher = teacher.to(self.device, memory_format=self.memory_format).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():  # channel probe in eval mode: a train-mode forward would move the student's BN statistics
            probe = torch.zeros(2, 3, 32, 32, device=self.device)
            self.student_module.eval()
            try:
                s_ch = self.student_module(probe, return_features=True).feature_map.shape[1]
            finally:
                self.student_module.train()
            t_ch = self.teacher(probe, return_features=True).feature_map.shape[1]
        self.align_module = AlignHead(s_ch, t_ch).to(self.device, memory_format=self.memory_format)
        self.rot_head = RotationHead(self.student_module.feature_dim, num_classes).to(self.device)
        self.student: nn.Module = self.student_module
        self.align: nn.Module = self.align_module
        if wrap is not None:
            self.student = wrap(self.student_module)
            if self.fea > 0:  # an unused DDP module would fail its gradient reduction
                self.align = wrap(self.align_module)
        self.teacher_forward: Callable = self.teacher
        if cfg.compile:  # the compiled callables train and label; the plain modules are saved and evaluated
            self.student = torch.compile(self.student, backend=cfg.compile_backend)
            self.teacher_forward = torch.compile(self.teacher, backend=cfg.compile_backend)
        self.amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.rotation_lr = rotation_lr
        # the rotation head trains every ``rotation_every``-th KD step (0: never, when no round uses it)
        self.rotation_every, self.rotation_views, self.kd_steps = rotation_every, rotation_views, 0
        self.optimizer = torch.optim.SGD(
            list(self.student_module.parameters()) + list(self.align_module.parameters()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs)
        self.rot_optimizer = self._new_rot_optimizer()

    def _new_rot_optimizer(self) -> torch.optim.Optimizer:
        # DDA's head optimiser: SGD at the KD learning rate (0.1), momentum 0.9, weight decay 1e-4.
        return torch.optim.SGD(self.rot_head.parameters(), lr=self.rotation_lr, momentum=0.9, weight_decay=1e-4)

    def reset_rotation_head(self, generator: torch.Generator | None = None) -> None:
        """Called after every synthesis round: the head's weights restart against the new images
        (seeded by ``generator``); its optimiser, momentum included, is kept, as the reference does."""
        self.rot_head.reset_parameters(generator)

    def autocast(self):
        """Mixed precision for the forward passes (``distill.amp``); a no-op when off."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One KD step on a uint8 NHWC batch; returns the loss terms as detached 0-dim tensors on
        the device (no host sync: the caller reads them when it needs them)."""
        cfg = self.cfg
        x = self.transform(to_float(images).to(self.device), generator).contiguous(memory_format=self.memory_format)
        y = labels.to(self.device)
        perm, lam, unmixed = None, 1.0, x
        if cfg.mix != "none" and (cfg.mix_prob >= 1 or float(torch.rand((), generator=generator)) < cfg.mix_prob):
            x, perm, lam = mix_batch(x, cfg.mix, cfg.mix_alpha, generator)  # the teacher labels the mixed images
        with torch.inference_mode(), self.autocast():
            t = self.teacher_forward(x, return_features=True)
        # inference tensors cannot be saved for backward: the two targets leave inference mode as copies
        t_logits, t_map = t.logits.float().clone(), t.feature_map.float().clone()
        with self.autocast():
            s = self.student(x, return_features=True)
            aligned = self.align(s.feature_map, t_map.shape[-2:]) if self.fea > 0 else None
        logits = s.logits.float()  # the losses in float32
        l_kd = kd_loss(logits, t_logits, cfg.temperature)
        l_ce = F.cross_entropy(logits, y)
        if perm is not None:
            l_ce = lam * l_ce + (1 - lam) * F.cross_entropy(logits, y[perm])
        l_fea = feature_loss(aligned.float(), t_map) if aligned is not None else torch.zeros((), device=self.device)
        loss = l_kd + self.ce * l_ce + self.fea * l_fea
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.kd_steps += 1
        out = {"loss": loss.detach(), "kd": l_kd.detach(), "ce": l_ce.detach(), "fea": l_fea.detach()}
        if self.rotation_every and self.kd_steps % self.rotation_every == 0:
            out["rot"] = self.rotation_step(unmixed, y, generator)  # y labels the unmixed images
        return out

    def rotation_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One SGD step of the rotation head on rotated copies of ``x`` (``rotation_views`` per
        image); the student runs in eval mode (its BatchNorm buffers stay as the KD step left them)
        and gets no gradient. Returns the head's loss (detached, on the device)."""
        xr, yr = rotate_views(x, y, self.rotation_views, generator)
        was_training = self.student_module.training
        self.student_module.eval()
        try:
            with torch.inference_mode(), self.autocast():
                emb = self.student_module(xr.contiguous(memory_format=self.memory_format), return_features=True).embedding
        finally:
            self.student_module.train(was_training)
        loss = F.cross_entropy(self.rot_head(emb.float().clone()), yr)
        self.rot_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.rot_optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {
            "student": self.student_module.state_dict(),
            "align": self.align_module.state_dict(),
            "rot_head": self.rot_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rot_optimizer": self.rot_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "kd_steps": self.kd_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.student_module.load_state_dict(state["student"])
        self.align_module.load_state_dict(state["align"])
        self.rot_head.load_state_dict(state["rot_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rot_optimizer.load_state_dict(state["rot_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # fp16 runs: the loss scale it had reached
            self.scaler.load_state_dict(state["scaler"])
        self.kd_steps = int(state.get("kd_steps", 0))
        # The schedule follows this run's distill.epochs (resuming with more epochs extends it):
        # put the closed-form cosine LR for the epochs done back into the optimiser.
        done = self.scheduler.last_epoch
        self.scheduler.T_max = self.cfg.epochs
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(done, self.cfg.epochs) / self.cfg.epochs))

    def epoch_context(self):
        """DDP's uneven-input handling when wrapped: a worker whose shard ends first shadows
        the others' gradient all-reduces instead of hanging them."""
        from contextlib import nullcontext

        ddp = [m for m in (self.student, self.align) if isinstance(m, nn.parallel.DistributedDataParallel)]
        if not ddp:
            return nullcontext()
        from torch.distributed.algorithms.join import Join

        return Join(ddp)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def save_training_state(path, distiller: Distiller, epoch: int, extra: dict | None = None, generator: torch.Generator | None = None) -> None:
    """Everything needed to resume after ``epoch`` epochs, written atomically (temp + rename)."""
    from ..runtime import atomic_write

    state = {"distiller": distiller.state_dict(), "epoch": epoch, "extra": extra or {}, "global_rng": global_rng_state()}
    if generator is not None:
        state["rng"] = generator.get_state()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path, distiller: Distiller, generator: torch.Generator | None = None) -> tuple[int, dict]:
    """Restore a state written by :func:`save_training_state`; returns (epochs done, extra)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    distiller.load_state_dict(state["distiller"])
    if generator is not None and "rng" in state:
        generator.set_state(state["rng"])
    if "global_rng" in state:
        set_global_rng_state(state["global_rng"])
    return int(state["epoch"]), state.get("extra", {})


def global_rng_state() -> dict:
    """torch's and numpy's global RNG (the rotation head is re-initialised from torch's after
    every round): saved so a resumed run draws what the uninterrupted run would have drawn.
    Plain tensors and numbers only, so the state loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))


class TrainSource(Protocol):
    """Where the KD loop's rows come from."""

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        """Work between epochs (synthesis rounds with the student, augmentation); returns stats."""
        ...

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 NHWC images, int64 labels) batches; may be endless (the loop takes steps_per_epoch)."""
        ...


def _read_losses(pending: list[dict[str, torch.Tensor]], sums: dict[str, float], counts: dict[str, int], epoch: int, steps: int) -> None:
    """Add the pending steps' loss terms to ``sums`` / ``counts`` with one host sync, and stop a
    diverged run (a non-finite loss) with the steps it happened between."""
    if not pending:
        return
    keys = sorted({k for p in pending for k in p})
    nan = torch.tensor(float("nan"))
    table = torch.stack([torch.stack([p.get(k, nan.to(p["loss"].device)) for k in keys]) for p in pending]).tolist()
    first = steps - len(pending) + 1
    for i, row in enumerate(table):
        vals = dict(zip(keys, row, strict=True))
        if not math.isfinite(vals["loss"]):
            raise FloatingPointError(
                f"distillation diverged at epoch {epoch + 1}, step {first + i}: loss = {vals['loss']} ({vals}); "
                "lower distill.lr or distill.fea, or resume from the last checkpoint with run.resume=true"
            )
        for k in pending[i]:
            sums[k] = sums.get(k, 0.0) + vals[k]
            counts[k] = counts.get(k, 0) + 1
    pending.clear()


def train_loop(
    distiller: Distiller,
    source: TrainSource,
    evaluate_fn: Callable[[nn.Module], dict],
    report: Callable[[dict, int], None],
    start_epoch: int = 0,
    generator: torch.Generator | None = None,
    progress: bool | Callable[..., object] = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run epochs ``start_epoch..cfg.epochs-1``; ``report(metrics, epoch)`` after each.

    An epoch = the source's between-epoch work, then ``steps_per_epoch`` KD steps (``None``:
    until the source's pass ends; a source that runs dry ends the epoch early, and the step
    count is reported), then evaluation. ``progress``: a tqdm bar of the KD steps (false: none), or
    a tqdm-like class called with ``total`` and ``desc`` (a Ray Train worker passes Ray's
    ``tqdm_ray``, which the driver renders).
    """
    cfg = distiller.cfg
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        prep = source.prepare_epoch(epoch, distiller)
        t_prep = time.perf_counter() - t0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # "rot" is only there on the steps the rotation head trained
        pending: list[dict[str, torch.Tensor]] = []  # loss terms of the steps not read yet (on the device)
        steps, rows = 0, 0
        t1 = time.perf_counter()
        it = source.batches(epoch)
        desc = f"distill epoch {epoch + 1}/{cfg.epochs}"
        if callable(progress):
            bar = progress(total=cfg.steps_per_epoch, desc=desc)
        else:
            bar = progress_bar(total=cfg.steps_per_epoch, desc=desc, disable=not progress, leave=False, mininterval=2)
        wait, first = 0.0, None  # seconds blocked on the source: for the first batch (the stream's start-up, actor start), for the others
        batches = iter(it)
        with distiller.epoch_context():
            while True:
                tw = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    break
                if steps:
                    wait += time.perf_counter() - tw
                else:
                    first = time.perf_counter() - tw
                pending.append(distiller.train_step(images, labels, generator))
                steps += 1
                rows += len(labels)
                bar.update(1)
                last = cfg.steps_per_epoch is not None and steps >= cfg.steps_per_epoch
                if len(pending) >= SYNC_EVERY or last:
                    _read_losses(pending, sums, counts, epoch, steps)
                if last:
                    break
        _read_losses(pending, sums, counts, epoch, steps)
        bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
        end_epoch = getattr(source, "end_epoch", None)
        if end_epoch is not None:
            prep = {**prep, **end_epoch(epoch)}
        log_lines = prep.pop("log_lines", [])
        t_train = time.perf_counter() - t1
        lr = distiller.lr
        distiller.scheduler.step()
        t2 = time.perf_counter()
        ev = evaluate_fn(distiller.student_module)
        t_eval = time.perf_counter() - t2
        metrics = {
            "epoch": epoch + 1,
            "test_acc": ev["acc"],
            "test_loss": ev["loss"],
            "steps": steps,
            "rows": rows,
            "lr": lr,
            "prepare_s": t_prep,
            "train_s": t_train,
            "train_img_per_s": rows / t_train if t_train > 0 else math.nan,
            "first_batch_s": t_train if first is None else first,
            "data_wait_s": wait,
            "eval_s": t_eval,
            **{f"loss_{k}": v / counts[k] for k, v in sums.items()},
            **prep,
        }
        log(f"epoch {epoch + 1}/{cfg.epochs}: test_acc {ev['acc']:.2f}  kd {metrics.get('loss_kd', math.nan):.3f}  steps {steps}  ({t_prep:.0f}s prep, {t_train:.0f}s train)")
        for line in log_lines:  # what the source has to say about this epoch (e.g. the filter's warning), once
            log(line)
        report(metrics, epoch)
    return metrics


def rotation_every(cfg) -> int:
    """How often the run's rotation head trains: ``synthesis.rotation_every`` when rounds with the
    student use it (``synthesis.adv_term: rotation``, ``adv > 0`` and ``rounds_per_epoch > 0``, not
    ``real_kd``), else never (0): its step costs a student forward on four rotated copies of the
    batch, for nothing."""
    sc = cfg.synthesis
    used = cfg.run.mode != "real_kd" and sc.adv_term == "rotation" and sc.adv > 0 and sc.rounds_per_epoch > 0
    return sc.rotation_every if used else 0
