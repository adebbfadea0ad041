"""Model inversion: synthesise class-conditional images from the teacher alone.

One round: a generator and a latent batch ``z`` are optimised jointly (Adam) for ``g_steps``
iterations so that, on a randomly cropped/flipped copy of the images,

* the teacher predicts the target labels (one-hot CE, weight ``oh``),
* every teacher BatchNorm layer sees the batch statistics it stored in training
  (DeepInversion loss: ``||mean - running_mean||_2 + ||var - running_var||_2``, weight ``bn``),
* and, once a student exists, the student is *fooled* (weight ``adv``; ``adv_term``): ``rotation``
  (DDA) maximises the CE of a rotation head on the student's embedding over the four rotated
  copies of each image on the joint (class, rotation) label; ``kl`` (CMI, Fast-Datafree) maximises
  the KL between teacher and student predictions on the images both still classify alike. The
  images move to where the student is still uncertain. The student's weights are frozen meanwhile.

The lowest-loss batch of the round is kept and returned as a :class:`BankBatch` carrying the
teacher's logits and embedding for each image.

Three methods (``synthesis.method``), each after its reference code:

* ``dda`` (SLGSP/DDA's synthesizer, CSD-style): a freshly initialised generator every round (seeded by
  the round's seed), many steps (``g_steps`` ~ hundreds), the rotation-adversarial term; rounds
  are independent of each other.
* ``cmi`` (zju-vipa/CMI's contrastive model inversion): as ``dda`` with the ``kl`` term, plus a
  contrastive term (weight ``cr``): the per-sample means of every teacher BatchNorm layer's input
  (instance means) of a *global* view (crop + flip) and of a *local* view (random resized crop of
  25-100 % of the area + flip) go through a projection head (:class:`~dda_ray.models.MLPHead`, Adam
  at ``lr_g``, never reset), and each local feature must pick its own global feature out of the
  batch's and ``cmi_negatives`` drawn from a memory bank holding the (local, global) features of
  every earlier round's kept batch (InfoNCE at temperature ``cr_t``; its mean is split between the
  new batch and the bank's rows once the bank holds any). Rounds form a chain through the head and
  the bank.
* ``fast`` (Fast-Datafree's meta-synthesis): one *meta-generator* persists across rounds. Each
  round clones it and runs only a few inner steps (``g_steps`` ~ 2-10; the latents at their own
  rate ``lr_z``); the fast generator's gradients of every inner step are summed into the
  meta-generator, which its own Adam (lr ``lr_g * g_steps`` of that round) steps once per round
  (first-order MAML), so the meta-generator learns an initialisation that few steps turn into good
  images. The BN loss's target is smoothed across rounds: with momentum ``m = bn_momentum`` the
  batch statistics are blended, ``(1 - m) * batch + m * momentum``, with a momentum estimate
  updated from each round's last batch. The initial bank's rounds are Fast's warm-up (no KD, no
  adversarial term). Rounds form a chain.

A chained method's rounds depend on every earlier round run on the same :class:`Synthesizer`;
:meth:`Synthesizer.state_dict` holds what continues it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import SYNTHESIS_METHODS, Config, SynthesisConfig
from ..data.bank import BankBatch, make_ids
from ..data.transforms import Normalize, random_crop, random_flip, random_resized_crop, to_uint8
from ..models import Classifier, Generator, MLPHead, RotationHead, rotate_batch
from ..models.heads import init_dcgan
from ..progress import bar as progress_bar
from ..runtime import derive_seed

CHAINED_METHODS = ("cmi", "fast")  # methods whose rounds continue a state (Synthesizer.state_dict)

BNStats = tuple[torch.Tensor, torch.Tensor]  # per-channel (mean, var) of a BatchNorm layer's input


class BNStatsHook:
    """Forward hook recording the DeepInversion loss of one BatchNorm layer.

    With ``momentum`` m > 0 and a momentum estimate ``momentum_stats`` = (mean_m, var_m) from
    earlier rounds, the statistics compared with the layer's running stats are the blend
    ``(1 - m) * batch + m * momentum`` (the ``fast`` method); otherwise the batch's own.
    """

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0, momentum_stats: BNStats | None = None, instance_means: bool = False):
        self.loss: torch.Tensor | None = None
        self.batch_stats: BNStats | None = None  # (mean, var) of the last batch seen, detached
        self.momentum, self.momentum_stats = momentum, momentum_stats
        # cmi: each image's per-channel mean of the layer's input (N, C), with its graph (CMI's InstanceMeanHook)
        self.instance_means, self.instance_mean = instance_means, None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs, _output) -> None:
        x = inputs[0]
        if self.instance_means:
            self.instance_mean = x.mean(dim=(2, 3))
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


def bn_hooks(model: nn.Module, momentum: float = 0.0, momentum_stats: list[BNStats] | None = None, instance_means: bool = False) -> list[BNStatsHook]:
    """One hook per BatchNorm2d layer of ``model`` (module order); ``momentum_stats`` in that order."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if momentum_stats is not None and len(momentum_stats) != len(layers):
        raise ValueError(f"{len(momentum_stats)} BN momentum statistics for {len(layers)} BatchNorm layers")
    return [BNStatsHook(m, momentum, None if momentum_stats is None else momentum_stats[i], instance_means) for i, m in enumerate(layers)]


def rotation_adv_loss(student: Classifier, rot_head: RotationHead, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative CE of the rotation head on rotated copies (maximised by the generator)."""
    xr, yr = rotate_batch(x, labels, rot_head.num_classes)
    logits = rot_head(student(xr, return_features=True).embedding)
    return -F.cross_entropy(logits, yr)


def kl_adv_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Negative per-image KL(teacher || student) (T = 1), averaged over the batch with the images
    the two classify differently masked out (CMI's / Fast's "decision adversarial" term)."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="none").sum(1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl * agree).mean()


class MemoryBank:
    """CMI's memory bank: a ring of feature rows (on the CPU), filled lazily; once full, new rows
    overwrite the oldest."""

    def __init__(self, size: int, dim: int):
        self.size, self.dim = size, dim
        self.data = torch.empty(0, dim)
        self.ptr = 0  # next row to write once the ring is full

    def __len__(self) -> int:
        return self.data.shape[0]

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()[-self.size :]
        room = self.size - len(self)
        if room > 0:
            take = min(room, rows.shape[0])
            self.data = torch.cat([self.data, rows[:take]])
            rows = rows[take:]
        for row in rows.split(self.size):
            idx = (self.ptr + torch.arange(row.shape[0])) % self.size
            self.data[idx] = row
            self.ptr = int((self.ptr + row.shape[0]) % self.size)

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``min(k, len)`` distinct rows, drawn at random."""
        if not len(self):
            return self.data
        return self.data[torch.randperm(len(self), generator=generator)[:k]]

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.clone(), "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if data.shape[1] != self.dim:
            raise ValueError(f"memory bank rows of width {data.shape[1]}; this teacher's features are {self.dim} wide")
        self.data, self.ptr = data.float().clone()[-self.size :], int(state["ptr"]) % self.size


@dataclass
class RoundResult:
    batch: BankBatch
    losses: list[float] = field(default_factory=list)  # total loss per step
    best_loss: float = float("inf")


class Synthesizer:
    """Runs synthesis rounds against a fixed teacher (eval mode; its weights never change).

    ``cfg.method`` picks the round's generator and terms (module docstring): ``dda`` and ``cmi``
    re-initialise it from the round's seed; ``fast`` clones a meta-generator initialised once from
    ``seed`` and meta-learned across rounds. ``cmi``'s projection head is initialised from ``seed``.
    The ``fast`` meta update is first-order MAML (the reference's default); its Reptile variant is
    not implemented. ``cfg``'s method-dependent weights must be resolved (a validated config's are).
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
        if cfg.adv is None or cfg.bn is None or cfg.oh is None or cfg.adv_term is None:
            cfg = copy.deepcopy(cfg)
            cfg.resolve()
        self.normalize, self.num_classes, self.cfg, self.seed = normalize, num_classes, cfg, seed
        self.device = torch.device(device)
        self.generator = Generator(cfg.nz, cfg.ngf, image_size).to(self.device)
        bns = [m for m in self.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ValueError("the teacher has no BatchNorm2d layers: the DeepInversion loss needs them")
        if cfg.method not in SYNTHESIS_METHODS:
            raise ValueError(f"unknown synthesis method {cfg.method!r}; expected one of {SYNTHESIS_METHODS}")
        self.method = cfg.method
        self.chained = cfg.method in CHAINED_METHODS
        # fast only: the persistent meta-generator, its optimiser, the BN momentum statistics
        # (one (mean, var) per teacher BatchNorm layer, module order)
        self.meta_generator: Generator | None = None
        self.meta_optimizer: torch.optim.Adam | None = None
        self.bn_momentum_stats: list[BNStats] | None = None
        # cmi only: the projection head, its optimiser and the memory bank of (local, global) features
        self.cmi_dim = sum(m.num_features for m in bns)  # width of one view's instance-mean feature
        self.cmi_head: MLPHead | None = None
        self.cmi_optimizer: torch.optim.Adam | None = None
        self.memory: MemoryBank | None = None
        self.rounds_done = 0
        self.reset_chain()

    def reset_chain(self) -> None:
        """Start the chain afresh (a new synthesizer's state): fast's meta-generator and optimiser,
        cmi's projection head, its optimiser and an empty memory bank, all seeded by ``seed``."""
        cfg, seed = self.cfg, self.seed
        self.rounds_done, self.bn_momentum_stats = 0, None
        if self.method == "fast":
            meta = copy.deepcopy(self.generator).cpu()  # initialised on the CPU: the seeded torch.Generator is a CPU one
            init_dcgan(meta, torch.Generator().manual_seed(derive_seed(seed, "meta_generator")))
            self.meta_generator = meta.to(self.device)
            self.meta_optimizer = torch.optim.Adam(self.meta_generator.parameters(), lr=self._meta_lr(cfg.g_steps), betas=(0.5, 0.999))
        if self.method == "cmi":
            with torch.random.fork_rng(devices=[]):  # PyTorch's default Linear init (as CMI's head), from the run's seed
                torch.manual_seed(derive_seed(seed, "cmi_head"))
                head = MLPHead(self.cmi_dim, cfg.cmi_head_dim)
            self.cmi_head = head.to(self.device).train()
            self.cmi_optimizer = torch.optim.Adam(self.cmi_head.parameters(), lr=cfg.lr_g)
            self.memory = MemoryBank(cfg.cmi_bank_size, 2 * self.cmi_dim)

    def _meta_lr(self, g_steps: int) -> float:
        """Fast's meta learning rate: ``lr_g * iterations`` of the round it steps after (or ``meta_lr``)."""
        return self.cfg.meta_lr if self.cfg.meta_lr is not None else self.cfg.lr_g * g_steps

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Differentiable random crop (4 px padding) + flip, then normalisation."""
        return self.normalize(random_flip(random_crop(x, 4, gen), gen))

    def _local_view(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """cmi's local view: random resized crop (25-100 % of the area) + flip, then normalisation."""
        return self.normalize(random_flip(random_resized_crop(x, (0.25, 1.0), generator=gen), gen))

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
        dda, cmi: the generator's weights too). A chained method also advances its chain. The
        adversarial term needs ``student`` (and ``rot_head`` for ``adv_term: rotation``)."""
        cfg = self.cfg
        fast = self.method == "fast"
        batch_size = batch_size or cfg.batch_size
        g_steps = g_steps or cfg.g_steps
        adv = cfg.adv if adv is None else adv
        use_adv = adv > 0 and student is not None and (cfg.adv_term != "rotation" or rot_head is not None)
        gen = torch.Generator().manual_seed(seed)
        if fast:
            self.generator.load_state_dict(self.meta_generator.state_dict())  # the round's fast generator
            for group in self.meta_optimizer.param_groups:
                group["lr"] = self._meta_lr(g_steps)
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
        frozen: list[tuple[nn.Parameter, bool]] = []
        modes: list[tuple[nn.Module, bool]] = []
        if use_adv:
            # eval mode (no BN statistics move) and no weight gradients: the round only reads the student
            for m in (student, rot_head):
                if m is not None:
                    modes.append((m, m.training))
                    m.eval()
                    frozen += [(p, p.requires_grad) for p in m.parameters()]
            for p, _ in frozen:
                p.requires_grad_(False)
        losses: list[float] = []
        bar = progress_bar(range(g_steps), desc=f"synthesis round {round_idx}", disable=not progress, leave=False, mininterval=2)
        # only while synthesising: distillation shares this teacher
        if fast:
            hooks = bn_hooks(self.teacher, cfg.bn_momentum, self.bn_momentum_stats)
        else:
            hooks = bn_hooks(self.teacher, instance_means=self.method == "cmi")
        try:
            best_loss, best_x, best_feat = self._optimise(
                bar, z, targets, opt, gen, hooks, losses, adv if use_adv else 0.0, student, rot_head, g_steps
            )
            if fast:
                self.meta_optimizer.step()
                self.meta_optimizer.zero_grad(set_to_none=True)
                if cfg.bn_momentum > 0:
                    self.bn_momentum_stats = [h.next_momentum_stats() for h in hooks]
            if self.method == "cmi":
                self.memory.add(best_feat)
            self.rounds_done += 1
        finally:
            for h in hooks:
                h.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.train(mode)
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

    def adversarial_loss(self, xa, t_logits, targets, student, rot_head) -> torch.Tensor:
        """The ``adv_term`` on the augmented batch ``xa`` (before its weight), to be *minimised*."""
        if self.cfg.adv_term == "rotation":
            return rotation_adv_loss(student, rot_head, xa, targets)
        return kl_adv_loss(student(xa), t_logits)

    def contrastive_loss(self, global_feat: torch.Tensor, local_feat: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """cmi's InfoNCE: each local feature (new batch, then the bank's negatives) against every
        global one (detached), its own as the positive; the mean split between batch and bank rows."""
        n = global_feat.shape[0]
        cached = self.memory.sample(self.cfg.cmi_negatives, gen).to(global_feat.device)
        cached_local, cached_global = cached.split(self.cmi_dim, dim=1)
        proj = self.cmi_head(torch.cat([local_feat, cached_local, global_feat, cached_global]))
        proj_local, proj_global = proj.chunk(2)
        logits = proj_local @ proj_global.detach().T / self.cfg.cr_t
        ce = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
        return ce[:n].mean() + ce[n:].mean() if cached.shape[0] else ce.mean()

    def _optimise(self, steps, z, targets, opt, gen, hooks, losses, adv, student, rot_head, g_steps):
        cfg = self.cfg
        fast, cmi = self.method == "fast", self.method == "cmi"
        best_loss, best_x, best_feat = float("inf"), None, None
        for step in steps:
            x = self.generator(z)
            xa = self._augment(x, gen)
            logits = self.teacher(xa)
            loss = cfg.oh * F.cross_entropy(logits, targets) + cfg.bn * sum(h.loss for h in hooks)
            if adv > 0:
                loss = loss + adv * self.adversarial_loss(xa, logits, targets, student, rot_head)
            feat = None
            if cmi:
                global_feat = torch.cat([h.instance_mean for h in hooks], dim=1)
                self.teacher(self._local_view(x, gen))  # the hooks now hold the local view's instance means
                local_feat = torch.cat([h.instance_mean for h in hooks], dim=1)
                loss = loss + cfg.cr * self.contrastive_loss(global_feat, local_feat, gen)
                feat = torch.cat([local_feat, global_feat], dim=1)
            value = loss.item()
            losses.append(value)
            if value < best_loss:
                best_loss, best_x = value, x.detach().clone()
                best_feat = feat.detach().clone() if feat is not None else None
            opt.zero_grad(set_to_none=True)
            if cmi:
                self.cmi_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fast:
                self._accumulate_meta_grad(step)
            opt.step()
            if cmi:
                self.cmi_optimizer.step()
        return best_loss, best_x, best_feat

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
        (``torch.save`` it; ``torch.load(..., weights_only=True)`` reads it back). ``dda`` rounds
        carry no state between them: its dict names the method only."""
        if not self.chained:
            return {"method": self.method}

        def cpu(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.detach().cpu().clone()
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(cpu(v) for v in obj)
            return obj

        if self.method == "cmi":
            return cpu(
                {
                    "method": "cmi",
                    "rounds_done": self.rounds_done,
                    "head": self.cmi_head.state_dict(),
                    "head_optimizer": self.cmi_optimizer.state_dict(),
                    "memory": self.memory.state_dict(),
                }
            )
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
        teacher shapes). Fast's meta-optimiser moments and step count come from ``state``, its
        learning rate from this config at the next round."""
        method = state.get("method") if isinstance(state, dict) else None
        if method == "cmi" and self.method == "dda" and set(state) == {"method"}:
            return  # written before the DDA synthesizer was renamed from 'cmi' to 'dda': it carried no state either
        if method != self.method:
            raise ValueError(f"synthesis state of method {method!r} cannot be loaded into a {self.method!r} synthesizer")
        if not self.chained:
            return
        if self.method == "cmi":
            self.cmi_head.load_state_dict(state["head"])
            self.cmi_optimizer.load_state_dict(state["head_optimizer"])
            self.memory.load_state_dict(state["memory"])
            self.rounds_done = int(state["rounds_done"])
            return
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in self.teacher.modules())
        stats = state["bn_momentum_stats"]
        if stats is not None and len(stats) != n_bn:
            raise ValueError(f"synthesis state has BN momentum statistics for {len(stats)} layers; the teacher has {n_bn}")
        self.meta_generator.load_state_dict(state["meta_generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn_momentum_stats = None if stats is None else [(s["mean"].to(self.device), s["var"].to(self.device)) for s in stats]
        self.rounds_done = int(state["rounds_done"])

    def teacher_outputs(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Teacher logits and pooled embeddings of uint8 NHWC images (as stored in the bank)."""
        return teacher_outputs(self.teacher, self.normalize, images, batch_size, self.device)


@torch.no_grad()
def teacher_outputs(teacher, normalize, images, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``teacher``'s logits and pooled embeddings (float32 numpy) of uint8 NHWC ``images`` (numpy or tensor)."""
    from ..data.transforms import to_float

    logits, embs = [], []
    for i in range(0, len(images), batch_size):
        out = teacher(normalize(to_float(images[i : i + batch_size]).to(device)), return_features=True)
        logits.append(out.logits.float().cpu().numpy())
        embs.append(out.embedding.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(embs)



def build_synthesizer(cfg: Config, teacher: Classifier, normalize: Normalize, device: torch.device | str = "cpu") -> Synthesizer:
    """The run's synthesizer: ``cfg.synthesis`` against ``teacher``, seeded by ``cfg.run.seed``."""
    return Synthesizer(teacher, normalize, cfg.data.num_classes, cfg.synthesis, cfg.data.image_size, device, seed=cfg.run.seed)
