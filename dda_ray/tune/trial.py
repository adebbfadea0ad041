"""One Tune trial and what sizes and schedules the trials: the function trainable, the resources a
trial holds, the searcher with its concurrency cap, and ASHA that never stops a trial's last epoch.

Ray 2.60 (Train V2): a ``TorchTrainer`` cannot be handed to ``Tuner``; each trial is a function
that builds its own dataset and then trains in one of two places (``tune.train_in``):

* ``trial`` (``auto`` with ``resources.num_workers <= 1``): the KD loop runs in the trial's own
  process (:class:`TrialEngine`, the same :func:`~dda_ray.distill.driver.drive` as every engine), reading
  the trial's Ray Data stream directly and reporting each epoch with ``ray.tune.report``. No Ray
  Train controller, worker group or dataset split coordinator is started per trial (on a small
  machine that start-up is most of a short trial; see docs/BENCHMARKS.md). The trial holds the
  worker's resources itself; a failed trial is retried up to ``resources.max_failures`` times and
  resumes from its run directory's ``state.pt``, logging into the same MLflow child run.
* ``ray_train``: ``TorchTrainer(...).fit()`` with ``resources.num_workers`` workers (DDP when > 1).
  Metrics reach Tune through ``ray.tune.integration.ray_train.TuneReportCallback`` (a Train
  ``UserCallback`` that forwards rank 0's ``ray.train.report`` to the trial's Tune session).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ..config import Config, apply_values, config_from_dict
from ..engines.ray_train import RayTrainEngine


def trial_demand(cfg: Config, trial_cpus: float) -> dict[str, float]:
    """CPU/GPU that one running trial holds: its function, Train workers, bounded data pools, read tasks."""
    r = cfg.resources
    workers = max(1, r.num_workers)
    cpu = trial_cpus + workers * r.cpus_per_worker + r.augment_actors * r.augment_cpus + r.filter_actors * r.filter_cpus + (r.filter_cpus or 0.25)
    gpu = (workers if r.use_gpu else 0) + r.augment_actors * r.augment_gpus + r.filter_actors * r.filter_gpus
    return {"CPU": cpu, "GPU": gpu}


def max_concurrent_trials(cfg: Config, trial_cpus: float, cluster: dict[str, float], num_samples: int) -> int:
    """``resources.max_concurrent_trials``, else as many trials as the cluster holds at once (>= 1)."""
    if cfg.resources.max_concurrent_trials:
        return max(1, min(cfg.resources.max_concurrent_trials, num_samples))
    need = trial_demand(cfg, trial_cpus)
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min([*fits, num_samples]))


@dataclass
class TrialSetup:
    """What every trial gets from the driver (pickled into the trainable)."""

    base: dict  # the search config (absolute paths, shared bank dir, resolved tracking URI)
    search_name: str
    parent_run_id: str | None


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def trial_config(setup: TrialSetup, params: dict, trial_id: str) -> Config:
    """This trial's config: the search's with the sampled values and the trial's run name. A trial that
    trains in its own process and finds its run directory already made is Tune retrying it after a
    failure: it resumes (``run.resume``) from the last epoch its ``state.pt`` holds."""
    cfg = apply_values(config_from_dict(setup.base), params, name=trial_run_name(setup.search_name, trial_id))
    if cfg.tune.trains_in_trial(cfg) and (cfg.run_dir / "config.yaml").exists():
        cfg.run.resume = True
    return cfg


def trial_resources(cfg: Config, trial_cpus: float) -> dict[str, float]:
    """What the trial function reserves: its own CPU, plus the Train worker's share when it trains itself."""
    if not cfg.tune.trains_in_trial(cfg):
        return {"cpu": trial_cpus}
    r = cfg.resources
    return {"cpu": trial_cpus + r.cpus_per_worker, **({"gpu": 1} if r.use_gpu else {}), **r.worker_resources}


class TrialEngine(RayTrainEngine):
    """The KD loop in the Tune trial's own process (``tune.train_in: trial``): one worker, rows straight
    from the trial's Ray Data stream (the pool's slot order), each epoch's metrics to ``ray.tune.report``."""

    def __init__(self, dataset):
        self.rank, self.world_size, self.bank_s, self.dataset = 0, 1, None, dataset

    def device(self, cfg: Config):
        from ..runtime import resolve_device

        return resolve_device("auto" if cfg.resources.use_gpu else "cpu")  # the GPU the trial reserved

    def restored(self, load):
        return None  # a retried trial resumes from its run directory's state.pt (run.resume, set by run_trial)

    def shard(self):
        return self.dataset

    def report(self, metrics: dict, epoch: int, save_state) -> None:
        from ray import tune

        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def train_in_trial(cfg: Config, tracker) -> dict:
    """``tune.train_in: trial``: the run's stream, then :func:`~dda_ray.distill.driver.drive` here; returns the final metrics."""
    from ..distill.driver import drive
    from ..engines.ray_train import build_dataset
    from ..models.checkpoint import read_meta

    class_names = None if cfg.run.mode == "real_kd" else (read_meta(cfg.teacher.checkpoint) or {}).get("classes")  # sd_img2img prompts
    return drive(cfg, TrialEngine(build_dataset(cfg, class_names)), tracker)


def run_trial(params: dict, setup: TrialSetup) -> None:
    """The function trainable: this trial's config -> MLflow child run -> the KD loop in this process
    (``tune.train_in: trial``, :func:`train_in_trial`) or run_ray (TorchTrainer.fit)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..engines.ray_train import run_ray
    from ..runtime import mark, prepare_run_dir
    from ..tracking import Tracker, log_run_artifacts

    entered = time.time()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, params, trial_id)
    prepare_run_dir(cfg)  # <output_dir>/<name>-<trial id>/config.yaml; output_dir (caches, bank) is shared
    mark(cfg.run_dir, "trial_start", entered=entered)
    tracker = Tracker.start(
        cfg,
        "tune_trial",
        parent_run_id=setup.parent_run_id,
        run_name=cfg.run.name,
        extra_tags={"tune.trial_id": trial_id, "tune.search": setup.search_name},
    )
    mark(cfg.run_dir, "tracker_started")
    if not cfg.run.verbose:  # the trial's stream: no Ray Data bars beside the KD bar, as init_ray does in a driver
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    try:
        if cfg.tune.trains_in_trial(cfg):
            train_in_trial(cfg, tracker)
        else:
            run_ray(cfg, tracker=tracker, callbacks=[TuneReportCallback()])
        # A trial's student becomes an MLflow Model (a torch.export, seconds per trial) only when the search
        # registers its best one (tracking.register_as); its checkpoint files are logged either way.
        log_run_artifacts(tracker, cfg, register=False, model=bool(cfg.tracking.register_as))
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    mark(cfg.run_dir, "trial_end")


class FinalEpochASHA(ASHAScheduler):
    """ASHA on the per-epoch report, except that a trial's *last* epoch is never stopped.

    Tune kills a stopped trial's actor at once; at the last epoch that would cut off what the trial
    does after ``fit()`` (artifacts, ending its MLflow run) and saves no compute.
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.epoch_attr, self.last_epoch = time_attr, max_t  # our own copies: ASHA keeps its own private
        self.overruled = 0  # STOP decisions at a last epoch turned into CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self.epoch_attr, 0) >= self.last_epoch:
            self.overruled += 1
            return TrialScheduler.CONTINUE
        return action

    def debug_string(self) -> str:
        return f"{super().debug_string()}\n{self.overruled} of those stops came at a trial's last epoch and were overruled"


def make_searcher(name: str, seed: int, concurrent: int):
    """(search_alg, TuneConfig.max_concurrent_trials) with the concurrency cap actually applied.

    Tune wraps a ``Searcher`` (Optuna) in a ``ConcurrencyLimiter`` from ``max_concurrent_trials``,
    but silently ignores that setting for a ``BasicVariantGenerator`` instance (random search):
    that one takes the cap itself, or every sample starts at once and starves the cluster.
    """
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent), None


def trial_dirname(trial) -> str:
    return trial.trial_id
