"""What does a warm Tune trial cost against a cold one, and where does its time go? The same trial config, twice, through Tune.

    RAY_AUTH_MODE=disabled python benchmarks/tune_warm_cold.py [--config configs/cifar10_cpu_tune.yaml] [--no-record] [section.field=value ...]

Two one-trial searches (``jobs/tune.py``'s code path: ``tune_search`` -> function trainable -> the
trial's KD loop, in its own process with ``tune.train_in: auto`` and one worker, else a TorchTrainer)
with one fixed point of the space (the config's own strength, guidance and threshold):

  cold   empty augmentation cache: every bank image is diffused
  warm   the same values again: the bank's variations come from the cache

Both share one initial bank (``synthesis.bank_dir``), made before the cold search and timed
separately, as a search makes it once for all its trials. Prints one JSON line per run, then
Markdown for docs/BENCHMARKS.md ("Tune: warm vs cold trial"), also written to
``<output-dir>/<stamp>/report.md``: the trial walls, and a per-component table of each trial (set-up,
Ray Train start-up when a TorchTrainer is used, teacher/data loads, the stream's first batch per
epoch, KD steps, evaluation, reports, teardown, Tune's own overhead; stage actors' constructors and
prior loads beside them), read back from the trial's ``timeline.jsonl`` and ``metrics.jsonl``.
Appends ``warm_over_cold_trial`` (warm trial wall / cold trial wall; detail: both walls, the
components, budget, load during each search) to ``benchmarks/results/perf.jsonl`` unless
``--no-record``.

The per-epoch synthesis rounds with the student are off by default (``synthesis.rounds_per_epoch=0``):
their images depend on each trial's student, so they cannot be shared, and their ids repeat
between trials (see docs/BENCHMARKS.md for why that matters for the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import record  # noqa: E402 - benchmarks/perf.py: one line per figure in benchmarks/results/perf.jsonl

from dda_ray.config import Domain, load_config  # noqa: E402
from dda_ray.engines.stages import read_stream_stats  # noqa: E402
from dda_ray.runtime import read_jsonl  # noqa: E402
from dda_ray.tune.search import tune_search  # noqa: E402

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


# The trial's critical path, from the run's timeline (dda_ray.runtime.mark: <run_dir>/timeline.jsonl). Each
# row is the time from the previous event present to its own (tune.train_in=trial has no fit/Train events);
# the epochs between source_ready and the last epoch_reported are split by metrics.jsonl (prepare_s,
# first_batch_s, train_s, eval_s). The rows add up to the trial function's wall.
SETUP = [
    ("tracker_started", "trial set-up: config, run dir, MLflow run"),
    ("data_checked", "trial process: data check (ray_train)"),
    ("bank_checked", "trial process: teacher + bank check (ray_train)"),
    ("fit_start", "trial process: dataset graph, TorchTrainer (ray_train)"),
    ("worker_start", "Ray Train controller + worker start-up (ray_train)"),
    ("teacher_loaded", "teacher load"),
    ("data_loaded", "data load (test split)"),
    ("source_ready", "student, synthesizer + bank check, stream source"),
]
EPOCHS = [
    ("epochs: between-epoch rounds", "prepare"),
    ("epochs: wait for the stream's first batch (actor start-up)", "first_batch"),
    ("epochs: KD steps (incl. waits on the stream)", "kd"),
    ("epochs: evaluation", "eval"),
    ("epochs: report, checkpoint", "report"),
]
TEARDOWN = [
    ("final_saved", "final save"),
    ("fit_end", "Ray Train shutdown (ray_train)"),
    ("trial_end", "after the loop: artifacts, MLflow run end"),
]
SIDE = [  # beside the critical path (they overlap the rows above): sums over every actor started
    ("augment actors: constructor", "augment_init", "augment_ready"),
    ("augment actors: loading the prior", "prior_load_start", "prior_loaded"),
    ("filter actors: constructor incl. teacher", "filter_init", "filter_ready"),
]


def chain(first: dict[str, float], start: str, steps: list[tuple[str, str]]) -> dict[str, float | None]:
    """Seconds from the previous event present (from ``start``) to each event of ``steps``; None if absent."""
    out, prev = {}, first.get(start)
    for event, label in steps:
        t = first.get(event)
        out[label] = t - prev if t is not None and prev is not None else None
        prev = t if t is not None else prev
    return out


def breakdown(trial_dir: Path, search_dir: Path) -> dict:
    """Seconds per component of one trial (see SETUP/EPOCHS/TEARDOWN/SIDE), from its timeline and metrics."""
    first: dict[str, float] = {}
    events = read_jsonl(trial_dir / "timeline.jsonl")
    for ev in events:
        first.setdefault(ev["event"], ev["t"])
        if ev["event"] == "trial_start":
            first.setdefault("entered", ev["entered"])
        if ev["event"] == "epoch_reported":
            first["last_epoch_reported"] = ev["t"]
    search = {ev["event"]: ev["t"] for ev in read_jsonl(search_dir / "timeline.jsonl")}

    def span(a: str, b: str) -> float | None:
        return first[b] - first[a] if a in first and b in first else None

    out: dict[str, float | int | None] = chain(first, "entered", SETUP)
    epochs = read_jsonl(trial_dir / "metrics.jsonl")
    parts = {
        "prepare": sum(e.get("prepare_s", 0.0) for e in epochs),
        "first_batch": sum(e.get("first_batch_s", 0.0) for e in epochs),
        "kd": sum(e.get("train_s", 0.0) - e.get("first_batch_s", 0.0) for e in epochs),
        "eval": sum(e.get("eval_s", 0.0) for e in epochs),
    }
    total = span("source_ready", "last_epoch_reported")
    parts["report"] = None if total is None else total - sum(parts.values())
    out.update({label: parts[key] for label, key in EPOCHS})
    out.update(chain(first, "last_epoch_reported", TEARDOWN))
    out["trial function wall (sum of the above)"] = span("entered", "trial_end")
    out["Tune: tuner.fit() -> trial function entered"] = first["entered"] - search["tuner_fit_start"] if "tuner_fit_start" in search and "entered" in first else None
    out["Tune: trial end -> tuner.fit() returns"] = search["tuner_fit_end"] - first["trial_end"] if "tuner_fit_end" in search and "trial_end" in first else None
    for label, a, b in SIDE:  # every actor of every pass over the stream (a pool per execution), summed
        starts: dict[int, float] = {}
        spans = []
        for ev in events:
            if ev["event"] == a:
                starts[ev["pid"]] = ev["t"]
            elif ev["event"] == b and ev["pid"] in starts:
                spans.append(ev["t"] - starts.pop(ev["pid"]))
        out[label] = sum(spans) if spans else None
        out[f"{label} (count)"] = len(spans)
    return out


class LoadSampler:
    """The 1-minute load average every few seconds while a search runs (this machine is shared)."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        xs = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(xs) / len(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


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
    with LoadSampler() as load:
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
        "load": load.summary(),
        "train_in": cfg.tune.train_in,
        "in_trial": cfg.tune.trains_in_trial(cfg),
        "components": breakdown(trial_dir, out / cfg.run.name),
    }
    print(json.dumps(row), flush=True)
    return row


def command_line() -> str:
    return " ".join(["RAY_AUTH_MODE=disabled python benchmarks/tune_warm_cold.py", *(shlex.quote(a) for a in sys.argv[1:])])


def fmt(x: float | int | None, nd: int = 1) -> str:
    return "-" if x is None else str(x) if isinstance(x, int) else f"{x:.{nd}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_cpu_tune.yaml")
    parser.add_argument("--output-dir", default="outputs/bench_tune_warm_cold")
    parser.add_argument("--no-record", action="store_true", help="do not append warm_over_cold_trial to benchmarks/results/perf.jsonl")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded cluster: no token file in ~/.ray
    print(f"command: {command_line()}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.output_dir).resolve() / stamp
    shutil.rmtree(out / "cache", ignore_errors=True)  # cold means cold
    rows = [one_search(args, "cold", stamp, out), one_search(args, "warm", stamp, out)]
    cold, warm = rows
    ratio = warm["trial_s"] / cold["trial_s"]
    overrides = [*SMALL, *args.overrides]
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.machine()}, {os.cpu_count()} CPUs, config {args.config}, overrides {overrides}",
        f"trials train {'in the trial process' if cold['in_trial'] else 'in a TorchTrainer'} (tune.train_in={cold['train_in']}); "
        f"load average (1 min) during the searches: cold {cold['load']}, warm {warm['load']}",
        f"command: {command_line()}",
        "",
        "| run | trial wall s | augment actor busy s | cache hits / images augmented (all epochs) | whole search s (incl. bank) | top-1 % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['trial_s']:.0f} | {r['augment_busy_s']:.1f} | {r['cache_hits']} / {r['parents']} | {r['search_wall_s']:.0f} (bank {r['initial_bank_s']:.0f}) | {r['test_acc']:.2f} |")
    lines += ["", "Where a trial's time goes (s; from <trial dir>/timeline.jsonl and metrics.jsonl):", "", "| component | cold s | warm s |", "|---|---|---|"]
    for label in cold["components"]:
        lines.append(f"| {label} | {fmt(cold['components'][label])} | {fmt(warm['components'].get(label))} |")
    lines += ["", f"warm / cold trial wall time: {ratio:.2f}; augment busy: {warm['augment_busy_s'] / max(cold['augment_busy_s'], 1e-9):.3f}"]
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    (out / "report.md").write_text(text)
    print(f"(also in {out / 'report.md'})")
    if not args.no_record:
        detail = {
            "cold_trial_s": cold["trial_s"],
            "warm_trial_s": warm["trial_s"],
            "components": {"cold": cold["components"], "warm": warm["components"]},
            "augment_busy_s": {"cold": cold["augment_busy_s"], "warm": warm["augment_busy_s"]},
            "test_acc": {"cold": cold["test_acc"], "warm": warm["test_acc"]},
            "config": args.config,
            "overrides": overrides,
            "load_during": {"cold": cold["load"], "warm": warm["load"]},
            "train_in": cold["train_in"],
            "cpus": os.cpu_count(),
            "command": command_line(),
        }
        line = record("warm_over_cold_trial", ratio, "ratio", detail)
        print(f"appended warm_over_cold_trial = {ratio:.3f} to benchmarks/results/perf.jsonl (load {line['load']})")


if __name__ == "__main__":
    main()
