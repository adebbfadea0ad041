"""Model inversion: synthesise class-conditional images from the teacher alone.

One round: a generator and a latent batch ``z`` are optimised jointly (Adam) for ``g_steps``
iterations so that, on a randomly cropped/flipped copy of the images,

* the teacher predicts the target labels (one-hot CE, weight ``oh``),
* every teacher BatchNorm layer sees the batch statistics it stored in training
  (DeepInversion loss: ``||mean - running_mean||_2 + ||var - running_var||_2``, weight ``bn``),
* and, once a student exists, a rotation head on the student's embedding is *fooled*
  (negative CE on the joint (class, rotation) label, weight ``adv``): the images move to
  where the student is still uncertain.

The lowest-loss batch of the round is kept and returned as a :class:`BankBatch` carrying the
teacher's logits and embedding for each image.

Two methods (``synthesis.method``) differ in where a round's generator comes from:

* ``cmi``: a freshly initialised generator every round (seeded by the round's seed), many
  steps (``g_steps`` ~ hundreds); rounds are independent of each other.
* ``fast`` (Fast-Datafree's meta-synthesis): one *meta-generator* persists across rounds. Each
  round clones it and runs only a few inner steps (``g_steps`` ~ 2-10; the latents at their own
  rate ``lr_z``); the fast generator's gradients of every inner step are summed into the
  meta-generator, which its own Adam steps once per round (first-order MAML), so the
  meta-generator learns an initialisation that few steps turn into good images. The BN
  loss's target is smoothed across rounds: with momentum ``m = bn_momentum`` the batch
  statistics are blended, ``(1 - m) * batch + m * momentum``, with a momentum estimate updated
  from each round's last batch. Rounds form a chain: a round depends on every earlier round run
  on the same :class:`Synthesizer`; :meth:`Synthesizer.state_dict` holds what continues it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import SYNTHESIS_METHODS, Config, SynthesisConfig
from .data.bank import BankBatch, make_ids
from .data.transforms import Normalize, random_crop, random_flip, to_uint8
from .models import Classifier, Generator, RotationHead, rotate_batch
from .models.heads import init_dcgan
from .runtime import derive_seed

BNStats = tuple[torch.Tensor, torch.Tensor]  # per-channel (mean, var) of a BatchNorm layer's input


class BNStatsHook:
    """Forward hook recording the DeepInversion loss of one BatchNorm layer.

    With ``momentum`` m > 0 and a momentum estimate ``momentum_stats`` = (mean_m, var_m) from
    earlier rounds, the statistics compared with the layer's running stats are the blend
    ``(1 - m) * batch + m * momentum`` (the ``fast`` method); otherwise the batch's own.
    """

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0, momentum_stats: BNStats | None = None):
        self.loss: torch.Tensor | None = None
        self.batch_stats: BNStats | None = None  # (mean, var) of the last batch seen, detached
        self.momentum, self.momentum_stats = momentum, momentum_stats
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs, _output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
        self.batch_stats = (mean.detach(), var.detach())
        if self.momentum > 0 and self.momentum_stats is not None:
            m = self.momentum
            mean = (1 - m) * mean + m * self.momentum_stats[0]
            var = (1 - m) * var + m * self.momentum_stats[1]
        self.loss = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def next_momentum_stats(self) -> BNStats:
        """The momentum estimate after a round from its last batch: that batch's statistics on
        the first round, ``m * momentum + (1 - m) * batch`` afterwards (detached)."""
        if self.batch_stats is None:
            raise RuntimeError("the hooked BatchNorm layer has not seen a batch yet")
        mean, var = self.batch_stats
        if self.momentum_stats is None:
            return mean.clone(), var.clone()
        m = self.momentum
        return m * self.momentum_stats[0] + (1 - m) * mean, m * self.momentum_stats[1] + (1 - m) * var

    def remove(self) -> None:
        self.handle.remove()


def bn_hooks(model: nn.Module, momentum: float = 0.0, momentum_stats: list[BNStats] | None = None) -> list[BNStatsHook]:
    """One hook per BatchNorm2d layer of ``model`` (module order); ``momentum_stats`` in that order."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if momentum_stats is not None and len(momentum_stats) != len(layers):
        raise ValueError(f"{len(momentum_stats)} BN momentum statistics for {len(layers)} BatchNorm layers")
    return [BNStatsHook(m, momentum, None if momentum_stats is None else momentum_stats[i]) for i, m in enumerate(layers)]


def rotation_adv_loss(student: Classifier, rot_head: RotationHead, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative CE of the rotation head on rotated copies (maximised by the generator)."""
    xr, yr = rotate_batch(x, labels, rot_head.num_classes)
    logits = rot_head(student(xr, return_features=True).embedding)
    return -F.cross_entropy(logits, yr)


@dataclass
class RoundResult:
    batch: BankBatch
    losses: list[float] = field(default_factory=list)  # total loss per step
    best_loss: float = float("inf")


class Synthesizer:
    """Runs synthesis rounds against a fixed teacher (eval mode; its weights never change).

    ``cfg.method`` picks the generator of a round (module docstring): ``cmi`` re-initialises it
    from the round's seed; ``fast`` clones a meta-generator initialised once from ``seed`` and
    meta-learned across rounds. The ``fast`` meta update is first-order MAML (the reference's
    default); its Reptile variant is not implemented.
    """

    def __init__(
        self,
        teacher: Classifier,
        normalize: Normalize,
        num_classes: int,
        cfg: SynthesisConfig,
        image_size: int = 32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        self.teacher = teacher.eval().to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.normalize, self.num_classes, self.cfg = normalize, num_classes, cfg
        self.device = torch.device(device)
        self.generator = Generator(cfg.nz, cfg.ngf, image_size).to(self.device)
        if not any(isinstance(m, nn.BatchNorm2d) for m in self.teacher.modules()):
            raise ValueError("the teacher has no BatchNorm2d layers: the DeepInversion loss needs them")
        if cfg.method not in SYNTHESIS_METHODS:
            raise ValueError(f"unknown synthesis method {cfg.method!r}; expected one of {SYNTHESIS_METHODS}")
        self.method = cfg.method
        # fast only: the persistent meta-generator, its optimiser, the BN momentum statistics
        # (one (mean, var) per teacher BatchNorm layer, module order) and the rounds run so far
        self.meta_generator: Generator | None = None
        self.meta_optimizer: torch.optim.Adam | None = None
        self.bn_momentum_stats: list[BNStats] | None = None
        self.rounds_done = 0
        if self.method == "fast":
            meta = copy.deepcopy(self.generator).cpu()  # initialised on the CPU: the seeded torch.Generator is a CPU one
            init_dcgan(meta, torch.Generator().manual_seed(derive_seed(seed, "meta_generator")))
            self.meta_generator = meta.to(self.device)
            self.meta_optimizer = torch.optim.Adam(self.meta_generator.parameters(), lr=self._meta_lr(), betas=(0.5, 0.999))

    def _meta_lr(self) -> float:
        return self.cfg.meta_lr if self.cfg.meta_lr is not None else self.cfg.lr_g * self.cfg.g_steps

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Differentiable random crop (4 px padding) + flip, then normalisation."""
        return self.normalize(random_flip(random_crop(x, 4, gen), gen))

    def run_round(
        self,
        round_idx: int,
        seed: int,
        batch_size: int | None = None,
        g_steps: int | None = None,
        adv: float | None = None,
        student: Classifier | None = None,
        rot_head: RotationHead | None = None,
        progress: bool = False,
    ) -> RoundResult:
        """One round of ``g_steps`` steps seeded by ``seed`` (latents, labels, augmentation;
        cmi: the generator's weights too). ``fast`` also advances the meta-generator chain."""
        cfg = self.cfg
        fast = self.method == "fast"
        batch_size = batch_size or cfg.batch_size
        g_steps = g_steps or cfg.g_steps
        adv = cfg.adv if adv is None else adv
        use_adv = adv > 0 and student is not None and rot_head is not None
        gen = torch.Generator().manual_seed(seed)
        if fast:
            self.generator.load_state_dict(self.meta_generator.state_dict())  # the round's fast generator
        else:
            self.generator.reset_parameters(gen)
        self.generator.train()
        z = torch.randn(batch_size, cfg.nz, generator=gen).to(self.device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (batch_size,), generator=gen).to(self.device)
        if fast:
            groups = [{"params": self.generator.parameters()}, {"params": [z], "lr": cfg.lr_z}]
        else:
            groups = [{"params": self.generator.parameters()}, {"params": [z]}]
        opt = torch.optim.Adam(groups, lr=cfg.lr_g, betas=(0.5, 0.999))
        if use_adv:
            student_mode, head_mode = student.training, rot_head.training
            student.eval()
            rot_head.eval()
        losses: list[float] = []
        bar = tqdm(range(g_steps), desc=f"synthesis round {round_idx}", disable=not progress, leave=False, mininterval=2)
        # only while synthesising: distillation shares this teacher
        hooks = bn_hooks(self.teacher, cfg.bn_momentum, self.bn_momentum_stats) if fast else bn_hooks(self.teacher)
        try:
            meta_step = self._accumulate_meta_grad if fast else None
            best_loss, best_x = self._optimise(
                bar, z, targets, opt, gen, hooks, losses, adv if use_adv else 0.0, student, rot_head, meta_step
            )
            if fast:
                self.meta_optimizer.step()
                self.meta_optimizer.zero_grad(set_to_none=True)
                if cfg.bn_momentum > 0:
                    self.bn_momentum_stats = [h.next_momentum_stats() for h in hooks]
                self.rounds_done += 1
        finally:
            for h in hooks:
                h.remove()
        if use_adv:
            student.train(student_mode)
            rot_head.train(head_mode)
            student.zero_grad(set_to_none=True)
            rot_head.zero_grad(set_to_none=True)
        images = to_uint8(best_x)
        logits, emb = self.teacher_outputs(images)
        batch = BankBatch(
            ids=make_ids(round_idx, seed, batch_size),
            images=images,
            labels=targets.cpu().numpy().astype(np.int64),
            teacher_logits=logits,
            teacher_embedding=emb,
            rounds=np.full(batch_size, round_idx, dtype=np.int32),
            seeds=np.full(batch_size, seed, dtype=np.int64),
        )
        return RoundResult(batch, losses, best_loss)

    def _optimise(self, steps, z, targets, opt, gen, hooks, losses, adv, student, rot_head, after_backward=None):
        cfg = self.cfg
        best_loss, best_x = float("inf"), None
        for step in steps:
            x = self.generator(z)
            xa = self._augment(x, gen)
            logits = self.teacher(xa)
            loss = cfg.oh * F.cross_entropy(logits, targets) + cfg.bn * sum(h.loss for h in hooks)
            if adv > 0:
                loss = loss + adv * rotation_adv_loss(student, rot_head, xa, targets)
            value = loss.item()
            losses.append(value)
            if value < best_loss:
                best_loss, best_x = value, x.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
        return best_loss, best_x

    def _accumulate_meta_grad(self, step: int) -> None:
        """First-order MAML: the fast generator's gradient of every inner step, summed into the
        meta-generator's ``.grad`` (cleared at the round's first step)."""
        if step == 0:
            self.meta_optimizer.zero_grad(set_to_none=True)
        for meta_p, fast_p in zip(self.meta_generator.parameters(), self.generator.parameters(), strict=True):
            if fast_p.grad is None:
                continue
            if meta_p.grad is None:
                meta_p.grad = fast_p.grad.detach().clone()
            else:
                meta_p.grad.add_(fast_p.grad)

    def state_dict(self) -> dict[str, Any]:
        """What continues this synthesizer's chain exactly, as plain tensors/numbers/dicts
        (``torch.save`` it; ``torch.load(..., weights_only=True)`` reads it back). ``cmi`` rounds
        carry no state between them: its dict names the method only."""
        if self.method != "fast":
            return {"method": self.method}

        def cpu(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.detach().cpu().clone()
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(cpu(v) for v in obj)
            return obj

        stats = None if self.bn_momentum_stats is None else [{"mean": m, "var": v} for m, v in self.bn_momentum_stats]
        return cpu(
            {
                "method": "fast",
                "rounds_done": self.rounds_done,
                "meta_generator": self.meta_generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_momentum_stats": stats,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a synthesizer of the same method (and generator and
        teacher shapes). The meta-optimiser's learning rate is this config's; its moments and step
        count come from ``state``."""
        method = state.get("method") if isinstance(state, dict) else None
        if method != self.method:
            raise ValueError(f"synthesis state of method {method!r} cannot be loaded into a {self.method!r} synthesizer")
        if self.method != "fast":
            return
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in self.teacher.modules())
        stats = state["bn_momentum_stats"]
        if stats is not None and len(stats) != n_bn:
            raise ValueError(f"synthesis state has BN momentum statistics for {len(stats)} layers; the teacher has {n_bn}")
        self.meta_generator.load_state_dict(state["meta_generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self._meta_lr()
        self.bn_momentum_stats = None if stats is None else [(s["mean"].to(self.device), s["var"].to(self.device)) for s in stats]
        self.rounds_done = int(state["rounds_done"])

    def teacher_outputs(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Teacher logits and pooled embeddings of uint8 NHWC images (as stored in the bank)."""
        return teacher_outputs(self.teacher, self.normalize, images, batch_size, self.device)


@torch.no_grad()
def teacher_outputs(teacher, normalize, images, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``teacher``'s logits and pooled embeddings (float32 numpy) of uint8 NHWC ``images`` (numpy or tensor)."""
    from .data.transforms import to_float

    logits, embs = [], []
    for i in range(0, len(images), batch_size):
        out = teacher(normalize(to_float(images[i : i + batch_size]).to(device)), return_features=True)
        logits.append(out.logits.float().cpu().numpy())
        embs.append(out.embedding.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(embs)



def build_synthesizer(cfg: Config, teacher: Classifier, normalize: Normalize, device: torch.device | str = "cpu") -> Synthesizer:
    """The run's synthesizer: ``cfg.synthesis`` against ``teacher``, seeded by ``cfg.run.seed``."""
    return Synthesizer(teacher, normalize, cfg.data.num_classes, cfg.synthesis, cfg.data.image_size, device, seed=cfg.run.seed)
