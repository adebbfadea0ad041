"""Public entry points, one per job; each takes a validated :class:`~dda_ray.config.Config`."""

from __future__ import annotations

from .config import Config
from .tracking import Tracker, last_epoch, log_run_artifacts


def preflight(cfg: Config) -> None:
    """Cheap checks of everything a distillation run will need, before Ray starts or anything is written.

    Each failure raises a user error (one ``error:`` line, exit 2): missing data, a teacher
    checkpoint that is missing/corrupt/unsafe/mismatched, a missing or wrong diffusion model,
    xformers requested where it cannot run, a corrupt or foreign bank, a RAY_ADDRESS where no
    cluster answers.
    """
    from pathlib import Path

    from .data import data_source
    from .data.datasets import CIFAR_URLS, DatasetError
    from .models.checkpoint import load_teacher

    kind, path = data_source(cfg.data)
    data_path = Path(path).expanduser()
    where = "" if data_path.is_absolute() else f" (relative to {Path.cwd()}: under `ray job submit --working-dir` that is the uploaded copy, so pass an absolute path every node can read)"
    if kind in CIFAR_URLS:
        folder = data_path / CIFAR_URLS[kind][1]
        if not cfg.data.download and not (folder.exists() or data_path.name == CIFAR_URLS[kind][1]):
            raise DatasetError(f"{kind} is not at {folder}{where} and data.download = false")
    elif not data_path.exists():
        raise DatasetError(f"data.path = {cfg.data.path} does not exist{where}; point it at the {kind} data (a folder or .tar.gz) or set data.fallback")
    teacher, _, _ = load_teacher(cfg)  # every mode distils from the teacher
    if cfg.distill.extra_banks:
        from .augment.crops import check_extra_banks
        from .models.checkpoint import fingerprint

        check_extra_banks(cfg.distill.extra_banks, fingerprint(teacher))
    if cfg.run.mode == "dda":
        from .augment.backends import AugmentError, check_pipeline_dir

        model = Path(cfg.augment.model).expanduser()
        if model.exists():
            check_pipeline_dir(model, cfg.augment)
        elif cfg.augment.model.startswith((".", "/", "~")) or cfg.augment.model.count("/") != 1:
            raise AugmentError(
                f"augment.model = {cfg.augment.model!r} is neither an existing directory nor a hub id (owner/name); "
                "train a local prior with jobs/train_prior.py or point it at a Stable Diffusion checkpoint"
            )
        if cfg.augment.xformers:
            try:
                import xformers  # noqa: F401
            except ImportError as e:
                raise AugmentError("augment.xformers=true but xformers is not installed; pip install 'dda_ray[gpu]' or set augment.xformers=false") from e
    if cfg.synthesis.bank_dir and cfg.run.mode != "real_kd":
        from .data.bank import bank_files, read_table

        for path in bank_files(cfg.synthesis.bank_dir):
            read_table(path)  # BankError for corrupt or foreign files
    if cfg.run.engine == "ray":
        from .engines.ray_compat import check_ray_address

        check_ray_address()  # an unreachable RAY_ADDRESS: seconds, not minutes of ray.init retries


def distill(cfg: Config, tracker: Tracker | None = None) -> dict:
    """Run DFKD in ``cfg.run.mode`` on ``cfg.run.engine``; returns the final metrics."""
    own = tracker is None
    tracker = Tracker.start(cfg, "distill") if own else tracker
    try:
        if cfg.run.engine == "local":
            from .engines.local import run_local

            final = run_local(cfg, tracker=tracker)
        else:
            from .engines.ray_train import run_ray

            final = run_ray(cfg, tracker=tracker)
        log_run_artifacts(tracker, cfg)
    except BaseException:
        if own:
            tracker.finish("FAILED")
        raise
    if own:
        tracker.finish()
    return final


def train_teacher(cfg: Config) -> dict:
    from .models.teacher import train_teacher as _train

    tracker = Tracker.start(cfg, "train_teacher")
    try:
        final = _train(cfg, tracker=tracker)
        tracker.log_artifact(cfg.run_dir / "config.yaml")
        tracker.log_artifact(cfg.run_dir / "metrics.jsonl")
        tracker.log_artifact(cfg.run_dir / "teacher", "teacher")
        tracker.log_model(cfg.run_dir / "teacher", cfg.data.image_size, register_as=cfg.tracking.register_as, step=last_epoch(cfg.run_dir))
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return final
