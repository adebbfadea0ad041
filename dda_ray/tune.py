"""Ray Tune search over DDA's knobs (``augment.strength``, ``augment.guidance``, ``filter.threshold``, ...).

::

    driver: validate cfg.tune -> MLflow parent run -> initial bank ONCE (shared synthesis.bank_dir)
        -> Tuner(function trainable, ASHA on per-epoch test_acc, Optuna or random search)
            trial: cfg + sampled values, run.name=<name>-<trial id>, same output_dir
                -> MLflow child run (tag mlflow.parentRunId) -> pipeline.run_ray(...,
                   callbacks=[TuneReportCallback()]) : TorchTrainer.fit() reports every epoch to Tune
        -> best trial -> <output_dir>/<name>/best.yaml (ready for jobs/distill.py)

Ray 2.60 (Train V2): a ``TorchTrainer`` cannot be handed to ``Tuner``; each trial is a function
that builds its own dataset and calls ``TorchTrainer(...).fit()``. Metrics reach Tune through
``ray.tune.integration.ray_train.TuneReportCallback`` (a Train ``UserCallback`` that forwards
rank 0's ``ray.train.report`` to the trial's Tune session). Train V2's local mode
(``num_workers=0``) runs no callbacks and refuses ``ray.train.get_context()`` inside a Tune
session, so trials always run at least one Train worker (``num_workers=0`` is promoted to 1).

Shared work between trials: the initial bank is synthesised once by the driver into a shared
``synthesis.bank_dir``; diffusion variations are cached under ``augment.cache_dir`` keyed by
(image id, backend, model, strength, guidance, steps, variations, seed) — a trial whose
(strength, guidance) was seen before reads the bank's variations from disk; the filter
threshold is applied on the fly, so it costs nothing to vary.

The space (``tune.space``) maps dotted config fields to one distribution each::

    augment.strength: {uniform: [0.1, 0.6]}
    augment.guidance: {choice: [1.0, 2.0, 3.0]}
    filter.threshold: {uniform: [0.5, 0.95]}
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .config import Config, ConfigError, config_from_dict

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
METRICS = ("test_acc", "test_loss")
TUNABLE_SECTIONS = ("student", "synthesis", "augment", "filter", "distill")
DEFAULT_SPACE = {
    "augment.strength": {"uniform": [0.1, 0.6]},
    "augment.guidance": {"choice": [1.0, 2.0, 3.0]},
    "filter.threshold": {"uniform": [0.5, 0.95]},
}


# ------------------------------------------------------------------ the spec
@dataclass
class Distribution:
    """One dimension of the space: ``{uniform: [lo, hi]}``, ``{choice: [a, b, ...]}``, ..."""

    key: str
    kind: str
    args: list

    def to_tune(self):
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        return tune.choice(list(a))

    def extremes(self) -> list:
        """The values a sample can come closest to: checked against the config's own validation."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass
class TuneSpec:
    """The validated ``tune:`` section."""

    space: list[Distribution]
    num_samples: int = 4
    metric: str = "test_acc"
    mode: str = "max"
    searcher: str = "optuna"
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the top 1/reduction_factor at each rung
    trial_cpus: float = 0.25  # CPU of the trial function itself (Train workers and data actors come on top)
    seed: int | None = None  # searcher seed (None: run.seed)

    FIELDS = ("space", "num_samples", "metric", "mode", "searcher", "scheduler", "grace_period", "reduction_factor", "trial_cpus", "seed")

    @classmethod
    def from_config(cls, cfg: Config) -> TuneSpec:
        """Parse and check ``cfg.tune``; every mistake is a :class:`ConfigError` naming the key."""
        raw = dict(cfg.tune or {})
        unknown = sorted(set(raw) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"unknown tune key(s) {', '.join('tune.' + u for u in unknown)}; known: {', '.join(cls.FIELDS)}")
        space_raw = raw.pop("space", None)
        if space_raw is None:
            space_raw = DEFAULT_SPACE
        if not isinstance(space_raw, dict) or not space_raw:
            raise ConfigError(f"tune.space = {space_raw!r} is not allowed; expected a non-empty mapping of 'section.field: {{distribution: args}}'")
        space = [parse_distribution(k, v, cfg) for k, v in space_raw.items()]
        spec = cls(space=space)
        types = {"num_samples": int, "metric": str, "mode": str, "searcher": str, "scheduler": str, "grace_period": int, "reduction_factor": (int, float), "trial_cpus": (int, float), "seed": (int, type(None))}
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, types[k]):
                raise ConfigError(f"tune.{k} = {v!r} is not allowed; expected {_type_name(types[k])}")
            setattr(spec, k, v)
        _require(spec.num_samples >= 1, "tune.num_samples", spec.num_samples, "an integer >= 1")
        _require(spec.metric in METRICS, "tune.metric", spec.metric, f"one of {METRICS} (reported every epoch)")
        _require(spec.mode in ("max", "min"), "tune.mode", spec.mode, "max or min")
        _require(spec.searcher in SEARCHERS, "tune.searcher", spec.searcher, f"one of {SEARCHERS}")
        _require(spec.scheduler in SCHEDULERS, "tune.scheduler", spec.scheduler, f"one of {SCHEDULERS}")
        _require(spec.grace_period >= 1, "tune.grace_period", spec.grace_period, "an integer >= 1 (epochs)")
        _require(spec.reduction_factor > 1, "tune.reduction_factor", spec.reduction_factor, "a number > 1")
        _require(spec.trial_cpus > 0, "tune.trial_cpus", spec.trial_cpus, "a positive number (Ray refuses {'cpu': 0})")
        return spec

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.space]

    def param_space(self) -> dict:
        return {d.key: d.to_tune() for d in self.space}

    def as_params(self) -> dict[str, str]:
        """The search's own settings as MLflow params of the parent run."""
        out = {f"tune.{k}": str(getattr(self, k)) for k in self.FIELDS if k != "space"}
        out.update({f"tune.space.{d.key}": d.describe() for d in self.space})
        return out


def _type_name(t) -> str:
    names = {int: "an integer", str: "a string", float: "a number", type(None): "null"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names[x] for x in ts)


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name} = {value!r} is not allowed; expected {allowed}")


def parse_distribution(key: str, value: Any, cfg: Config) -> Distribution:
    """``augment.strength: {uniform: [0.1, 0.6]}`` -> a checked :class:`Distribution`."""
    name = f"tune.space.{key}"
    flat = cfg.flat()
    section = key.split(".", 1)[0]
    if key not in flat:
        raise ConfigError(f"{name}: unknown config field {key!r}; expected a 'section.field' of the config, e.g. augment.strength, augment.guidance, filter.threshold")
    if section not in TUNABLE_SECTIONS:
        raise ConfigError(f"{name}: section {section!r} cannot be tuned (trials share it with the search); tunable sections: {', '.join(TUNABLE_SECTIONS)}")
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{name} = {value!r} is not allowed; expected one distribution, e.g. {{uniform: [0.1, 0.6]}} or {{choice: [1.0, 2.0]}}; distributions: {', '.join(DISTRIBUTIONS)}")
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{name}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{name}.{kind} = {args!r} is not allowed; expected a list of arguments")
    args = list(args)
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if kind in ("uniform", "loguniform"):
        _require(len(args) == 2 and numbers and args[0] < args[1], f"{name}.{kind}", args, "[low, high] with low < high")
        _require(kind == "uniform" or args[0] > 0, f"{name}.{kind}", args, "[low, high] with 0 < low < high")
    elif kind == "quniform":
        _require(len(args) == 3 and numbers and args[0] < args[1] and args[2] > 0, f"{name}.{kind}", args, "[low, high, q] with low < high and q > 0")
    elif kind == "randint":
        _require(len(args) == 2 and all(isinstance(a, int) and not isinstance(a, bool) for a in args) and args[0] < args[1], f"{name}.{kind}", args, "[low, high) integers with low < high")
    else:
        _require(len(args) == len({json.dumps(a) for a in args}), f"{name}.choice", args, "a list of distinct values")
    dist = Distribution(key, kind, args)
    for v in dist.extremes():  # every value a trial may get passes the config's own validation
        try:
            apply_values(cfg, {key: v})
        except ConfigError as e:
            raise ConfigError(f"{name}: {dist.describe()} can produce {v!r}, which the config refuses: {e}") from None
    return dist


def _plain(v: Any) -> Any:
    """numpy scalars (what searchers may hand out) -> Python values the config accepts."""
    item = getattr(v, "item", None)
    return item() if callable(item) and not isinstance(v, (list, dict, str)) else v


def apply_values(cfg: Config, values: dict[str, Any], **run: Any) -> Config:
    """A validated copy of ``cfg`` with dotted ``values`` (and ``run.*`` fields) set."""
    raw = copy.deepcopy(cfg.to_dict())
    for key, v in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = _plain(v)
    raw["run"].update(run)
    return config_from_dict(raw).validate()


# ------------------------------------------------------------- resources
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


# ----------------------------------------------------------------- trials
@dataclass
class TrialSetup:
    """What every trial gets from the driver (pickled into the trainable)."""

    base: dict  # the search config (absolute paths, shared bank dir, resolved tracking URI)
    search_name: str
    parent_run_id: str | None


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def run_trial(params: dict, setup: TrialSetup) -> None:
    """The function trainable: this trial's config -> MLflow child run -> run_ray (TorchTrainer.fit)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .api import log_run_artifacts
    from .pipeline import run_ray
    from .runtime import prepare_run_dir
    from .tracking import Tracker

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_values(config_from_dict(setup.base), params, name=trial_run_name(setup.search_name, trial_id))
    prepare_run_dir(cfg)  # <output_dir>/<name>-<trial id>/config.yaml; output_dir (caches, bank) is shared
    tracker = Tracker.start(
        cfg,
        "tune_trial",
        parent_run_id=setup.parent_run_id,
        run_name=cfg.run.name,
        extra_tags={"tune.trial_id": trial_id, "tune.search": setup.search_name},
    )
    try:
        run_ray(cfg, tracker=tracker, callbacks=[TuneReportCallback()])
        # A trial's student becomes an MLflow Model (a torch.export, seconds per trial) only when the search
        # registers its best one (tracking.register_as); its checkpoint files are logged either way.
        log_run_artifacts(tracker, cfg, register=False, model=bool(cfg.tracking.register_as))
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()


class FinalEpochASHA(ASHAScheduler):
    """ASHA on the per-epoch report, except that a trial's *last* epoch is never stopped.

    Tune kills a stopped trial's actor at once; at the last epoch that would cut off what the trial
    does after ``fit()`` (artifacts, ending its MLflow run) and saves no compute.
    """

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


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


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ----------------------------------------------------------------- driver
def search_config(cfg: Config, uri: str | None) -> Config:
    """The config every trial starts from: absolute paths, one shared bank dir, one tracking URI."""
    base = cfg.with_absolute_paths()
    if base.run.mode != "real_kd" and not base.synthesis.bank_dir:
        base.synthesis.bank_dir = str(Path(base.run.output_dir) / base.run.name / "bank")
    if base.augment.cache_dir:
        base.augment.cache_dir = str(Path(base.augment.cache_dir).expanduser().resolve())
    if base.resources.num_workers == 0:
        # Train V2's local mode runs no Train callbacks and refuses get_context() in a Tune session.
        print("note: resources.num_workers=0 (local mode) cannot report to Tune; trials run 1 Train worker", flush=True)
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
    from .sources import run_synthesizer

    t0 = time.perf_counter()
    run_synthesizer(cfg, progress=False)
    return time.perf_counter() - t0


def _trial_rows(results, spec: TuneSpec, search_name: str, epochs: int) -> list[dict]:
    rows = []
    for r in results:
        cfgv = r.config or {}
        df = r.metrics_dataframe
        history = [float(x) for x in df[spec.metric].dropna()] if df is not None and spec.metric in df else []
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name
        ran = int(metrics.get("epoch", len(history)) or 0)
        status = "error" if r.error else ("completed" if ran >= epochs else "stopped")
        rows.append(
            {
                "trial_id": trial_id,
                "run_name": trial_run_name(search_name, trial_id),
                **{k: _plain(cfgv.get(k)) for k in spec.keys},
                "epochs": ran,
                spec.metric: history[-1] if history else None,
                f"best_{spec.metric}": (max(history) if spec.mode == "max" else min(history)) if history else None,
                "history": history,
                "time_total_s": metrics.get("time_total_s"),
                "status": status,
                "error": str(r.error).splitlines()[0][:300] if r.error else None,
            }
        )
    return rows


def pick_best(rows: list[dict], spec: TuneSpec) -> dict:
    """The best final ``metric`` among trials that ran every epoch (else among all that reported)."""
    scored = [r for r in rows if r[spec.metric] is not None]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"]) or "no trial reported a metric"
        raise RuntimeError(f"every trial failed: {errors}")
    completed = [r for r in scored if r["status"] == "completed"] or scored
    sign = 1 if spec.mode == "max" else -1
    return max(completed, key=lambda r: sign * r[spec.metric])


def write_best_yaml(cfg: Config, spec: TuneSpec, best: dict, path: Path) -> Config:
    """``best.yaml``: the search config with the best values, as a distill run (checked by reloading)."""
    from .config import load_config

    best_cfg = apply_values(cfg, {k: best[k] for k in spec.keys}, name=f"{cfg.run.name}-best", resume=False)
    best_cfg.tune = {}
    header = (
        f"# Best trial {best['trial_id']} of the Tune search {cfg.run.name!r}: {spec.metric} = {best[spec.metric]}"
        f" after {best['epochs']} epoch(s).\n"
        + "".join(f"#   {k} = {best[k]}\n" for k in spec.keys)
        + f"# Run it:  python jobs/distill.py --config {path}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + best_cfg.to_yaml())
    load_config(path)  # what jobs/distill.py will do: fail here, not there
    return best_cfg


def _close_unfinished_children(parent, rows: list[dict], cfg: Config) -> None:
    """Trials stopped by ASHA are killed mid-run: end their MLflow runs and upload what they left."""
    from .tracking import Tracker, accuracy_curve

    if not parent.enabled:
        return
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    by_name = {r["run_name"]: r for r in rows}
    for run in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"):
        if run.info.status != "RUNNING":
            continue
        name = run.data.tags.get("mlflow.runName", "")
        row = by_name.get(name, {})
        child = Tracker(parent.uri, run.info.run_id)
        child._client = client
        run_dir = Path(cfg.run.output_dir) / name
        if run_dir.exists():
            child.log_artifact(run_dir / "config.yaml")
            child.log_artifact(run_dir / "metrics.jsonl")
            curve = accuracy_curve(run_dir / "metrics.jsonl", run_dir / "accuracy.png")
            if curve is not None:
                child.log_artifact(curve)
            child.log_artifact(run_dir / "grids", "grids")
        status = row.get("status", "stopped")
        child.set_tag("tune.status", status)
        child.finish("FAILED" if status == "error" else "KILLED")


def _register_best(parent, run_name: str, name: str) -> None:
    """Register the MLflow Model of the best trial's child run (``tracking.register_as``); a warning if it has none."""
    from .tracking import register_run_model

    if not parent.enabled:
        return
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.mlflow.runName = '{run_name}'")
    try:
        if not runs:
            raise LookupError(f"no child run named {run_name!r}")
        version = register_run_model(parent.uri, runs[0].info.run_id, name)
    except Exception as e:  # noqa: BLE001 - the search's results are written already; say what is missing
        print(f"WARNING: the best trial's model was not registered as {name!r} ({type(e).__name__}: {e})", flush=True)
        return
    parent.set_tag("registered_model", f"{name}/{version}")
    print(f"registered the best trial's model as {name!r} version {version}", flush=True)


def _curves_png(rows: list[dict], metric: str, path: Path) -> Path | None:
    if not any(r["history"] for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for r in rows:
        if r["history"]:
            ax.plot(range(1, len(r["history"]) + 1), r["history"], marker="o", label=r["trial_id"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def tune_search(cfg: Config) -> dict:
    """Run the search described by ``cfg.tune``; returns the best trial's row (values, metric, paths)."""
    from ray import tune

    from .pipeline import init_ray
    from .runtime import check_ray_address, prepare_run_dir
    from .tracking import Tracker, check_reachable, tracking_uri

    spec = TuneSpec.from_config(cfg)
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
        bank_s = build_shared_bank(base)
        print(f"initial bank: {base.synthesis.bank_dir} ({bank_s:.1f} s, shared by every trial)", flush=True)
        init_ray(base)
        import ray

        cluster = ray.cluster_resources()
        concurrent = max_concurrent_trials(base, spec.trial_cpus, cluster, spec.num_samples)
        need = trial_demand(base, spec.trial_cpus)
        print(f"tune: {spec.num_samples} trial(s), {concurrent} at a time (one trial holds ~{need['CPU']:g} CPU, {need['GPU']:g} GPU; cluster {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU)", flush=True)
        parent.log_params({"tune.max_concurrent_trials": concurrent, "tune.initial_bank_s": f"{bank_s:.1f}"})

        scheduler = None
        if spec.scheduler == "asha":
            scheduler = FinalEpochASHA(time_attr="epoch", max_t=base.distill.epochs, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor, stop_last_trials=False)
        search_alg, limit = make_searcher(spec.searcher, base.run.seed if spec.seed is None else spec.seed, concurrent)
        setup = TrialSetup(base=base.to_dict(), search_name=base.run.name, parent_run_id=parent.run_id)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": spec.trial_cpus})
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
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(run_dir / "tune"), failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
        t0 = time.perf_counter()
        results = tuner.fit()
        search_s = time.perf_counter() - t0

        rows = _trial_rows(results, spec, base.run.name, base.distill.epochs)
        _close_unfinished_children(parent, rows, base)
        (run_dir / "trials.json").write_text(json.dumps(rows, indent=2))
        best = pick_best(rows, spec)
        best_path = run_dir / "best.yaml"
        write_best_yaml(base_for_best(cfg, base), spec, best, best_path)
        summary = {**{k: v for k, v in best.items() if k != "history"}, "best_yaml": str(best_path), "search_s": search_s, "initial_bank_s": bank_s, "max_concurrent_trials": concurrent, "trials": len(rows)}
        (run_dir / "best.json").write_text(json.dumps(summary, indent=2))
        _print_summary(rows, best, spec, best_path)

        parent.log_metrics({f"best_{spec.metric}": best[spec.metric], "search_s": search_s, "initial_bank_s": bank_s, "trials_completed": sum(r["status"] == "completed" for r in rows)}, step=0)
        parent.set_tag("tune.best_trial", best["trial_id"])
        parent.set_tag("tune.best_run_name", best["run_name"])
        for k in spec.keys:
            parent.set_tag(f"best.{k}", str(best[k]))
        if cfg.tracking.register_as:
            _register_best(parent, best["run_name"], cfg.tracking.register_as)
        parent.log_artifact(run_dir / "config.yaml")
        parent.log_artifact(best_path)
        parent.log_artifact(run_dir / "trials.json")
        curves = _curves_png(rows, spec.metric, run_dir / "trials.png")
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


def _print_summary(rows: list[dict], best: dict, spec: TuneSpec, best_path: Path) -> None:
    width = max(len(k) for k in spec.keys)
    print("\ntrials:", flush=True)
    for r in rows:
        vals = ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in spec.keys)
        print(f"  {r['trial_id']}  {r['status']:<9} epochs={r['epochs']}  {spec.metric}={r[spec.metric]}  {vals}", flush=True)
    print(f"\nbest trial {best['trial_id']}: {spec.metric} = {best[spec.metric]}", flush=True)
    for k in spec.keys:
        print(f"  {k:<{width}} = {best[k]}", flush=True)
    print(f"best config: {best_path}\n  python jobs/distill.py --config {best_path}", flush=True)


__all__ = ["TuneSpec", "Distribution", "parse_distribution", "apply_values", "trial_demand", "max_concurrent_trials", "run_trial", "tune_search", "pick_best", "write_best_yaml"]
