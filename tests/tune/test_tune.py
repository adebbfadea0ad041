"""The Ray Tune search: space validation, resource sizing, and a 2-trial search on local Ray
tracked by a real MLflow server (one parent run, one child run per trial)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from dda_ray.config import ConfigError, TuneConfig, config_from_dict, load_config
from dda_ray.tune.search import apply_values, max_concurrent_trials, pick_best, trial_demand

from .._helpers import free_port, start_test_ray, tiny_run_args

TUNED = ("augment.strength", "augment.guidance", "filter.threshold")
SPACE = {
    "augment.strength": {"uniform": [0.2, 0.6]},
    "augment.guidance": {"choice": [1.0, 3.0]},
    "filter.threshold": {"uniform": [0.0, 0.9]},
}


def spec_of(tune: dict) -> TuneConfig:
    """The ``tune:`` section of a config file, loaded and validated with the rest of the config."""
    return config_from_dict({"teacher": {"checkpoint": None}, "tune": tune}).validate().tune


# ------------------------------------------------------------ validation
def test_space_parses_into_tune_domains_and_params():
    spec = spec_of({"num_samples": 3, "searcher": "random", "space": SPACE})
    assert spec.keys == list(TUNED) and spec.num_samples == 3 and spec.metric == "test_acc"
    space = spec.param_space()
    assert space["augment.strength"].lower == 0.2 and space["augment.strength"].upper == 0.6
    assert space["augment.guidance"].categories == [1.0, 3.0]
    assert spec.as_params()["tune.space.filter.threshold"] == "uniform[0.0, 0.9]"
    assert spec_of({}).keys == list(TUNED)  # no space: the default covers the three DDA knobs


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"spaces": {}}, r"unknown field\(s\) tune.spaces"),
        ({"space": {"augment.strenght": {"uniform": [0.1, 0.5]}}}, r"tune.space.augment.strenght: unknown config field"),
        ({"space": {"augment.strength": {"normal": [0.3, 0.1]}}}, r"unknown distribution 'normal'; expected one of uniform, loguniform"),
        ({"space": {"augment.strength": {"uniform": [0.6, 0.1]}}}, r"tune.space.augment.strength.uniform = \[0.6, 0.1\].*low < high"),
        ({"space": {"augment.strength": [0.1, 0.5]}}, r"expected one distribution"),
        ({"space": {"augment.strength": {"uniform": [0.0, 0.5]}}}, r"can produce 0.0, which the config refuses: augment.strength"),
        ({"space": {"filter.threshold": {"choice": ["high"]}}}, r"can produce 'high'.*expected a number"),
        ({"space": {"resources.num_workers": {"choice": [1, 2]}}}, r"section 'resources' cannot be tuned"),
        ({"space": {}}, r"tune.space = \{\} is not allowed"),
        ({"searcher": "hyperopt"}, r"tune.searcher = 'hyperopt' is not allowed; expected one of \('optuna', 'random'\)"),
        ({"metric": "kept_fraction"}, r"tune.metric = 'kept_fraction'"),
        ({"num_samples": 0}, r"tune.num_samples = 0"),
        ({"trial_cpus": 0}, r"tune.trial_cpus = 0"),
        ({"grace_period": "1"}, r"tune.grace_period = '1' is not allowed; expected an integer"),
    ],
)
def test_bad_specs_are_config_errors_naming_the_key(tune, message):
    with pytest.raises(ConfigError, match=message):
        spec_of(tune)


def test_the_space_is_set_and_checked_by_dotted_overrides():
    cfg = load_config(None, ["teacher.checkpoint=null", "tune.searcher=random", "tune.space.augment.strength={loguniform: [0.05, 0.5]}"])
    assert cfg.tune.searcher == "random" and cfg.tune.keys == ["augment.strength"]  # a space given replaces the default
    assert cfg.tune.as_params()["tune.space.augment.strength"] == "loguniform[0.05, 0.5]"
    with pytest.raises(ConfigError, match=r"tune.space.augment.strength.uniform = \[0.5, 0.1\]"):
        load_config(None, ["teacher.checkpoint=null", "tune.space.augment.strength={uniform: [0.5, 0.1]}"])
    with pytest.raises(ConfigError, match=r"tune.space.distill.lr.loguniform = \[0, 0.1\].*0 < low"):
        load_config(None, ["teacher.checkpoint=null", "tune.space.distill.lr={loguniform: [0, 0.1]}"])
    with pytest.raises(ConfigError, match=r"tune.num_samples = 0"):
        load_config(None, ["teacher.checkpoint=null", "tune.num_samples=0"])


def test_the_tune_section_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["teacher.checkpoint=null", "tune.space={distill.lr: {loguniform: [0.01, 0.2]}, synthesis.g_steps: {randint: [5, 20]}}"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["tune"]["space"] == {"distill.lr": {"loguniform": [0.01, 0.2]}, "synthesis.g_steps": {"randint": [5, 20]}}
    assert load_config(path) == cfg


def test_values_are_applied_and_validated():
    cfg = load_config(None, ["teacher.checkpoint=null"])
    out = apply_values(cfg, {"augment.strength": 0.45, "filter.threshold": 0.7}, name="t-1")
    assert (out.augment.strength, out.filter.threshold, out.run.name) == (0.45, 0.7, "t-1")
    assert cfg.augment.strength == 0.3  # the search config is untouched
    with pytest.raises(ConfigError, match="augment.strength"):
        apply_values(cfg, {"augment.strength": 1.5})


def test_max_concurrent_trials_follows_resources():
    cfg = load_config(None, ["teacher.checkpoint=null", "resources.num_workers=1", "resources.cpus_per_worker=0.25"])
    assert trial_demand(cfg, 0.25) == {"CPU": 1.25, "GPU": 0.0}  # trial + worker + augment + filter + read
    assert max_concurrent_trials(cfg, 0.25, {"CPU": 2.0}, num_samples=8) == 1
    assert max_concurrent_trials(cfg, 0.25, {"CPU": 16.0}, num_samples=8) == 8
    assert max_concurrent_trials(cfg, 0.25, {"CPU": 64.0}, num_samples=4) == 4  # never more than the samples
    gpu = load_config(None, ["teacher.checkpoint=null", "resources.num_workers=1", "resources.use_gpu=true", "resources.augment_gpus=1"])
    assert max_concurrent_trials(gpu, 0.25, {"CPU": 64.0, "GPU": 4.0}, num_samples=8) == 2  # 2 GPUs per trial
    fixed = load_config(None, ["teacher.checkpoint=null", "resources.max_concurrent_trials=3"])
    assert max_concurrent_trials(fixed, 0.25, {"CPU": 2.0}, num_samples=8) == 3


def test_where_trials_train_is_checked_against_the_workers():
    def cfg_of(*args):
        return load_config(None, ["teacher.checkpoint=null", *args])

    for workers, expected in [(0, True), (1, True), (2, False)]:  # auto: in the trial unless DDP needs Ray Train
        cfg = cfg_of(f"resources.num_workers={workers}")
        assert cfg.tune.train_in == "auto" and cfg.tune.trains_in_trial(cfg) is expected
    cfg = cfg_of("resources.num_workers=1", "tune.train_in=ray_train")
    assert not cfg.tune.trains_in_trial(cfg)
    with pytest.raises(ConfigError, match=r"tune\.train_in.*resources\.num_workers = 2.*tune\.train_in=ray_train"):
        cfg_of("resources.num_workers=2", "tune.train_in=trial")
    with pytest.raises(ConfigError, match=r"tune\.train_in"):
        cfg_of("tune.train_in=driver")


def test_a_trial_that_trains_itself_holds_the_workers_resources():
    from dda_ray.tune.trial import trial_resources

    cfg = load_config(None, ["teacher.checkpoint=null", "resources.num_workers=1", "resources.cpus_per_worker=0.5"])
    assert trial_resources(cfg, 0.25) == {"cpu": 0.75}  # the trial function and the loop it runs
    assert trial_demand(cfg, 0.25)["CPU"] == 0.25 + 0.5 + 0.25 + 0.25 + 0.25  # the same total either way
    gpu = load_config(None, ["teacher.checkpoint=null", "resources.num_workers=1", "resources.use_gpu=true", "resources.worker_resources={accel: 1}"])
    assert trial_resources(gpu, 0.25) == {"cpu": 0.25 + gpu.resources.cpus_per_worker, "gpu": 1, "accel": 1}
    ray_train = load_config(None, ["teacher.checkpoint=null", "resources.num_workers=1", "tune.train_in=ray_train"])
    assert trial_resources(ray_train, 0.25) == {"cpu": 0.25}  # the Train worker reserves its own


def test_a_retried_trial_resumes_from_its_run_directory(tmp_path):
    """Tune retries a failed trial that trains in its own process (resources.max_failures): the second call finds
    the trial's run directory and resumes from its state.pt; a fresh trial never resumes."""
    from dda_ray.runtime import prepare_run_dir
    from dda_ray.tune.trial import TrialSetup, trial_config

    base = load_config(None, ["teacher.checkpoint=null", f"run.output_dir={tmp_path}", "resources.num_workers=1"])
    setup = TrialSetup(base=base.to_dict(), search_name="s", parent_run_id=None)
    first = trial_config(setup, {"augment.strength": 0.4}, "t1")
    assert first.run.name == "s-t1" and first.augment.strength == 0.4 and not first.run.resume
    prepare_run_dir(first)
    retry = trial_config(setup, {"augment.strength": 0.4}, "t1")
    assert retry.run.resume and retry.run_dir == first.run_dir
    assert not trial_config(setup, {"augment.strength": 0.4}, "t2").run.resume
    setup.base["tune"]["train_in"] = "ray_train"  # Ray Train restarts its workers itself; the trial is not retried
    assert not trial_config(setup, {"augment.strength": 0.4}, "t1").run.resume


@pytest.mark.parametrize("name", ["optuna", "random"])
def test_the_concurrency_cap_reaches_every_searcher(name):
    """Tune ignores max_concurrent_trials for a BasicVariantGenerator instance: it must carry the cap."""
    from ray.tune.search import BasicVariantGenerator

    from dda_ray.tune.search import make_searcher

    alg, limit = make_searcher(name, seed=0, concurrent=2)
    if name == "random":
        assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == 2 and limit is None
    else:
        assert limit == 2  # Tune wraps the Optuna searcher in a ConcurrencyLimiter(2)


def test_best_prefers_trials_that_ran_every_epoch():
    spec = spec_of({"space": SPACE})
    rows = [
        {"trial_id": "a", "test_acc": 30.0, "status": "stopped", "error": None},
        {"trial_id": "b", "test_acc": 20.0, "status": "completed", "error": None},
        {"trial_id": "c", "test_acc": 25.0, "status": "completed", "error": None},
        {"trial_id": "d", "test_acc": None, "status": "error", "error": "boom"},
    ]
    assert pick_best(rows, spec)["trial_id"] == "c"
    with pytest.raises(RuntimeError, match="every trial failed: d: boom"):
        pick_best(rows[3:], spec)


def test_asha_stops_weak_trials_early_but_never_at_their_last_epoch():
    """Tune kills a stopped trial's actor at once: at the last epoch that would lose its artifacts."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from dda_ray.tune.search import FinalEpochASHA

    class Trial:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id

    def decisions(cls, epoch: int) -> list[str]:
        sched = cls(time_attr="epoch", metric="test_acc", mode="max", max_t=2, grace_period=1, reduction_factor=2, stop_last_trials=False)
        trials = [Trial(str(i)) for i in range(4)]
        for t in trials:
            sched.on_trial_add(None, t)
        return [sched.on_trial_result(None, t, {"epoch": epoch, "test_acc": acc}) for t, acc in zip(trials, [40.0, 30.0, 20.0, 10.0], strict=True)]

    assert decisions(FinalEpochASHA, 1) == decisions(ASHAScheduler, 1) == [TrialScheduler.CONTINUE] + [TrialScheduler.STOP] * 3
    assert TrialScheduler.STOP in decisions(ASHAScheduler, 2)
    assert decisions(FinalEpochASHA, 2) == [TrialScheduler.CONTINUE] * 4


def test_runs_of_trials_killed_by_asha_are_ended_with_what_they_left(tmp_path, mlflow_server):
    """A stopped trial's actor dies mid-run: the driver ends its MLflow run and uploads its run dir."""
    from mlflow import MlflowClient

    from dda_ray.tracking import Tracker
    from dda_ray.tune.results import close_unfinished_children

    cfg = load_config(None, ["teacher.checkpoint=null", f"run.output_dir={tmp_path}", "run.name=s", f"tracking.uri={mlflow_server.uri}", "tracking.experiment=asha_stopped"])
    parent = Tracker.start(cfg, "tune")
    done = Tracker.start(cfg, "tune_trial", parent_run_id=parent.run_id, run_name="s-aaa")
    done.finish()
    stopped = Tracker.start(cfg, "tune_trial", parent_run_id=parent.run_id, run_name="s-bbb")
    run_dir = tmp_path / "s-bbb"
    (run_dir / "grids").mkdir(parents=True)
    (run_dir / "grids" / "filter-1.png").write_bytes(b"\x89PNG")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 12.5}) + "\n")
    rows = [{"run_name": "s-aaa", "status": "completed"}, {"run_name": "s-bbb", "status": "stopped"}]
    close_unfinished_children(parent, rows, cfg)

    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(done.run_id).info.status == "FINISHED"
    run = client.get_run(stopped.run_id)
    assert run.info.status == "KILLED" and run.data.tags["tune.status"] == "stopped"
    assert {f.path for f in client.list_artifacts(stopped.run_id)} >= {"config.yaml", "metrics.jsonl", "accuracy.png", "grids"}


# --------------------------------------------------- a search on local Ray
@pytest.fixture(scope="module")
def tune_cluster(tmp_path_factory):
    """Local Ray with the dashboard on 127.0.0.1 (ASHA-stopped trials release their resources) and no auth token."""
    import ray

    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists()
    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "disabled")
    start_test_ray(tmp_path_factory, num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(), log_to_driver=True)
    yield
    ray.shutdown()
    env.undo()
    assert had_token or not token.exists(), "the test left a Ray auth token in the home directory"


def tune_config(tmp_path, assets, cifar, server_uri, **overrides):
    """The tiny Ray run (_helpers.tiny_run_args) as a search: one Train worker per trial, tracked on ``server_uri``."""
    args = tiny_run_args(
        tmp_path / "out",
        assets,
        cifar,
        {
            "run.name": "search",
            "run.mode": "dda",
            "run.stream_log": False,
            "distill.epochs": 2,
            "distill.steps_per_epoch": 2,
            "distill.lr": 0.1,
            "augment.num_variations": 2,
            "augment.steps": 6,
            "augment.batch_size": 8,
            "resources.num_workers": 1,
            "resources.cpus_per_worker": 0.2,
            "resources.augment_cpus": 0.2,
            "resources.filter_cpus": 0.2,
            "tracking.enabled": True,
            "tracking.uri": server_uri,
            "tracking.experiment": "tune_smoke",
            **overrides,
        },
    )
    cfg = load_config(None, args)
    # grace_period >= epochs: ASHA may stop nobody, so every child has the full test_acc history.
    tune = {"num_samples": 2, "searcher": "optuna", "scheduler": "asha", "grace_period": 2, "trial_cpus": 0.1, "seed": 0, "space": SPACE}
    return config_from_dict({**cfg.to_dict(), "tune": tune}).validate()


def test_two_trial_search_tracks_a_parent_and_a_child_per_trial(mlflow_server_started, tmp_path, tiny_assets, cifar10_decoded, tune_cluster):
    """Two trials at once (0.9 CPU each on 2 CPUs), 2 epochs each; grace_period 2: ASHA stops nobody."""
    from mlflow import MlflowClient

    from dda_ray.runtime import read_jsonl
    from dda_ray.tune.search import tune_search

    server = mlflow_server_started
    server.wait()
    cfg = tune_config(tmp_path, tiny_assets, cifar10_decoded, server.uri)
    summary = tune_search(cfg)
    assert summary["max_concurrent_trials"] == 2

    out = Path(cfg.run.output_dir)
    search_dir = out / "search"
    trials = json.loads((search_dir / "trials.json").read_text())
    assert len(trials) == 2 and all(t["status"] == "completed" and t["epochs"] == 2 for t in trials)

    # Shared work: one initial bank (made by the driver), one augmentation cache root for both trials.
    assert len(list((search_dir / "bank").glob("round-*.parquet"))) == 2
    for t in trials:
        run_cfg = load_config(out / t["run_name"] / "config.yaml")
        assert run_cfg.synthesis.bank_dir == str(search_dir / "bank")
        assert not (out / t["run_name"] / "bank").exists()
        assert [m["epoch"] for m in read_jsonl(out / t["run_name"] / "metrics.jsonl")] == [1, 2]
    assert len(list((out / "cache" / "augment").iterdir())) == 2  # one key per (strength, guidance)

    # MLflow: one parent, two children; params, per-epoch history, artifacts.
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("tune_smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["job"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.params["tune.space.augment.strength"] == "uniform[0.2, 0.6]"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    by_name = {t["run_name"]: t for t in trials}
    for child in children:
        trial = by_name[child.data.tags["mlflow.runName"]]
        assert child.info.status == "FINISHED" and child.data.tags["job"] == "tune_trial"
        for key in TUNED:
            assert float(child.data.params[key]) == pytest.approx(trial[key])
        history = client.get_metric_history(child.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == [1, 2]  # one point per epoch the trial ran
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(trial["history"])
        top = {f.path for f in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "metrics.jsonl", "accuracy.png", "grids"} <= top
        assert any(f.path.endswith(".png") for f in client.list_artifacts(child.info.run_id, "grids"))
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "trials.json", "config.yaml"} <= parent_files

    # best.yaml: printed, written, and ready for jobs/distill.py.
    best = load_config(search_dir / "best.yaml")
    assert summary["best_yaml"] == str(search_dir / "best.yaml")
    for key in TUNED:
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == pytest.approx(summary[key])
    assert best.run.name == "search-best" and best.tune == TuneConfig()
    assert best.synthesis.bank_dir == str(search_dir / "bank")  # reuses the shared bank
    assert summary["test_acc"] == max(t["test_acc"] for t in trials)


def test_a_trial_trains_in_its_own_process_as_it_would_in_a_torch_trainer(tmp_path, tiny_assets, cifar10_decoded, tune_cluster):
    """tune.train_in=trial (the default for one worker) starts no Ray Train controller or worker, and trains
    exactly as a TorchTrainer trial does: the same rows in the same order, the same per-epoch metrics."""
    from dda_ray.runtime import read_jsonl
    from dda_ray.tune.search import tune_search

    point = {"augment.strength": {"choice": [0.4]}, "augment.guidance": {"choice": [3.0]}, "filter.threshold": {"choice": [0.5]}}
    runs = {}
    for where in ("trial", "ray_train"):
        # lr 0.001: a run that stays finite (at the suite's 0.1 this tiny run diverged, test_loss ~1e6 by epoch 2,
        # where float noise under load decided an equality)
        cfg = tune_config(tmp_path / where, tiny_assets, cifar10_decoded, None, **{"tracking.enabled": False, "distill.lr": 0.001})
        cfg.tune.train_in, cfg.tune.num_samples, cfg.tune.searcher, cfg.tune.scheduler = where, 1, "random", "fifo"
        cfg.tune.space = config_from_dict({"teacher": {"checkpoint": None}, "tune": {"space": point}}).tune.space
        summary = tune_search(cfg.validate())
        run_dir = Path(cfg.run.output_dir) / summary["run_name"]
        (trial,) = json.loads((Path(cfg.run.output_dir) / cfg.run.name / "trials.json").read_text())
        assert trial["status"] == "completed" and len(trial["history"]) == 2  # every epoch reached Tune
        events = {e["event"] for e in read_jsonl(run_dir / "timeline.jsonl")}
        runs[where] = (read_jsonl(run_dir / "metrics.jsonl"), events, run_dir)
    (in_trial, trial_events, trial_dir), (trainer, trainer_events, _) = runs["trial"], runs["ray_train"]
    assert "worker_start" in trainer_events and "worker_start" not in trial_events
    assert not (trial_dir / "ray").exists()  # no Ray Train run storage: nothing of Train was started
    assert {"teacher_loaded", "source_ready", "epoch_reported", "trial_end"} <= trial_events
    # what trained is identical; the stages' totals also count the rows the stream ran ahead of the loop (timing)
    # (the rows and steps exactly; what they trained to, to float noise: the two paths run in different processes)
    trained = ("epoch", "steps", "rows", "lr", "next_round")
    assert [{k: m.get(k) for k in trained} for m in in_trial] == [{k: m.get(k) for k in trained} for m in trainer]
    learned = ("test_acc", "test_loss", "loss_loss", "loss_kd", "loss_ce", "loss_fea", "loss_rot")
    for a, b in zip(in_trial, trainer, strict=True):
        got, want = ({k: m[k] for k in learned if m.get(k) is not None} for m in (a, b))
        assert got.keys() == want.keys() and all(math.isfinite(v) for v in got.values()), (a, b)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (a, b)
