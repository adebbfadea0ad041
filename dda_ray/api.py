"""Public entry points, one per job; each takes a validated :class:`~dda_ray.config.Config`."""

from __future__ import annotations

from .config import Config
from .tracking import Tracker, accuracy_curve


def log_run_artifacts(tracker: Tracker, cfg: Config) -> None:
    """What every distillation run leaves in MLflow: config, metrics, curve, grids, student."""
    run_dir = cfg.run_dir
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "metrics.jsonl")
    curve = accuracy_curve(run_dir / "metrics.jsonl", run_dir / "accuracy.png")
    if curve is not None:
        tracker.log_artifact(curve)
    tracker.log_artifact(run_dir / "grids", "grids")
    tracker.log_artifact(run_dir / "student", "student")


def distill(cfg: Config, tracker: Tracker | None = None) -> dict:
    """Run DFKD in ``cfg.run.mode`` on ``cfg.run.engine``; returns the final metrics."""
    own = tracker is None
    tracker = Tracker.start(cfg, "distill") if own else tracker
    try:
        if cfg.run.engine == "local":
            from .local import run_local

            augment = None
            if cfg.run.mode == "dda":
                from .stages import local_augment_fn

                augment = local_augment_fn(cfg)
            final = run_local(cfg, augment, tracker=tracker)
        else:
            from .pipeline import run_ray

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
    from .teacher import train_teacher as _train

    tracker = Tracker.start(cfg, "train_teacher")
    try:
        final = _train(cfg, tracker=tracker)
        tracker.log_artifact(cfg.run_dir / "config.yaml")
        tracker.log_artifact(cfg.run_dir / "metrics.jsonl")
        tracker.log_artifact(cfg.run_dir / "teacher", "teacher")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return final
