"""Does DDA help? Arms at one identical budget, sharing one synthetic bank per seed and synthesis method.

    python benchmarks/accuracy.py --config configs/cifar10_cpu_demo.yaml [--seeds 0 1 2] [--arms real_kd dda_self]
        [--results benchmarks/results/accuracy.jsonl] [--rerun] [section.field=value ...]
    python benchmarks/accuracy.py --config configs/cifar10_cpu_smoke.yaml \
        --sweep filter.threshold=0.5,0.7,0.9,-1 --sweep augment.strength=0.1,0.3,0.5

Arms (same teacher, student, KD steps, batch and evaluation; ``ARMS`` below):
  real_kd          the real training split (upper bound)
  synth_dda        synthetic bank only, DDA's synthesizer (synthesis.method=dda; KD loss KL + CE + feature)
  synth_cmi        synthetic bank only, CMI (synthesis.method=cmi, cr 0.8; KD loss KL only)
  synth_fast       synthetic bank only, Fast-Datafree meta-synthesis (synthesis.method=fast, its
                   WRN Fast-2 settings; KD loss KL only) with the same generator image-steps as the
                   preset's dda settings (fast_budget): more rounds of 2 steps instead of fewer of many
  (inversion_cmi / inversion_fast in results files before 2026-12-07: the DDA synthesizer, then named
  cmi, and Fast with DDA's rotation term, both with the KL + CE + feature loss)
  dda_self         bank + diffusion variations kept by the cosine filter, with the preset's own
                   synthesis method and diffusion prior (the prior was trained on such a bank)
  dda_nofilter     as dda_self, keeping every variation (filter.threshold = -1)
  cutmix           synth_dda with CutMix on every KD batch (distill.mix=cutmix): diversity
                   without diffusion
  photos           synth_dda plus photo crops as extra KD rows (distill.extra_banks), cut like
                   the crops the photo prior trained on (its training.json): as many crops as the
                   dda arms make variations (num_variations x every synthetic row of the run)
  photo_kd         photo crops alone as the transfer set (no synthesis): One-Image-KD-style, a
                   fresh crop for every other KD row (PHOTO_KD_SHARE of the budget's rows)
  dda_photo        dda with the photo prior (PHOTO_PRIOR: trained on the packaged photos only) at
                   PHOTO_STRENGTH
  dda_photo_nofilter  as dda_photo, keeping every variation

``--sweep key=v1,v2,...`` replaces the arms by one ``dda`` arm per value (an ablation); several
``--sweep`` flags run one after the other.

The initial bank is shared per (seed, synthesis method): ``<output-dir>/bank-seed{seed}-{method}``,
synthesised (and timed on its own, over ``resources.synthesis_tasks`` Ray tasks when the preset asks
for them) just before the first arm of this invocation that needs it; real_kd needs none. The dda
arms also share the variation cache (keyed by strength, guidance, model, seed), so an arm that
differs only in its threshold reuses the diffusion work of the one before it -- that arm's
augmentation time is therefore not comparable.

Every finished (arm, seed) appends one JSON line to the results file (``--results``), which is only
ever appended to. An (arm, seed) whose line is already there for the same preset and overrides is
skipped, so an interrupted invocation resumes by running the same command again; ``--rerun`` runs
it anyway (one more line; ``benchmarks/report.py`` uses the latest line of an arm and seed).
The summary table, the paired differences and the per-epoch plot come from ``benchmarks/report.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from dda_ray.api import distill
from dda_ray.config import load_config
from dda_ray.runtime import cpu_description, package_versions, prepare_run_dir, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "accuracy.jsonl"

PHOTO_PRIOR = "checkpoints/photo_prior"  # the local prior trained on the packaged photos (configs/prior_photos_cpu.yaml)
# The photo arms' strength, fixed before any of them ran, from the variation statistics alone
# (benchmarks/variations.py on the pilot bank, seed 100; benchmarks/results/variations.jsonl): the
# largest strength whose variations keep the parent's teacher class at least half of the time and
# pass the preset's threshold (0.8) at least half of the time. The teacher-labelled prior beat the
# unconditional one on both counts at every strength, so the photo prior is the teacher-labelled one.
PHOTO_STRENGTH = 0.5

# Fast-Datafree's own settings for 2 inner steps (its scripts' WRN "Fast-2": lr_g 5e-3, lr_z 0.015; bn 10,
# oh 0.4, adv 1.1 are the method's defaults); how many rounds it gets is set by fast_budget() from the
# preset's dda settings.
FAST_STEPS = 2
FAST = ["synthesis.method=fast", f"synthesis.g_steps={FAST_STEPS}", f"synthesis.init_g_steps={FAST_STEPS}", "synthesis.lr_g=0.005", "synthesis.lr_z=0.015"]
# CMI's scripts: cr 0.8 (cr_t 0.2, adv 0.5, bn 1, oh 1 are the method's defaults)
CMI = ["synthesis.method=cmi", "synthesis.cr=0.8"]

# name -> config overrides of that arm; a new arm is one more entry.
ARMS: dict[str, list[str]] = {
    "real_kd": ["run.mode=real_kd"],
    "synth_dda": ["run.mode=inversion", "synthesis.method=dda"],
    "synth_cmi": ["run.mode=inversion", *CMI],
    "synth_fast": ["run.mode=inversion", *FAST],
    "dda_self": ["run.mode=dda"],
    "dda_nofilter": ["run.mode=dda", "filter.threshold=-1"],
    "cutmix": ["run.mode=inversion", "distill.mix=cutmix"],
    "photos": ["run.mode=inversion"],  # + distill.extra_banks (photo_crops)
    "photo_kd": ["run.mode=inversion", "synthesis.init_rounds=0", "synthesis.rounds_per_epoch=0"],  # + distill.extra_banks
    "dda_photo": ["run.mode=dda", f"augment.model={PHOTO_PRIOR}", f"augment.strength={PHOTO_STRENGTH}"],
    "dda_photo_nofilter": ["run.mode=dda", f"augment.model={PHOTO_PRIOR}", f"augment.strength={PHOTO_STRENGTH}", "filter.threshold=-1"],
}
CROP_ARMS = ("photos", "photo_kd")
PHOTO_KD_SHARE = 0.5  # photo_kd: crops = this share of the budget's KD rows (each crop seen about twice)


def crop_count(arm: str, base) -> int:
    """How many photo crops an arm adds: ``photos`` as many as the dda arms' variations of the run's
    synthetic rows (initial bank and rounds with the student); ``photo_kd`` PHOTO_KD_SHARE of the KD rows."""
    sc, d = base.synthesis, base.distill
    if arm == "photos":
        return base.augment.num_variations * (sc.init_rounds * sc.init_batch_size + d.epochs * sc.rounds_per_epoch * sc.batch_size)
    return int(PHOTO_KD_SHARE * d.epochs * (d.steps_per_epoch or 0) * d.batch_size)


def crop_overrides(prior: Path = ROOT / PHOTO_PRIOR) -> list[str]:
    """The crop settings the photo prior was trained with (its training.json), so the crop arms'
    rows are the crops that prior saw."""
    info = json.loads((prior / "training.json").read_text())
    if info.get("source") not in ("photos", "folder"):
        raise SystemExit(f"error: {prior} was not trained on photos (training.json source = {info.get('source')!r})")
    out = [
        f"augment.prior_source={info['source']}",
        f"augment.prior_crop_scale={json.dumps(info['crop_scale'])}",
        f"augment.prior_color_jitter={info['color_jitter']}",
        f"augment.prior_hflip={str(info['hflip']).lower()}",
    ]
    if info["source"] == "folder":
        out.append(f"augment.prior_folder={info['folder']}")
    return out


def build_crops(cfg, out_dir: Path, n: int, seed: int) -> tuple[Path, float]:
    """The crop bank of an arm (skipped when complete); returns (directory, seconds)."""
    from dda_ray.augment.crops import write_crop_bank
    from dda_ray.runtime import set_threads

    set_threads(cfg.resources.torch_threads)
    t0 = time.perf_counter()
    write_crop_bank(cfg, out_dir, n, seed)
    return out_dir, time.perf_counter() - t0


def fast_budget(base) -> list[str]:
    """The fast arm's rounds: as many generator image-steps as the preset's (dda) settings spend,
    in rounds of FAST_STEPS steps — the initial bank (rounds x batch x steps) and each epoch's round
    alike — so the two inversion arms get the same synthesis compute, Fast spending it on more images."""
    sc = base.synthesis
    return [
        f"synthesis.init_rounds={max(1, sc.init_rounds * sc.init_g_steps // FAST_STEPS)}",
        f"synthesis.batch_size={max(1, sc.batch_size * sc.g_steps // FAST_STEPS)}",
    ]


def resolve_arms(names: list[str], config: str, overrides: list[str]) -> dict[str, list[str]]:
    base = load_config(config, overrides)
    return {a: [*ARMS[a], *(fast_budget(base) if "synthesis.method=fast" in ARMS[a] and base.synthesis.method == "dda" else [])] for a in names}


def sweep_arms(sweeps: list[str]) -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for spec in sweeps:
        key, _, values = spec.partition("=")
        if not key or not values:
            raise SystemExit(f"error: --sweep {spec!r} is not key=v1,v2,...")
        for v in values.split(","):
            arms[f"dda {key}={v}"] = ["run.mode=dda", f"{key}={v}"]
    return arms


def synthesis_method(cfg) -> str:
    """The config's inversion method; presets from before ``synthesis.method`` existed are dda."""
    return getattr(cfg.synthesis, "method", "dda")


def build_bank(cfg) -> float:
    """Synthesise the shared initial bank (skipped when already complete); returns seconds."""
    from dda_ray.runtime import resolve_device
    from dda_ray.synthesis.initial_bank import run_synthesizer

    cfg = cfg.with_absolute_paths()
    if cfg.run.engine == "ray" and cfg.resources.synthesis_tasks > 0:
        from dda_ray.engines.ray_train import init_ray

        init_ray(cfg)  # rounds as concurrent Ray tasks, as jobs/distill.py does (same bank); the arms reuse this Ray
    t0 = time.perf_counter()
    run_synthesizer(cfg, device=resolve_device("cpu"))
    return time.perf_counter() - t0


def git_commit(repo: Path = ROOT) -> str:
    """Short HEAD of ``repo``, with ``-dirty`` when tracked files (other than ``benchmarks/results/``) differ
    from it; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        # results files are appended to while benchmarks run: they do not make the code dirty
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def read_results(path: Path) -> list[dict]:
    """The lines of a results file; a line that is not a JSON object (a cut-off write) is reported and left out."""
    rows = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not JSON; ignored", flush=True)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def result_key(arm: str, seed: int, preset: str, overrides: list[str]) -> tuple:
    return (arm, seed, preset, tuple(overrides))


def append_result(path: Path, row: dict) -> None:
    """Append one JSON line (a newline first if the file's last line lacks one); never rewrites the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:  # writes go to the end whatever the read position
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def fresh_run_name(out_dir: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... when an earlier invocation in the same second took it."""
    name, k = base, 1
    while (out_dir / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset YAML; recorded as given (the results' preset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--sweep", action="append", default=[], help="key=v1,v2,...: one dda arm per value (replaces --arms)")
    parser.add_argument("--output-dir", default="outputs/bench_accuracy")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help=f"JSONL file the results are appended to (default {DEFAULT_RESULTS.relative_to(ROOT)} in the repository)")
    parser.add_argument("--rerun", action="store_true", help="run (arm, seed) pairs the results file already holds (appends another line)")
    parser.add_argument("overrides", nargs="*")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    arms = sweep_arms(args.sweep) if args.sweep else resolve_arms(args.arms, args.config, args.overrides)
    out_dir = Path(args.output_dir).resolve()
    results = Path(args.results).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = git_commit()
    done = {result_key(r.get("arm"), r.get("seed"), r.get("preset"), r.get("overrides") or []) for r in read_results(results)}
    banks: dict[tuple[int, str], float] = {}  # (seed, method) -> seconds spent building it in this invocation
    for extra in arms.values():  # a bad override fails here, before any arm has spent its budget
        load_config(args.config, [*args.overrides, *extra])
    rows = []
    teacher_acc = None
    for seed in args.seeds:
        common = [*args.overrides, f"run.seed={seed}", f"run.output_dir={out_dir}"]
        for i, (arm, extra) in enumerate(arms.items()):
            key = result_key(arm, seed, args.config, args.overrides)
            if key in done and not args.rerun:
                print(json.dumps({"skipped": arm, "seed": seed, "reason": f"already in {results}"}), flush=True)
                continue
            probe = load_config(args.config, [*common, *extra])
            method = None if probe.run.mode == "real_kd" else synthesis_method(probe)
            bank_s, bank_override, crops_s = None, [], None
            if arm in CROP_ARMS:
                n = crop_count(arm, load_config(args.config, args.overrides))
                crop_cfg = load_config(args.config, [*common, *crop_overrides()])
                crops_dir, crops_s = build_crops(crop_cfg, out_dir / f"crops-seed{seed}-n{n}", n, seed)
                extra = [*extra, f"distill.extra_banks=[{crops_dir}]"]
                print(json.dumps({"seed": seed, "crops": n, "crops_s": crops_s, "dir": str(crops_dir)}), flush=True)
            if method is not None and probe.synthesis.init_rounds > 0:
                bank = out_dir / f"bank-seed{seed}-{method}"
                bank_override = [f"synthesis.bank_dir={bank}"]
                if (seed, method) not in banks:
                    bank_cfg = load_config(args.config, [*common, *extra, *bank_override, "run.mode=inversion"])
                    banks[(seed, method)] = build_bank(bank_cfg)
                    print(json.dumps({"seed": seed, "method": method, "bank_s": banks[(seed, method)], "bank": str(bank)}), flush=True)
                bank_s = banks[(seed, method)]
            cfg = load_config(args.config, [*common, *extra, *bank_override, f"run.name={fresh_run_name(out_dir, f'{stamp}-a{i}-s{seed}')}"])
            prepare_run_dir(cfg)
            load_start = os.getloadavg()
            t0 = time.perf_counter()
            final = distill(cfg)
            wall = time.perf_counter() - t0
            load_end = os.getloadavg()
            epochs = read_jsonl(cfg.run_dir / "metrics.jsonl")
            if teacher_acc is None:
                meta_path = Path(cfg.with_absolute_paths().teacher.checkpoint) / "meta.json"
                teacher_acc = json.loads(meta_path.read_text()).get("accuracy") if meta_path.exists() else None
            row = {
                "arm": arm,
                "seed": seed,
                "preset": args.config,
                "overrides": list(args.overrides),
                "top1": final["test_acc"],
                "epochs": [e["test_acc"] for e in epochs if "test_acc" in e],
                "wall_s": wall,
                "commit": commit,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "load": {"start": list(load_start), "end": list(load_end)},
                "cpu": cpu_description(),  # another CPU or package build rounds differently: another trajectory
                "versions": package_versions(),
                "arm_overrides": list(extra),
                "mode": cfg.run.mode,
                "synthesis_method": method,
                "kept_fraction": final.get("kept_fraction"),
                "crops_s": crops_s,  # seconds this invocation spent cutting the arm's photo crops
                "bank_s": bank_s,  # seconds this invocation spent on the shared bank (near 0 when it was complete already)
                "synthesis_s": sum(e.get("synthesis_s", e.get("prepare_s", 0.0)) for e in epochs),
                "train_s": sum(e.get("train_s", 0.0) for e in epochs),
                "teacher_top1": teacher_acc,
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "run_dir": str(cfg.run_dir),
            }
            append_result(results, row)
            done.add(key)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{started}; {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; config {args.config}, overrides {args.overrides}; commit {commit}")
    print(f"teacher top-1: {teacher_acc}; results appended to {results}\n")
    print("| arm | seed | top-1 % | kept fraction | shared bank s | synthesis s (rounds with student) | train s (incl. streaming) | arm wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = "" if r["kept_fraction"] is None else f"{r['kept_fraction']:.2f}"
        bank_s = "" if r["bank_s"] is None else f"{r['bank_s']:.0f}"
        print(f"| {r['arm']} | {r['seed']} | {r['top1']:.2f} | {kept} | {bank_s} | {r['synthesis_s']:.0f} | {r['train_s']:.0f} | {r['wall_s']:.0f} |")
    print(f"\nsummary over every seed so far: python benchmarks/report.py --results {results} --preset {args.config}")


if __name__ == "__main__":
    main()
