"""Supervised teacher training on real data (the only stage that may see real images)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError
from ..data import NORMALIZATION, Normalize, TrainTransform, channel_stats, load_data, to_float
from ..progress import bar as progress_bar
from ..runtime import append_jsonl, atomic_write, read_jsonl, seed_everything, set_threads
from . import build_model
from .checkpoint import load_classifier, save_classifier
from .evaluation import evaluate


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_teacher(cfg: Config, progress: bool = True, tracker=None) -> dict:
    """Train ``cfg.teacher.arch`` on ``cfg.data``; checkpoint every epoch; resume if asked.

    Writes ``<run_dir>/teacher`` (project checkpoint of the last epoch), ``state.pt``
    (optimizer + epoch for resuming) and ``metrics.jsonl``. Returns the last epoch's metrics.
    """
    if cfg.teacher.arch is None:
        raise ConfigError(
            "teacher.arch is not set; training a teacher needs its architecture "
            "(a registry name such as wrn16_2, or 'package.module:factory')"
        )
    tc = cfg.teacher_training
    run_dir = cfg.run_dir
    set_threads(cfg.resources.torch_threads)
    gen = seed_everything(cfg.run.seed)
    data = load_data(cfg.data, progress)
    train = data.train.subset(cfg.data.train_subset, cfg.run.seed)
    test = data.test.subset(cfg.data.eval_subset, cfg.run.seed)
    mean, std = NORMALIZATION.get(cfg.data.dataset) or channel_stats(train.images)
    if cfg.data.dataset == "imagefolder":
        mean, std = channel_stats(train.images)

    model = build_model(cfg.teacher.arch, cfg.data.num_classes).to(memory_format=torch.channels_last)  # ~1.4x faster on CPU
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(train) / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, int(tc.warmup_epochs * steps_per_epoch)))
    start_epoch = 0
    ckpt_dir, state_file, metrics_file = run_dir / "teacher", run_dir / "state.pt", run_dir / "metrics.jsonl"
    if cfg.run.resume and state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        loaded, _ = load_classifier(ckpt_dir, cfg.teacher.arch, cfg.data.num_classes)
        model.load_state_dict(loaded.state_dict())  # keeps channels_last
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
        start_epoch = int(state["epoch"])
        print(f"resuming teacher training at epoch {start_epoch + 1}/{tc.epochs}")

    normalize = Normalize(mean, std)
    transform = TrainTransform(mean, std)
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    metrics: dict = (read_jsonl(metrics_file) or [{}])[-1]
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train), generator=gen).numpy()
        bar = progress_bar(range(steps_per_epoch), desc=f"teacher epoch {epoch + 1}/{tc.epochs}", disable=not progress, mininterval=5)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in bar:
            idx = np.sort(perm[b * tc.batch_size : (b + 1) * tc.batch_size])
            x = transform(to_float(train.images[idx]), gen).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[idx])
            logits = model(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        ev = evaluate(model, test, normalize)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen, "test_acc": ev["acc"], "test_loss": ev["loss"], "epoch_s": time.perf_counter() - t0}
        print(f"teacher epoch {epoch + 1}/{tc.epochs}: train_acc {metrics['train_acc']:.2f} test_acc {ev['acc']:.2f} ({metrics['epoch_s']:.0f}s)", flush=True)
        save_classifier(model, ckpt_dir, arch=cfg.teacher.arch, num_classes=cfg.data.num_classes, mean=mean, std=std, accuracy=ev["acc"], dataset=cfg.data.dataset, epochs=epoch + 1, classes=data.classes)
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": gen.get_state(), "epoch": epoch + 1}
        atomic_write(state_file, lambda tmp, state=state: torch.save(state, tmp))
        append_jsonl(metrics_file, metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch + 1)
    return metrics
