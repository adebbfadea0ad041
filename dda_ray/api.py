"""Public entry points, one per job; each takes a validated :class:`~dda_ray.config.Config`."""

from __future__ import annotations

from .config import Config


def distill(cfg: Config) -> dict:
    """Run DFKD in ``cfg.run.mode`` on ``cfg.run.engine``; returns the final metrics."""
    if cfg.run.engine == "local":
        from .local import run_local

        augment = None
        if cfg.run.mode == "dda":
            from .stages import local_augment_fn

            augment = local_augment_fn(cfg)
        return run_local(cfg, augment)
    from .pipeline import run_ray

    return run_ray(cfg)
