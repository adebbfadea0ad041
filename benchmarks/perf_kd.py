"""The KD step against its roofline (``python benchmarks/perf.py kd``; see perf.py for the common options).

Arms, alternating inside every repeat, each timed over ``--steps`` KD steps after two warm-up steps,
on the same uint8 batches (real CIFAR-10 training images, batch ``distill.batch_size``), one process,
``resources.torch_threads`` threads:

  roofline      the arithmetic one KD step must do, in a bare loop: a normalised float batch made
                before the clock starts, teacher forward (``torch.inference_mode``), student forward
                and backward, the feature-alignment head, the three loss terms, one SGD step; plus,
                every ``rotation_every``-th step when the run trains the rotation head, the least the
                head's step needs: one rotated view per image through the student (eval, no grad)
                and the head's own forward/backward/SGD step. Measured in both memory formats (NCHW
                and channels_last).
  project       ``Distiller.train_step`` as the config builds it (crop/flip/normalise on the fly,
                ``synthesis.rotation_views``, the rotation cadence of the run's mode), the losses read
                once per ``SYNC_EVERY`` steps as the epoch loop does; also with ``distill.channels_last``
                flipped.

Reports ``roofline / project`` with the roofline in the step's own memory format (1 = the step costs no
more than its arithmetic) and appends it to ``benchmarks/results/perf.jsonl`` as ``kd_step_over_roofline``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def _batches(cfg, n: int):
    import numpy as np
    import torch

    from dda_ray.data import load_data

    train = load_data(cfg.data, progress=False).train
    bs = cfg.distill.batch_size
    idx = np.random.default_rng(cfg.run.seed).permutation(len(train.labels))[: n * bs]
    return [(torch.from_numpy(train.images[idx[i * bs : (i + 1) * bs]].copy()), torch.from_numpy(train.labels[idx[i * bs : (i + 1) * bs]].astype("int64"))) for i in range(n)]


def _distiller(cfg):
    from dda_ray.distill.kd import Distiller, rotation_every
    from dda_ray.models import build_model
    from dda_ray.models.checkpoint import load_teacher

    teacher, normalize, _ = load_teacher(cfg)
    student = build_model(cfg.student.arch, cfg.data.num_classes)
    return Distiller(student, teacher, normalize, cfg.data.num_classes, cfg.distill, cfg.synthesis.rotation_lr, "cpu",
                     rotation_every=rotation_every(cfg), rotation_views=cfg.synthesis.rotation_views)  # fmt: skip


def project_arm(cfg, batches) -> Callable[[], None]:
    """The project's step over the batches, losses read as ``train_loop`` reads them."""
    import torch

    from dda_ray.distill.kd import SYNC_EVERY

    d = _distiller(cfg)
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        pending = []
        for images, labels in batches:
            pending.append(d.train_step(images, labels, gen))
            if len(pending) >= SYNC_EVERY:
                torch.stack([p["loss"] for p in pending]).tolist()
                pending.clear()
        if pending:
            torch.stack([p["loss"] for p in pending]).tolist()

    return run


def roofline_arm(cfg, batches, channels_last: bool) -> Callable[[], None]:
    """The bare arithmetic of the same steps (see the module docstring)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from dda_ray.data.transforms import to_float
    from dda_ray.distill.kd import kd_loss

    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, channels_last=channels_last))
    d = _distiller(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(d.normalize(to_float(images)).contiguous(memory_format=fmt), labels) for images, labels in batches]
    k, dc = d.rotation_every, cfg.distill

    def run() -> None:
        for i, (x, y) in enumerate(xs, start=1):
            with torch.inference_mode():
                t = d.teacher(x, return_features=True)
            t_logits, t_map = t.logits.clone(), t.feature_map.clone()
            s = d.student(x, return_features=True)
            loss = kd_loss(s.logits, t_logits, dc.temperature) + dc.ce * F.cross_entropy(s.logits, y)
            if dc.fea > 0:
                loss = loss + dc.fea * F.mse_loss(d.align(s.feature_map, t_map.shape[-2:]), t_map)
            d.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            d.optimizer.step()
            if k and i % k == 0:  # one rotated view per image: rot90 of the whole batch by one angle
                d.student_module.eval()
                with torch.inference_mode():
                    emb = d.student_module(torch.rot90(x, 1, dims=(2, 3)).contiguous(memory_format=fmt), return_features=True).embedding
                d.student_module.train()
                rl = F.cross_entropy(d.rot_head(emb.clone()), y * 4 + 1)
                d.rot_optimizer.zero_grad(set_to_none=True)
                rl.backward()
                d.rot_optimizer.step()
        torch.stack([loss.detach()]).tolist()

    return run


def bench_kd(args, report_cls, record, load_cfg, median, fmt, fmt_list) -> str:
    import dataclasses

    import torch

    from dda_ray.models.checkpoint import resolved_teacher_arch
    from dda_ray.runtime import set_threads

    cfg = load_cfg(args)
    set_threads(cfg.resources.torch_threads)
    n = args.steps or (4 if args.quick else 24)
    batches = _batches(cfg, n)
    flipped = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, channels_last=not cfg.distill.channels_last))
    arms = {
        "roofline_nchw": roofline_arm(cfg, batches, channels_last=False),
        "roofline_nhwc": roofline_arm(cfg, batches, channels_last=True),
        "project": project_arm(cfg, batches),
        "flipped": project_arm(flipped, batches),
    }
    warm = batches[:2]
    for name in arms:  # warm-up: two steps each (first-call allocations, oneDNN kernel choice)
        fn = roofline_arm(cfg, warm, name == "roofline_nhwc") if name.startswith("roofline") else project_arm(flipped if name == "flipped" else cfg, warm)
        fn()
    got: dict[str, list[float]] = {a: [] for a in arms}
    names = list(arms)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            arms[name]()
            got[name].append((time.perf_counter() - t0) / n)
            print(json.dumps({"bench": "kd", "arm": name, "repeat": r, "ms_per_step": got[name][-1] * 1000}), flush=True)
    roof_arm = "roofline_nhwc" if cfg.distill.channels_last else "roofline_nchw"
    roof = median(got[roof_arm])
    ratio = [ro / p for ro, p in zip(got[roof_arm], got["project"], strict=True)]
    rep = report_cls(args, "KD step vs its roofline (the bare arithmetic of the step)")
    rot = _distiller(cfg).rotation_every
    rep.add(
        f"{cfg.student.arch} student, {resolved_teacher_arch(cfg)} teacher, batch {cfg.distill.batch_size}, fea {cfg.distill.fea}, mode {cfg.run.mode} "
        f"(rotation head every {rot or 'no'} step(s), {cfg.synthesis.rotation_views} view(s) per image), {cfg.resources.torch_threads} torch thread(s), "
        f"{n} steps per arm and repeat on the same real images, {args.repeats} repeats, arm order rotates; torch {torch.__version__}.",
        "",
    )
    other = "false" if cfg.distill.channels_last else "true"
    label = {"roofline_nchw": "roofline, NCHW", "roofline_nhwc": "roofline, channels_last", "project": "project step (as configured)", "flipped": f"project step, channels_last={other}"}
    rep.table(["arm", "ms/step (median)", "per repeat", "roofline / arm"],
              [[label[a], fmt(median(got[a]) * 1000, 0), fmt_list([x * 1000 for x in got[a]], 0), fmt(roof / median(got[a]))] for a in arms])  # fmt: skip
    rep.add(f"**roofline / project step: {fmt(median(ratio))}** (per repeat {fmt_list(ratio, 2)}; goal >= 0.70; roofline = {label[roof_arm]}).", "")
    if not args.quick:
        record("kd_step_over_roofline", median(ratio), "ratio", {
            "per_repeat": ratio, "roofline_ms": roof * 1000, "roofline_arm": roof_arm, "project_ms": median(got["project"]) * 1000,
            "channels_last": cfg.distill.channels_last, "flipped_ms": median(got["flipped"]) * 1000,
            "roofline_other_format_ms": median(got["roofline_nhwc" if roof_arm == "roofline_nchw" else "roofline_nchw"]) * 1000, "steps": n, "repeats": args.repeats, "batch": cfg.distill.batch_size,
            "mode": cfg.run.mode, "rotation_every": rot, "rotation_views": cfg.synthesis.rotation_views, "threads": cfg.resources.torch_threads,
            "student": cfg.student.arch, "teacher": resolved_teacher_arch(cfg), "config": args.config,
        })  # fmt: skip
    return rep.emit()
