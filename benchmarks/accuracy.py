"""Does DDA help? Arms at one identical budget, sharing one synthetic bank per seed.

    python benchmarks/accuracy.py --config configs/cifar10_cpu_demo.yaml [--seeds 0 1] [section.field=value ...]
    python benchmarks/accuracy.py --config configs/cifar10_cpu_smoke.yaml \
        --sweep filter.threshold=0.5,0.7,0.9,-1 --sweep augment.strength=0.1,0.3,0.5

Default arms (same teacher, student, KD steps, batch and evaluation):
  real_kd          the real training split (upper bound)
  inversion        synthetic bank only
  dda              bank + diffusion variations kept by the cosine filter
  dda_nofilter     bank + every variation (filter.threshold = -1)

``--sweep key=v1,v2,...`` replaces the default arms by one ``dda`` arm per value (an ablation);
several ``--sweep`` flags run one after the other. The initial bank is synthesised once per seed
(``synthesis.bank_dir``) before any arm and timed on its own (over ``resources.synthesis_tasks`` Ray
tasks when the preset asks for them); the synthetic arms then share it, and
the dda arms share the variation cache (keyed by strength, guidance, model, seed), so an arm that
differs only in its threshold reuses the diffusion work of the one before it — that arm's
augmentation time is therefore not comparable. Prints one JSON line per arm and seed, then a Markdown
table for docs/BENCHMARKS.md; ``results.json`` in the output directory holds every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from dda_ray.api import distill
from dda_ray.config import load_config
from dda_ray.runtime import prepare_run_dir, read_jsonl

ARMS = {
    "real_kd": ["run.mode=real_kd"],
    "inversion": ["run.mode=inversion"],
    "dda": ["run.mode=dda"],
    "dda_nofilter": ["run.mode=dda", "filter.threshold=-1"],
}


def sweep_arms(sweeps: list[str]) -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for spec in sweeps:
        key, _, values = spec.partition("=")
        if not key or not values:
            raise SystemExit(f"error: --sweep {spec!r} is not key=v1,v2,...")
        for v in values.split(","):
            arms[f"dda {key}={v}"] = ["run.mode=dda", f"{key}={v}"]
    return arms


def build_bank(cfg) -> float:
    """Synthesise the shared initial bank (skipped when already complete); returns seconds."""
    from dda_ray.checkpoint import load_teacher
    from dda_ray.runtime import resolve_device, seed_everything, set_threads
    from dda_ray.sources import build_initial_bank
    from dda_ray.synthesis import Synthesizer

    cfg = cfg.with_absolute_paths()
    if cfg.run.engine == "ray" and cfg.resources.synthesis_tasks > 0:
        from dda_ray.pipeline import init_ray

        init_ray(cfg)  # rounds as concurrent Ray tasks, as jobs/distill.py does (same bank); the arms reuse this Ray
    set_threads(cfg.resources.torch_threads)
    seed_everything(cfg.run.seed)
    teacher, normalize, _ = load_teacher(cfg)
    t0 = time.perf_counter()
    build_initial_bank(cfg, Synthesizer(teacher, normalize, cfg.data.num_classes, cfg.synthesis, cfg.data.image_size, resolve_device("cpu")))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--sweep", action="append", default=[], help="key=v1,v2,...: one dda arm per value (replaces --arms)")
    parser.add_argument("--output-dir", default="outputs/bench_accuracy")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    arms = sweep_arms(args.sweep) if args.sweep else {a: ARMS[a] for a in args.arms}
    out_dir = Path(args.output_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    teacher_acc = None
    for seed in args.seeds:
        bank = out_dir / f"bank-seed{seed}"
        common = [*args.overrides, f"run.seed={seed}", f"run.output_dir={out_dir}", f"synthesis.bank_dir={bank}"]
        bank_cfg = load_config(args.config, [*common, "run.mode=inversion"])
        bank_s = build_bank(bank_cfg) if any("run.mode=real_kd" not in o for o in arms.values()) else 0.0
        print(json.dumps({"seed": seed, "bank_s": bank_s, "bank": str(bank)}), flush=True)
        for i, (arm, extra) in enumerate(arms.items()):
            cfg = load_config(args.config, [*common, *extra, f"run.name={stamp}-a{i}-s{seed}"])
            prepare_run_dir(cfg)
            t0 = time.perf_counter()
            final = distill(cfg)
            wall = time.perf_counter() - t0
            epochs = read_jsonl(cfg.run_dir / "metrics.jsonl")
            if teacher_acc is None:
                meta_path = Path(cfg.with_absolute_paths().teacher.checkpoint) / "meta.json"
                teacher_acc = json.loads(meta_path.read_text()).get("accuracy") if meta_path.exists() else None
            row = {
                "arm": arm,
                "seed": seed,
                "test_acc": final["test_acc"],
                "kept_fraction": final.get("kept_fraction"),
                "bank_s": bank_s,
                "synthesis_s": sum(e.get("synthesis_s", e.get("prepare_s", 0.0)) for e in epochs),
                "train_s": sum(e.get("train_s", 0.0) for e in epochs),
                "wall_s": wall,
                "run_dir": str(cfg.run_dir),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out_dir / "results.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides, "rows": rows}, indent=2))
    print(f"\n{started}; {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; config {args.config}, overrides {args.overrides}")
    print(f"teacher top-1: {teacher_acc}\n")
    print("| arm | seed | top-1 % | kept fraction | shared bank s | synthesis s (rounds with student) | train s (incl. streaming) | arm wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = "" if r["kept_fraction"] is None else f"{r['kept_fraction']:.2f}"
        print(f"| {r['arm']} | {r['seed']} | {r['test_acc']:.2f} | {kept} | {r['bank_s']:.0f} | {r['synthesis_s']:.0f} | {r['train_s']:.0f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
