"""Ray Tune search over DDA's knobs (``augment.strength``, ``augment.guidance``, ``filter.threshold``, ...).

::

    driver: cfg.tune (validated with the config) -> MLflow parent run -> data decoded and initial bank made ONCE
            (shared synthesis.bank_dir) -> Tuner(function trainable, ASHA on per-epoch test_acc, Optuna or random search)
            trial: cfg + sampled values, run.name=<name>-<trial id>, same output_dir
                -> MLflow child run (tag mlflow.parentRunId) -> the trial's Ray Data stream, then
                   tune.train_in=trial (one worker): driver.drive in the trial's own process, ray.tune.report per epoch
                   tune.train_in=ray_train: pipeline.run_ray(..., callbacks=[TuneReportCallback()]): TorchTrainer.fit()
        -> best trial -> <output_dir>/<name>/best.yaml (ready for jobs/distill.py)

The search space and settings are the config's ``tune`` section (:mod:`dda_ray.config.space`); one
trial, its resources, searcher and scheduler are in :mod:`dda_ray.tune.trial`; the trial rows,
``best.yaml`` and the MLflow parent/child bookkeeping in :mod:`dda_ray.tune.results`.

Train V2's local mode (``num_workers=0``) runs no callbacks and refuses ``ray.train.get_context()``
inside a Tune session, so trials always run at least one worker (``num_workers=0`` is promoted to 1); with
one worker (``tune.train_in: auto``) that worker is the trial's own process, not a Ray Train worker.

Shared work between trials: the initial bank is synthesised once by the driver into a shared
``synthesis.bank_dir``; diffusion variations are cached under ``augment.cache_dir`` keyed by
(image id, backend, model, strength, guidance, steps, variations, seed) — a trial whose
(strength, guidance) was seen before reads the bank's variations from disk (and its augment actors
never load the diffusion model); the filter threshold is applied on the fly, so it costs nothing to vary.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ..config import Config, apply_values
from ..config.space import Domain, TuneConfig
from .results import close_unfinished_children, curves_png, pick_best, print_summary, register_best, trial_rows, write_best_yaml
from .trial import FinalEpochASHA, TrialSetup, make_searcher, max_concurrent_trials, run_trial, trial_demand, trial_dirname, trial_resources


def search_config(cfg: Config, uri: str | None) -> Config:
    """The config every trial starts from: absolute paths, one shared bank dir, one tracking URI."""
    base = cfg.with_absolute_paths()
    if base.run.mode != "real_kd" and not base.synthesis.bank_dir:
        base.synthesis.bank_dir = str(Path(base.run.output_dir) / base.run.name / "bank")
    if base.augment.cache_dir:
        base.augment.cache_dir = str(Path(base.augment.cache_dir).expanduser().resolve())
    if base.resources.num_workers == 0:
        # Train V2's local mode runs no Train callbacks and refuses get_context() in a Tune session.
        print("note: resources.num_workers=0 (local mode) cannot report to Tune; trials train with 1 worker", flush=True)
        base.resources.num_workers = 1
    base.run.resume = False
    if uri is None:
        base.tracking.enabled = False
    else:
        base.tracking.uri = uri  # trials log where the parent does (MLFLOW_TRACKING_URI is not forwarded to Ray workers)
    return base


def build_shared_bank(cfg: Config) -> float:
    """Synthesise the initial bank once, before any trial (rounds already on disk are skipped)."""
    if cfg.run.mode == "real_kd":
        return 0.0
    from ..synthesis.initial_bank import run_synthesizer

    t0 = time.perf_counter()
    run_synthesizer(cfg, progress=False)
    return time.perf_counter() - t0


def tune_search(cfg: Config) -> dict:
    """Run the search described by ``cfg.tune``; returns the best trial's row (values, metric, paths)."""
    from ray import tune

    from ..engines.ray_compat import check_ray_address
    from ..engines.ray_train import init_ray
    from ..engines.shared_disk import check_shared_paths, shared_paths
    from ..runtime import mark, prepare_run_dir
    from ..tracking import Tracker, check_reachable, tracking_uri

    spec = cfg.validate().tune  # a config changed in code is checked again here
    if cfg.tracking.enabled and cfg.tracking.on_unreachable == "fail":
        check_reachable(tracking_uri(cfg))  # TrackingError before anything is written or trained
    check_ray_address()  # likewise for an unreachable RAY_ADDRESS
    prepare_run_dir(cfg)
    parent = Tracker.start(cfg, "tune")  # on_unreachable=warn: a loud warning, no tracking
    try:
        parent.log_params(spec.as_params())
        base = search_config(cfg, parent.uri if parent.enabled else None)
        run_dir = Path(base.run.output_dir) / base.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        from ..data import load_data

        load_data(base.data, progress=True)  # decoded (and its cache written) once, before trials read it at once
        bank_s = build_shared_bank(base)
        print(f"initial bank: {base.synthesis.bank_dir} ({bank_s:.1f} s, shared by every trial)", flush=True)
        init_ray(base)
        check_shared_paths(shared_paths(base))  # several nodes: trials on each must see the bank, cache and outputs
        import ray

        cluster = ray.cluster_resources()
        concurrent = max_concurrent_trials(base, spec.trial_cpus, cluster, spec.num_samples)
        need = trial_demand(base, spec.trial_cpus)
        where = "in the trial's own process" if spec.trains_in_trial(base) else f"in a TorchTrainer of {base.resources.num_workers} worker(s)"
        print(f"tune: {spec.num_samples} trial(s), {concurrent} at a time, each training {where} (one trial holds ~{need['CPU']:g} CPU, {need['GPU']:g} GPU; cluster {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU)", flush=True)
        parent.log_params({"tune.max_concurrent_trials": concurrent, "tune.initial_bank_s": f"{bank_s:.1f}"})

        scheduler = None
        if spec.scheduler == "asha":
            scheduler = FinalEpochASHA(time_attr="epoch", max_t=base.distill.epochs, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor, stop_last_trials=False)
        search_alg, limit = make_searcher(spec.searcher, base.run.seed if spec.seed is None else spec.seed, concurrent)
        setup = TrialSetup(base=base.to_dict(), search_name=base.run.name, parent_run_id=parent.run_id)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(base, spec.trial_cpus))
        # a trial that trains in its own process is retried like a Train worker (from its run dir's state.pt)
        retries = base.resources.max_failures if spec.trains_in_trial(base) else 0
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=limit,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(run_dir / "tune"), failure_config=tune.FailureConfig(max_failures=retries), verbose=1),
        )
        t0 = time.perf_counter()
        mark(run_dir, "tuner_fit_start")
        results = tuner.fit()
        mark(run_dir, "tuner_fit_end")
        search_s = time.perf_counter() - t0

        rows = trial_rows(results, spec, base.run.name, base.distill.epochs)
        close_unfinished_children(parent, rows, base)
        (run_dir / "trials.json").write_text(json.dumps(rows, indent=2))
        best = pick_best(rows, spec)
        best_path = run_dir / "best.yaml"
        write_best_yaml(base_for_best(cfg, base), spec, best, best_path)
        summary = {**{k: v for k, v in best.items() if k != "history"}, "best_yaml": str(best_path), "search_s": search_s, "initial_bank_s": bank_s, "max_concurrent_trials": concurrent, "trials": len(rows)}
        (run_dir / "best.json").write_text(json.dumps(summary, indent=2))
        print_summary(rows, best, spec, best_path)

        parent.log_metrics({f"best_{spec.metric}": best[spec.metric], "search_s": search_s, "initial_bank_s": bank_s, "trials_completed": sum(r["status"] == "completed" for r in rows)}, step=0)
        parent.set_tag("tune.best_trial", best["trial_id"])
        parent.set_tag("tune.best_run_name", best["run_name"])
        for k in spec.keys:
            parent.set_tag(f"best.{k}", str(best[k]))
        if cfg.tracking.register_as:
            register_best(parent, best["run_name"], cfg.tracking.register_as)
        parent.log_artifact(run_dir / "config.yaml")
        parent.log_artifact(best_path)
        parent.log_artifact(run_dir / "trials.json")
        curves = curves_png(rows, spec.metric, run_dir / "trials.png")
        if curves is not None:
            parent.log_artifact(curves)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return summary


def base_for_best(cfg: Config, base: Config) -> Config:
    """best.yaml keeps the user's resources (e.g. num_workers=0) but the shared bank and absolute paths."""
    best = copy.deepcopy(base)
    best.resources = copy.deepcopy(cfg.resources)
    best.tracking = copy.deepcopy(cfg.tracking)  # not the resolved URI: MLFLOW_TRACKING_URI keeps working
    return best


__all__ = [
    "Domain", "FinalEpochASHA", "TrialSetup", "TuneConfig", "apply_values", "base_for_best", "build_shared_bank",
    "make_searcher", "max_concurrent_trials", "pick_best", "run_trial", "search_config", "trial_demand", "tune_search", "write_best_yaml",
]  # fmt: skip
