"""What a diffusion prior does to synthetic images, without training a student: per (prior, strength)
the teacher-cosine scores of the variations, the fraction each threshold keeps, how often the teacher
still predicts the parent's class, and a grid of accepted / rejected variations.

    python benchmarks/variations.py --bank outputs/bench_a/bank-seed100-cmi \
        --prior checkpoints/photo_prior --prior outputs/photo_prior_uncond \
        --strength 0.3 0.5 0.7 1.0 --threshold 0.5 0.7 0.8 0.9 [--images 128] [--grids docs/img]

Reads the bank's first ``--images`` rows (their stored teacher embeddings are the filter's
reference), makes ``--variations`` variations of each with the ``local_prior`` backend at
``--guidance`` and ``--steps`` (the bench preset's values by default), and appends one JSON line per
(prior, strength) to ``--results`` (default benchmarks/results/variations.jsonl). The teacher is the
one in ``--config`` (the bench preset). No test or training split is read.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import append_result, git_commit  # noqa: E402

from dda_ray.augment.augmenter import Augmenter  # noqa: E402
from dda_ray.augment.filter import CosineFilter  # noqa: E402
from dda_ray.augment.grids import make_grid  # noqa: E402
from dda_ray.config import load_config  # noqa: E402
from dda_ray.data.bank import read_bank  # noqa: E402
from dda_ray.models.checkpoint import load_teacher  # noqa: E402
from dda_ray.runtime import set_threads  # noqa: E402
from dda_ray.synthesis.synthesizer import teacher_outputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_cpu_bench.yaml")
    p.add_argument("--bank", required=True)
    p.add_argument("--prior", action="append", required=True)
    p.add_argument("--strength", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--threshold", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--variations", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--grids", default=None, help="directory for one PNG grid per (prior, strength) (16 parents)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "variations.jsonl"))
    args = p.parse_args()

    cfg = load_config(args.config, [])
    set_threads(cfg.resources.torch_threads)
    teacher, normalize, meta = load_teacher(cfg)
    bank = read_bank(args.bank)
    n = min(args.images, len(bank))
    images, labels, ids, ref = bank.images[:n], bank.labels[:n], bank.ids[:n], bank.teacher_embedding[:n]
    k = args.variations or cfg.augment.num_variations
    guidance = cfg.augment.guidance if args.guidance is None else args.guidance
    steps = args.steps or cfg.augment.steps
    commit = git_commit()
    print("| prior | strength | mean cosine | teacher keeps the class | " + " | ".join(f"kept @ {t}" for t in args.threshold) + " | s |")
    print("|---|---|---|---|" + "---|" * len(args.threshold) + "---|")
    for prior in args.prior:
        for strength in args.strength:
            aug_cfg = load_config(args.config, [f"augment.model={prior}", f"augment.strength={strength}", f"augment.guidance={guidance}", f"augment.steps={steps}", f"augment.num_variations={k}", "augment.device=cpu"]).augment
            t0 = time.perf_counter()
            out = Augmenter(aug_cfg, meta.get("classes"))(images, labels, ids)
            seconds = time.perf_counter() - t0
            var = out["image"].reshape(n, k, *images.shape[1:])
            logits, emb = teacher_outputs(teacher, normalize, out["image"])  # one teacher pass: scores and classes
            scores = CosineFilter.cosine(emb, np.repeat(ref, k, axis=0)).reshape(n, k)
            agree = (logits.argmax(1).reshape(n, k) == labels[:, None]).mean()
            kept = {str(t): float((scores >= t).mean()) for t in args.threshold}
            row = {
                "prior": prior,
                "strength": strength,
                "guidance": guidance,
                "steps": steps,
                "bank": args.bank,
                "images": n,
                "variations": k,
                "mean_cosine": float(scores.mean()),
                "class_kept": float(agree),
                "kept_fraction": kept,
                "seconds": seconds,
                "commit": commit,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "load": list(os.getloadavg()),
            }
            append_result(Path(args.results), row)
            print(f"| {prior} | {strength} | {row['mean_cosine']:.3f} | {agree:.2f} | " + " | ".join(f"{v:.2f}" for v in kept.values()) + f" | {seconds:.0f} |", flush=True)
            if args.grids:
                thr = cfg.filter.threshold
                g = make_grid(images[:16], var[:16], scores[:16], scores[:16] >= thr, captions=[str(int(c)) for c in labels[:16]])
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                g.save(Path(args.grids) / f"variations_{Path(prior).name}_s{strength}.png")


if __name__ == "__main__":
    main()
