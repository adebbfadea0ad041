"""The single-process engine (``run.engine=local``): the run driver with in-process rows, no Ray.

Fast to test and to debug. :func:`dda_ray.distill.driver.drive` does the run (set-up, resume, epochs,
reports, final save) as it does on every Ray Train worker; this engine supplies only its rows (the
in-memory epoch pool, :class:`~dda_ray.distill.sources.BankSource`, or the real split) and reports to the
run directory's files (metrics.jsonl, state.pt: what the driver writes anyway).
"""

from __future__ import annotations

from ..config import Config
from ..distill.driver import Engine, RunParts, drive
from ..distill.sources import AugmentFn, BankSource, RealSource, load_bank_rows
from ..tracking import Tracker


class LocalEngine(Engine):
    def __init__(self, augment: AugmentFn | None = None, progress: bool = True):
        self.augment, self.progress = augment, progress

    def source(self, run: RunParts):
        from ..models.checkpoint import fingerprint

        cfg = run.cfg
        if cfg.run.mode == "real_kd":
            return RealSource(run.data.train.subset(cfg.data.train_subset, cfg.run.seed), cfg.distill.batch_size, cfg.run.seed, cfg.distill.steps_per_epoch is None)
        augment = None
        if cfg.run.mode == "dda":
            if self.augment is None:  # the Ray engine's augment and filter stages, run in this process
                from .stages import local_augment_fn

                self.augment = local_augment_fn(cfg, run.meta.get("classes"))
            augment = self.augment
        return BankSource(cfg, load_bank_rows(cfg, fingerprint(run.teacher)), run.synthesizer, augment, run.progress)


def run_local(cfg: Config, augment: AugmentFn | None = None, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Run ``cfg.run.mode`` end to end in this process (:func:`~dda_ray.distill.driver.drive`); returns the
    final metrics. ``augment``: the ``dda`` augment step (default: :func:`~dda_ray.engines.stages.local_augment_fn`
    with the teacher's class names)."""
    return drive(cfg, LocalEngine(augment, progress), tracker)


__all__ = ["LocalEngine", "run_local"]
