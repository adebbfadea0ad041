"""Does DDA help? The arms at one identical budget, sharing one synthetic bank.

    python benchmarks/accuracy.py --config configs/cifar10_cpu_demo.yaml [--seeds 0 1] [section.field=value ...]

Arms (same teacher, student, KD steps, batch and evaluation):
  real_kd          the real training split (upper bound)
  inversion        synthetic bank only
  dda              bank + diffusion variations kept by the cosine filter
  dda_nofilter     bank + every variation (filter.threshold = -1)

The initial bank is synthesised once per seed (``synthesis.bank_dir``) and shared by the synthetic
arms. Prints one JSON line per arm and seed, then a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from dda_ray.api import distill
from dda_ray.config import load_config
from dda_ray.runtime import prepare_run_dir

ARMS = {
    "real_kd": ["run.mode=real_kd"],
    "inversion": ["run.mode=inversion"],
    "dda": ["run.mode=dda"],
    "dda_nofilter": ["run.mode=dda", "filter.threshold=-1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--output-dir", default="outputs/bench_accuracy")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        bank = Path(args.output_dir) / f"bank-seed{seed}"
        for arm in args.arms:
            cfg = load_config(
                args.config,
                [*args.overrides, *ARMS[arm], f"run.seed={seed}", f"run.name={stamp}-{arm}-s{seed}", f"run.output_dir={args.output_dir}", f"synthesis.bank_dir={bank}"],
            )
            prepare_run_dir(cfg)
            t0 = time.perf_counter()
            final = distill(cfg)
            row = {"arm": arm, "seed": seed, "test_acc": final["test_acc"], "kept_fraction": final.get("kept_fraction"), "wall_s": time.perf_counter() - t0, **{k: final[k] for k in ("bank_s", "distill_s") if k in final}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, config {args.config}, overrides {args.overrides}\n")
    print("| arm | seed | top-1 % | kept fraction | wall s |\n|---|---|---|---|---|")
    for r in rows:
        kept = "" if r["kept_fraction"] is None else f"{r['kept_fraction']:.2f}"
        print(f"| {r['arm']} | {r['seed']} | {r['test_acc']:.2f} | {kept} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
