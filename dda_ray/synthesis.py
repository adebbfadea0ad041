"""Model inversion: synthesise class-conditional images from the teacher alone.

One round: a freshly initialised generator and a latent batch ``z`` are optimised jointly
(Adam) for ``g_steps`` iterations so that, on a randomly cropped/flipped copy of the images,

* the teacher predicts the target labels (one-hot CE, weight ``oh``),
* every teacher BatchNorm layer sees the batch statistics it stored in training
  (DeepInversion loss: ``||mean - running_mean||_2 + ||var - running_var||_2``, weight ``bn``),
* and, once a student exists, a rotation head on the student's embedding is *fooled*
  (negative CE on the joint (class, rotation) label, weight ``adv``): the images move to
  where the student is still uncertain.

The lowest-loss batch of the round is kept and returned as a :class:`BankBatch` carrying the
teacher's logits and embedding for each image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import SynthesisConfig
from .data.bank import BankBatch, make_ids
from .data.transforms import Normalize, random_crop, random_flip, to_uint8
from .models import Classifier, Generator, RotationHead, rotate_batch


class BNStatsHook:
    """Forward hook recording the DeepInversion loss of one BatchNorm layer."""

    def __init__(self, module: nn.BatchNorm2d):
        self.loss: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs, _output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
        self.loss = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def remove(self) -> None:
        self.handle.remove()


def bn_hooks(model: nn.Module) -> list[BNStatsHook]:
    return [BNStatsHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


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
    """Runs synthesis rounds against a fixed teacher (eval mode; its weights never change)."""

    def __init__(self, teacher: Classifier, normalize: Normalize, num_classes: int, cfg: SynthesisConfig, image_size: int = 32, device: torch.device | str = "cpu"):
        self.teacher = teacher.eval().to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.normalize, self.num_classes, self.cfg = normalize, num_classes, cfg
        self.device = torch.device(device)
        self.generator = Generator(cfg.nz, cfg.ngf, image_size).to(self.device)
        if not any(isinstance(m, nn.BatchNorm2d) for m in self.teacher.modules()):
            raise ValueError("the teacher has no BatchNorm2d layers: the DeepInversion loss needs them")

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
        cfg = self.cfg
        batch_size = batch_size or cfg.batch_size
        g_steps = g_steps or cfg.g_steps
        adv = cfg.adv if adv is None else adv
        use_adv = adv > 0 and student is not None and rot_head is not None
        gen = torch.Generator().manual_seed(seed)
        self.generator.reset_parameters(gen)
        self.generator.train()
        z = torch.randn(batch_size, cfg.nz, generator=gen).to(self.device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (batch_size,), generator=gen).to(self.device)
        opt = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], lr=cfg.lr_g, betas=(0.5, 0.999))
        if use_adv:
            student_mode, head_mode = student.training, rot_head.training
            student.eval()
            rot_head.eval()
        losses: list[float] = []
        bar = tqdm(range(g_steps), desc=f"synthesis round {round_idx}", disable=not progress, leave=False, mininterval=2)
        hooks = bn_hooks(self.teacher)  # only while synthesising: distillation shares this teacher
        try:
            best_loss, best_x = self._optimise(bar, z, targets, opt, gen, hooks, losses, adv if use_adv else 0.0, student, rot_head)
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

    def _optimise(self, steps, z, targets, opt, gen, hooks, losses, adv, student, rot_head):
        cfg = self.cfg
        best_loss, best_x = float("inf"), None
        for _ in steps:
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
            opt.step()
        return best_loss, best_x

    @torch.no_grad()
    def teacher_outputs(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Teacher logits and pooled embeddings of uint8 NHWC images (as stored in the bank)."""
        from .data.transforms import to_float

        logits, embs = [], []
        for i in range(0, len(images), batch_size):
            out = self.teacher(self.normalize(to_float(images[i : i + batch_size]).to(self.device)), return_features=True)
            logits.append(out.logits.float().cpu().numpy())
            embs.append(out.embedding.float().cpu().numpy())
        return np.concatenate(logits), np.concatenate(embs)

