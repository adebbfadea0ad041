"""The jobs' command lines: the console scripts of ``[project.scripts]`` and what ``jobs/*.py`` run.

``dda-distill``, ``dda-tune``, ``dda-train-teacher`` and ``dda-train-prior`` (installed with the
package) are the same commands as ``python jobs/distill.py`` etc. Each takes ``--config FILE`` plus
``section.field=value`` overrides, ``--help`` (every config field with its default) and
``--print-config`` (the resolved config as YAML, then exit 0). Each ``*_main`` returns None, so a
console script exits 0 after a successful run (user errors exit 2, see :mod:`dda_ray.jobs.cli`).
"""

from __future__ import annotations

import sys

from ..config import Config, ConfigError
from .cli import run_job

DISTILL_HELP = """Distil a student from a teacher without its training data (DDA: synthesis -> diffusion -> filter -> KD).

    dda-distill --config configs/cifar10_cpu_smoke.yaml [section.field=value ...]
    python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml

Starts an embedded local Ray unless RAY_ADDRESS points at a cluster; run.engine=local runs
everything in this process without Ray. The student is logged to MLflow as the model ``model``
(float32 NCHW RGB in [0, 1] -> logits; ``mlflow.pytorch.load_model("runs:/<run_id>/model")``),
registered as ``tracking.register_as`` when set.
"""

TUNE_HELP = """Ray Tune search over augment.strength, augment.guidance and filter.threshold (space: the YAML's ``tune:``).

    dda-tune --config configs/cifar10_cpu_tune.yaml [section.field=value ...]
    python jobs/tune.py --config configs/cifar10_cpu_tune.yaml tune.searcher=random tune.num_samples=8
    python jobs/tune.py --config configs/cifar10_cpu_tune.yaml "tune.space.augment.strength={uniform: [0.2, 0.5]}"
    ray job submit --working-dir . -- python jobs/tune.py --config configs/cifar10_cpu_tune.yaml

Each trial runs the same TorchTrainer pipeline as jobs/distill.py (run.name=<name>-<trial id>, same
output_dir: the initial bank and the augmentation cache are shared). ASHA stops weak trials on the
per-epoch test_acc. MLflow: one parent run per search, one child run per trial. The best config is
printed and written to <output_dir>/<name>/best.yaml:

    python jobs/distill.py --config <output_dir>/<name>/best.yaml
"""

TRAIN_TEACHER_HELP = """Train a teacher on real data.

    dda-train-teacher --config configs/teacher_cifar10_wrn16_2.yaml [section.field=value ...]
    python jobs/train_teacher.py --config configs/teacher_cifar10_wrn16_2.yaml [section.field=value ...]

MLflow (``tracking.*``): params, per-epoch metrics, the checkpoint files, and the teacher as the MLflow
Model ``model`` (float32 NCHW RGB in [0, 1] -> logits; ``mlflow.pytorch.load_model("runs:/<run_id>/model")``),
registered as ``tracking.register_as`` when set.
"""

TRAIN_PRIOR_HELP = """Train the local diffusion prior (augment.backend=local_prior), never on the teacher's dataset (data.path).

    dda-train-prior --config configs/prior_cifar10_cpu.yaml --bank outputs/<synthesis run>/bank [section.field=value ...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --bank outputs/<synthesis run>/bank [section.field=value ...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --folder DIR_OR_ARCHIVE [...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml augment.prior_source=photos [...]

What it trains on is ``augment.prior_source`` (docs/AUGMENTATION.md):

* ``bank`` (default): the synthetic bank from ``--bank DIR`` (or ``augment.prior_bank=DIR``), with its labels;
* ``folder``: any unlabeled images under ``--folder DIR`` (or ``augment.prior_source=folder
  augment.prior_folder=DIR``), searched recursively, or a .tar/.tar.gz/.tgz/.zip archive of them;
* ``photos``: natural photographs shipped inside scikit-image, scikit-learn and matplotlib (offline).

``folder`` and ``photos`` train on random resized crops at ``data.image_size``
(``augment.prior_crop_scale``, ``augment.prior_color_jitter``), labelled by the teacher
(``augment.prior_labels=teacher``: ``teacher.arch`` / ``teacher.checkpoint``) or by nobody (``none``).

The pipeline is written to ``augment.model`` (the path the ``local_prior`` backend then loads),
replaced atomically. An existing prior there is only replaced with ``--overwrite``. The loss log
streams to ``<run_dir>/prior_loss.jsonl`` and is copied beside the weights (``loss.jsonl``,
``training.json``: also the source, its image list and the label mode). The class count is
``data.num_classes``; hyper-parameters are the ``augment.prior_*`` fields. MLflow (``tracking.*``):
the config as params, the loss log as metrics (loss, lr, img_per_s per logged step), the saved
prior under the run's ``prior`` artifacts.
"""

# --bank / --folder / --overwrite are taken out of argv before the shared parser runs; they are
# declared to it only so that --help lists them.
PRIOR_OPTIONS = [
    (["--bank"], {"metavar": "DIR", "help": "train on this synthetic bank (augment.prior_source=bank augment.prior_bank=DIR)"}),
    (["--folder"], {"metavar": "DIR", "help": "train on unlabeled images under DIR or in an archive (augment.prior_source=folder)"}),
    (["--overwrite"], {"action": "store_true", "help": "replace an existing prior at augment.model"}),
]


def distill_main(argv: list[str] | None = None) -> None:
    from ..api import distill, preflight

    run_job(distill, description=DISTILL_HELP, argv=argv, preflight=preflight, job="distill")


def tune_main(argv: list[str] | None = None) -> None:
    from ..tune.search import tune_search

    # prepare_dir=False: tune_search checks the space, the tracking server and RAY_ADDRESS before it makes its directory
    run_job(tune_search, description=TUNE_HELP, argv=argv, prepare_dir=False, job="tune")


def train_teacher_main(argv: list[str] | None = None) -> None:
    from ..api import train_teacher

    run_job(train_teacher, description=TRAIN_TEACHER_HELP, argv=argv, job="train_teacher")


def train_prior_job(cfg: Config, overwrite: bool = False) -> dict:
    """Train the local prior on ``augment.prior_source`` and write it to ``augment.model``; returns the training summary."""
    import json
    from pathlib import Path

    from ..augment.prior import train_prior
    from ..augment.prior_sources import build_prior_source
    from ..runtime import resolve_device, set_threads
    from ..tracking import Tracker

    aug = cfg.augment
    if aug.prior_source == "bank" and aug.prior_bank is None:
        raise ConfigError("augment.prior_bank is not set; pass --bank DIR (a synthetic bank directory) or augment.prior_bank=DIR")
    if aug.prior_source == "folder" and aug.prior_folder is None:
        raise ConfigError(
            "augment.prior_source = 'folder' but augment.prior_folder is not set; pass --folder DIR or augment.prior_folder=DIR"
        )
    out = Path(aug.model).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"augment.model = {aug.model!r} already holds a prior; pass --overwrite to replace it or choose another augment.model"
        )
    set_threads(cfg.resources.torch_threads)
    device = resolve_device(aug.device)
    tracker = Tracker.start(cfg, "train_prior")
    try:
        source = build_prior_source(cfg, device)
        summary = train_prior(
            source,
            out,
            aug,
            num_classes=cfg.data.num_classes,
            log_path=cfg.run_dir / "prior_loss.jsonl",
            seed=cfg.run.seed,
            device=str(device),
            on_log=lambda line: tracker.log_metrics({k: v for k, v in line.items() if k != "step"}, step=line["step"]),
        )
        tracker.log_artifact(cfg.run_dir / "config.yaml")
        tracker.log_artifact(cfg.run_dir / "prior_loss.jsonl")
        tracker.log_artifact(out, "prior")  # the pipeline (weights, configs, loss.jsonl, training.json)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    shown = {k: v for k, v in summary.items() if k not in ("images", "skipped")}  # the lists are in training.json
    print(json.dumps(shown, indent=2))
    print(f"prior saved to {out} (augment.backend=local_prior augment.model={out})")
    return summary


def split_prior_argv(argv: list[str]) -> tuple[list[str], str | None, str | None, bool]:
    """Take --bank DIR, --folder DIR (or --bank=DIR, --folder=DIR) and --overwrite out of argv (the rest is the shared job CLI)."""
    rest, found, overwrite = [], {"--bank": None, "--folder": None}, False
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in found:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise SystemExit(f"error: {flag} needs a directory")
            found[flag] = value
        elif arg == "--overwrite":
            overwrite = True
        else:
            rest.append(arg)
    if found["--bank"] is not None and found["--folder"] is not None:
        raise SystemExit("error: pass either --bank (a synthetic bank) or --folder (unlabeled images), not both")
    return rest, found["--bank"], found["--folder"], overwrite


def source_overrides(bank: str | None, folder: str | None) -> list[str]:
    """The config overrides --bank / --folder stand for."""
    if bank is not None:
        return ["augment.prior_source=bank", f"augment.prior_bank={bank}"]
    if folder is not None:
        return ["augment.prior_source=folder", f"augment.prior_folder={folder}"]
    return []


def train_prior_main(argv: list[str] | None = None) -> None:
    argv, bank, folder, overwrite = split_prior_argv(sys.argv[1:] if argv is None else argv)
    run_job(
        lambda cfg: train_prior_job(cfg, overwrite),
        description=TRAIN_PRIOR_HELP,
        argv=argv + source_overrides(bank, folder),
        options=PRIOR_OPTIONS,
        job="train_prior",
    )


__all__ = [
    "distill_main",
    "source_overrides",
    "split_prior_argv",
    "train_prior_job",
    "train_prior_main",
    "train_teacher_main",
    "tune_main",
]
