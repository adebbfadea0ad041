"""How precise are the KD step's gradients in each memory format? One step, against float64.

    python benchmarks/grad_precision.py [--config configs/cifar10_cpu_bench.yaml] [--batch 64]

The student's parameter gradients of one ``Distiller.train_step`` (its optimiser step skipped) on the
same real images, computed in float32 NCHW, float32 channels_last and float64 NCHW (the reference);
prints the median and max over parameters of ``|g - g64| / |g64|`` per format. On the 2-core CPU VM
(torch 2.13, oneDNN) channels_last came out ~4x less precise (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dda_ray.config import load_config
from dda_ray.data import load_data
from dda_ray.distill.kd import Distiller
from dda_ray.models import build_model
from dda_ray.models.checkpoint import load_teacher


def grads(cfg, images, labels, channels_last: bool, double: bool) -> dict[str, torch.Tensor]:
    import dataclasses

    torch.manual_seed(0)
    teacher, normalize, _ = load_teacher(cfg)
    dc = dataclasses.replace(cfg.distill, channels_last=channels_last)
    d = Distiller(build_model(cfg.student.arch, cfg.data.num_classes), teacher, normalize, cfg.data.num_classes, dc, rotation_every=0)
    if double:
        for m in (d.student_module, d.teacher, d.align_module):
            m.double()
        transform = d.transform
        d.transform = lambda x, g: transform(x, g).double()
    d.optimizer.step = lambda: None  # the gradients of the first step only
    d.train_step(images, labels, torch.Generator().manual_seed(1))
    return {n: p.grad.detach().double().clone() for n, p in d.student_module.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_cpu_bench.yaml")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, ["tracking.enabled=false"])
    train = load_data(cfg.data, progress=False).train
    images, labels = torch.from_numpy(train.images[: args.batch].copy()), torch.from_numpy(train.labels[: args.batch].astype("int64"))
    ref = grads(cfg, images, labels, channels_last=False, double=True)
    print(f"torch {torch.__version__}, {cfg.student.arch} <- {cfg.teacher.arch}, batch {args.batch}: relative gradient error against float64")
    for name, cl in (("float32 NCHW", False), ("float32 channels_last", True)):
        g = grads(cfg, images, labels, channels_last=cl, double=False)
        errs = [float((g[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0]
        print(f"  {name:22s} median {statistics.median(errs):.4%}  max {max(errs):.4%}")


if __name__ == "__main__":
    main()
