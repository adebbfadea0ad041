"""What does a warm Tune trial cost against a cold one? The same trial config, twice, through Tune.

    python benchmarks/tune_warm_cold.py [--config configs/cifar10_cpu_tune.yaml] [section.field=value ...]

Two one-trial searches (``jobs/tune.py``'s code path: ``tune_search`` -> function trainable ->
TorchTrainer) with one fixed point of the space (the config's own strength, guidance and threshold):

  cold   empty augmentation cache: every bank image is diffused
  warm   the same values again: the bank's variations come from the cache

Both share one initial bank (``synthesis.bank_dir``), made before the cold search and timed
separately, as a search makes it once for all its trials. Prints one JSON line per run, then a
Markdown table for docs/BENCHMARKS.md ("Tune: warm vs cold trial").

The per-epoch synthesis rounds with the student are off by default (``synthesis.rounds_per_epoch=0``):
their images depend on each trial's student, so they cannot be shared, and their ids repeat
between trials (see docs/BENCHMARKS.md for why that matters for the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

from dda_ray.config import Domain, load_config
from dda_ray.stages import read_stream_stats
from dda_ray.tune import tune_search

# A few minutes on 2 shared cores: a smaller bank and budget than the preset, the same components.
SMALL = [
    "synthesis.init_rounds=4",
    "synthesis.rounds_per_epoch=0",
    "distill.epochs=2",
    "distill.steps_per_epoch=20",
    "data.eval_subset=500",
    "resources.torch_threads=1",
]


def augment_busy_s(run_dir: Path) -> float:
    """Seconds the augment actor spent in its batches (diffusion or cache reads)."""
    total = 0.0
    for path in (run_dir / "stream").glob("augment-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            total += rec["t1"] - rec["t0"]
    return total


def one_search(args, label: str, stamp: str, out: Path) -> dict:
    cfg = load_config(
        args.config,
        [
            *SMALL,
            *args.overrides,
            f"run.name={stamp}-{label}",
            f"run.output_dir={out}",
            f"synthesis.bank_dir={out / 'bank'}",
            f"augment.cache_dir={out / 'cache'}",
            "tracking.enabled=false",
        ],
    )
    point = {"augment.strength": cfg.augment.strength, "augment.guidance": cfg.augment.guidance, "filter.threshold": cfg.filter.threshold}
    space = {k: Domain("choice", [v]) for k, v in point.items()}
    cfg.tune = dataclasses.replace(cfg.tune, num_samples=1, searcher="random", scheduler="fifo", space=space)
    t0 = time.perf_counter()
    summary = tune_search(cfg)
    wall = time.perf_counter() - t0
    trial_dir = out / summary["run_name"]
    stream = read_stream_stats(trial_dir)
    row = {
        "run": label,
        **point,
        "trial_s": summary["time_total_s"],
        "search_wall_s": wall,
        "initial_bank_s": summary["initial_bank_s"],
        "augment_busy_s": augment_busy_s(trial_dir),
        "cache_hits": stream["cache_hits"],
        "parents": stream["parents"],
        "test_acc": summary["test_acc"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_cpu_tune.yaml")
    parser.add_argument("--output-dir", default="outputs/bench_tune_warm_cold")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.output_dir).resolve() / stamp
    shutil.rmtree(out / "cache", ignore_errors=True)  # cold means cold
    rows = [one_search(args, "cold", stamp, out), one_search(args, "warm", stamp, out)]
    cold, warm = rows
    print(f"\n{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.machine()}, config {args.config}, overrides {[*SMALL, *args.overrides]}\n")
    print("| run | trial wall s | augment actor busy s | cache hits / images augmented (all epochs) | whole search s (incl. bank) | top-1 % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['trial_s']:.0f} | {r['augment_busy_s']:.1f} | {r['cache_hits']} / {r['parents']} | {r['search_wall_s']:.0f} (bank {r['initial_bank_s']:.0f}) | {r['test_acc']:.2f} |")
    print(f"\nwarm / cold trial wall time: {warm['trial_s'] / cold['trial_s']:.2f}; augment busy: {warm['augment_busy_s'] / max(cold['augment_busy_s'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
