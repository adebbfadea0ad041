"""MLflow tracking: a real ``mlflow server`` on 127.0.0.1, unreachable servers, URI selection, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dda_ray.config import load_config
from dda_ray.tracking import Tracker, TrackingError, params_of, redact, tracking_uri

from ._helpers import free_port, tiny_config, write_bank


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: the socket was closed again


def cfg_with(tmp_path, **overrides):
    base = {"run.output_dir": str(tmp_path), "run.name": "track", "teacher.checkpoint": "null"}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


# --------------------------------------------------------------- unit-level
def test_uri_credentials_are_redacted_in_params(tmp_path):
    assert redact("http://user:s3cret@mlflow.example:5000/x") == "http://user:***@mlflow.example:5000/x"
    assert redact("http://mlflow.example:5000") == "http://mlflow.example:5000"
    cfg = cfg_with(tmp_path, **{"tracking.uri": "http://alice:hunter2@mlflow.example:5000"})
    params = params_of(cfg)
    assert params["tracking.uri"] == "http://alice:***@mlflow.example:5000"
    assert not any("hunter2" in v for v in params.values())
    assert params["augment.strength"] == str(cfg.augment.strength)  # the flattened config


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg_with(tmp_path)) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # embedded default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(cfg_with(tmp_path)) == "http://127.0.0.1:5999"  # honoured
    assert tracking_uri(cfg_with(tmp_path, **{"tracking.uri": "http://127.0.0.1:6001"})) == "http://127.0.0.1:6001"  # config wins


def test_fluent_tracking_uri_restores_the_effective_uri_and_the_variable(monkeypatch):
    """The fluent API is pointed at a run's store for a moment; what was in effect before comes back."""
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    from dda_ray.tracking import fluent_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    with fluent_tracking_uri("sqlite:///inside.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///inside.db"
    assert not is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with fluent_tracking_uri("sqlite:///inside.db"):
        pass
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    mlflow.set_tracking_uri("http://127.0.0.1:6001")  # a global URI that differs from the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:6002")
    try:
        with fluent_tracking_uri("sqlite:///inside.db"):
            pass
        assert (mlflow.get_tracking_uri(), os.environ["MLFLOW_TRACKING_URI"]) == ("http://127.0.0.1:6001", "http://127.0.0.1:6002")
    finally:
        mlflow.set_tracking_uri(None)


def test_the_embedded_store_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the job was started from (MLflow's default)."""
    from mlflow import MlflowClient

    from dda_ray.tracking import artifact_location

    assert artifact_location("http://127.0.0.1:5000") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(tmp_path / "out")
    tracker = Tracker.start(cfg, "distill")
    (tmp_path / "note.txt").write_text("x")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()
    exp = MlflowClient(tracker.uri).get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == (tmp_path / "out" / "mlartifacts").resolve().as_uri()
    assert len(list((tmp_path / "out" / "mlartifacts").rglob("note.txt"))) == 1
    assert not (tmp_path / "mlruns").exists()


def test_a_resumed_run_directory_continues_its_mlflow_run(tmp_path, monkeypatch):
    """An interrupted job resumed with ``run.resume=true`` (and a retried Tune trial, which resumes)
    logs into the MLflow run its first attempt created: one run with every epoch, ``attempts``
    counted, changed params named in a tag; a new run when there is nothing to continue."""
    from mlflow import MlflowClient

    from dda_ray.runtime import prepare_run_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = cfg_with(tmp_path, **{"distill.epochs": 2})
    prepare_run_dir(first)
    tracker = Tracker.start(first, "distill")
    tracker.log_metrics({"test_acc": 10.0}, step=1)
    tracker.finish("FAILED")  # interrupted after epoch 1

    resumed = cfg_with(tmp_path, **{"distill.epochs": 3, "run.resume": "true"})
    prepare_run_dir(resumed)
    again = Tracker.start(resumed, "distill")
    assert again.run_id == tracker.run_id
    client = MlflowClient(again.uri)
    run = client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempts"] == "2"
    assert run.data.params["distill.epochs"] == "2"  # MLflow keeps a param's first value ...
    assert "distill.epochs=3" in run.data.tags["resume.changed_params"].split()  # ... the new one is named
    again.log_metrics({"test_acc": 20.0}, step=2)
    again.finish()
    assert [(m.step, m.value) for m in client.get_metric_history(again.run_id, "test_acc")] == [(1, 10.0), (2, 20.0)]
    assert client.get_run(again.run_id).info.status == "FINISHED"

    # Nothing to continue: another job in this directory, or the run deleted in MLflow -> a new run.
    assert Tracker.start(resumed, "train_teacher").run_id != tracker.run_id
    prior = Tracker.start(resumed, "train_prior")  # a job that does not resume its work: never reopened
    assert Tracker.start(resumed, "train_prior").run_id != prior.run_id
    fresh = Tracker.start(resumed, "distill")
    assert fresh.run_id != tracker.run_id
    client.delete_run(fresh.run_id)
    assert Tracker.start(resumed, "distill").run_id != fresh.run_id
    # Without run.resume (a new run directory): always a new run.
    other = cfg_with(tmp_path, **{"run.name": "other"})
    prepare_run_dir(other)
    assert Tracker.start(other, "distill").run_id not in (tracker.run_id, fresh.run_id)


def test_unreachable_server_fails_before_anything_runs(tmp_path):
    cfg = cfg_with(tmp_path, **{"tracking.uri": closed_port_uri()})
    with pytest.raises(TrackingError, match="unreachable.*on_unreachable=warn"):
        Tracker.start(cfg, "distill")


def test_unreachable_server_with_warn_continues_untracked(tmp_path, capsys):
    cfg = cfg_with(tmp_path, **{"tracking.uri": closed_port_uri(), "tracking.on_unreachable": "warn"})
    with pytest.warns(UserWarning, match="TRACKING DISABLED"):
        tracker = Tracker.start(cfg, "distill")
    assert not tracker.enabled
    tracker.log_metrics({"test_acc": 1.0}, step=1)  # a disabled tracker accepts every call
    tracker.finish()
    assert "WARNING: TRACKING DISABLED" in capsys.readouterr().out


@pytest.mark.parametrize("job", ["jobs/distill.py", "jobs/tune.py"])
def test_jobs_exit_2_with_a_clear_message_when_the_server_is_unreachable(tmp_path, job):
    """The real entry points: one ``error:`` line, status 2, no training started."""
    repo = Path(__file__).resolve().parents[1]
    config = "configs/cifar10_cpu_tune.yaml" if job.endswith("tune.py") else "configs/cifar10_cpu_smoke.yaml"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [sys.executable, job, "--config", config, f"run.output_dir={tmp_path}", f"tracking.uri={closed_port_uri()}"],
        cwd=repo, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: MLflow tracking server http://127.0.0.1:" in out.stderr and "unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    run_dir = tmp_path / ("cifar10_cpu_tune" if job.endswith("tune.py") else "cifar10_cpu_smoke")
    assert not (run_dir / "bank").exists() and not (run_dir / "metrics.jsonl").exists()


# ------------------------------------------------------------- real server
def test_tracker_logs_params_metrics_and_artifacts_to_a_real_server(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    cfg = cfg_with(tmp_path, **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "tracking_test"})
    parent = Tracker.start(cfg, "tune")
    child = Tracker.start(cfg, "tune_trial", parent_run_id=parent.run_id, run_name="track-trial")
    for epoch, acc in enumerate([10.0, 20.0, 30.0], start=1):
        child.log_metrics({"test_acc": acc, "note": "not a number"}, step=epoch)
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "g.png").write_bytes(b"\x89PNG")
    child.log_artifact(tmp_path / "grids", "grids")
    child.finish()
    parent.finish()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["job"] == "tune_trial" and run.info.status == "FINISHED"
    assert run.data.params["augment.strength"] == str(cfg.augment.strength)
    assert [(m.step, m.value) for m in client.get_metric_history(child.run_id, "test_acc")] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert [f.path for f in client.list_artifacts(child.run_id, "grids")] == ["grids/g.png"]


# ------------------------------------------------------- models and jobs, real server
def _runs(server, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp is not None else [])


def _normalized_logits(checkpoint: Path, images):
    """What a user would compute from the checkpoint on disk: its classifier on the normalised images."""
    import torch

    from dda_ray.models.checkpoint import load_classifier, read_meta

    meta = read_meta(checkpoint)
    model, _ = load_classifier(checkpoint, meta["arch"], meta["num_classes"])
    mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((images - mean) / std)


def test_distill_logs_the_student_as_a_loadable_registered_mlflow_model(
    mlflow_server_started, tmp_path, tiny_teacher, cifar10_decoded
):
    """A tiny local-engine distillation: ``runs:/<id>/model`` takes [0, 1] images (any batch size) and
    gives the saved student's logits; ``tracking.register_as`` makes version 1 of the registered model."""
    import mlflow.pytorch
    import torch

    from dda_ray.api import distill
    from dda_ray.data.transforms import to_float
    from dda_ray.tracking import fluent_tracking_uri, register_run_model


    server = mlflow_server_started
    tracking = {"tracking.enabled": True, "tracking.uri": server.uri, "tracking.experiment": "student_model"}
    tracking["tracking.register_as"] = "tiny_student"
    cfg = tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{**tracking, "distill.epochs": 1})
    server.wait()
    final = distill(cfg)

    client, runs = _runs(server, "student_model")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    images = to_float(cifar10_decoded.ds.test.images[:7])  # 7: not the example's batch of 4
    expected = _normalized_logits(cfg.run_dir / "student", images)
    with fluent_tracking_uri(server.uri):
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
        registered = mlflow.pytorch.load_model("models:/tiny_student/1")
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)
        assert torch.allclose(registered(images), expected, atol=1e-5)
    spec = info.signature.inputs.inputs[0]
    assert spec.shape == (-1, 3, 32, 32) and str(spec.type) == "float32"
    assert info.metadata["arch"] == "wrn16_1" and "[0, 1]" in info.metadata["input"]
    assert info.metadata["accuracy"] == final["test_acc"]

    versions = client.search_model_versions("name='tiny_student'")
    assert [v.version for v in versions] == ["1"]
    assert register_run_model(server.uri, run_id, "tiny_student") == 2  # what a tune search does for its best trial


def test_train_teacher_logs_the_teacher_as_an_mlflow_model(mlflow_server_started, tmp_path, cifar10_decoded):
    import mlflow.pytorch
    import torch

    from dda_ray.api import train_teacher
    from dda_ray.data.transforms import to_float
    from dda_ray.runtime import prepare_run_dir
    from dda_ray.tracking import fluent_tracking_uri

    server = mlflow_server_started
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=teacher",
        f"data.path={cifar10_decoded.path}", f"data.cache_dir={cifar10_decoded.cache_dir}", "data.train_subset=64",
        "data.eval_subset=64", "teacher.arch=wrn16_1", "teacher.checkpoint=null",
        "teacher_training.epochs=1", "teacher_training.batch_size=32", "resources.torch_threads=1",
        f"tracking.uri={server.uri}", "tracking.experiment=teacher_model", "tracking.register_as=tiny_teacher",
    ])  # fmt: skip
    prepare_run_dir(cfg)
    server.wait()
    train_teacher(cfg)

    client, runs = _runs(server, "teacher_model")
    assert len(runs) == 1 and runs[0].data.tags["job"] == "train_teacher"
    images = to_float(cifar10_decoded.ds.test.images[:5])
    with fluent_tracking_uri(server.uri):
        model = mlflow.pytorch.load_model(f"runs:/{runs[0].info.run_id}/model")
    with torch.no_grad():
        assert torch.allclose(model(images), _normalized_logits(cfg.run_dir / "teacher", images), atol=1e-5)
    assert [v.version for v in client.search_model_versions("name='tiny_teacher'")] == ["1"]


def test_train_prior_job_logs_params_the_loss_curve_and_the_prior(mlflow_server_started, tmp_path):
    from dda_ray.jobs.entrypoints import train_prior_job
    from dda_ray.runtime import prepare_run_dir


    server = mlflow_server_started
    bank = write_bank(tmp_path / "bank")
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=prior", "data.num_classes=4", "augment.device=cpu",
        "augment.prior_channels=[8, 16]", "augment.prior_steps=4", "augment.prior_batch_size=8", "augment.prior_log_every=2",
        f"augment.prior_bank={bank}", f"augment.model={tmp_path / 'prior_out'}", "resources.torch_threads=1",
        f"tracking.uri={server.uri}", "tracking.experiment=prior_job",
    ])  # fmt: skip
    prepare_run_dir(cfg)
    server.wait()
    train_prior_job(cfg)

    client, runs = _runs(server, "prior_job")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "train_prior"
    assert run.data.params["augment.prior_steps"] == "4" and run.data.params["augment.prior_source"] == "bank"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert {"lr", "img_per_s"} <= set(run.data.metrics)
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "prior_loss.jsonl", "prior"} <= top
    prior = {f.path for f in client.list_artifacts(run.info.run_id, "prior")}
    assert {"prior/model_index.json", "prior/loss.jsonl", "prior/training.json", "prior/unet"} <= prior


def test_a_model_that_cannot_be_logged_is_a_loud_warning_not_a_failed_run(mlflow_server, tmp_path, monkeypatch, capsys):
    """Training is over when the model is logged: an export or upload error must not fail the job."""
    import mlflow.pytorch

    from dda_ray.models import build_model
    from dda_ray.models.checkpoint import save_classifier

    save_classifier(build_model("wrn16_1", 10), tmp_path / "student", arch="wrn16_1", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)

    def broken(*args, **kwargs):
        raise RuntimeError("export failed\nsecond line")

    monkeypatch.setattr(mlflow.pytorch, "log_model", broken)
    tracker = Tracker.start(cfg_with(tmp_path, **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "model_failure"}), "distill")
    with pytest.warns(UserWarning, match="was not logged"):
        assert tracker.log_model(tmp_path / "student", 32, register_as="never_registered") is None
    tracker.finish()
    assert "WARNING: the MLflow Model of" in capsys.readouterr().out
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and "RuntimeError: export failed" in run.data.tags["model_logging_error"]
