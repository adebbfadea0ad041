"""MLflow tracking for every job: params, per-epoch metrics, artifacts, tags.

Where runs go: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else an embedded sqlite store
``<run.output_dir>/mlflow.db`` (browse it with ``mlflow ui --backend-store-uri
sqlite:///$PWD/outputs/mlflow.db``); a sqlite store's new experiments keep their artifacts in
``mlartifacts/`` beside the database. On a cluster use an MLflow server (``http://...``): every
node must reach it.

The driver creates the run (params, tags) and passes its id on; only rank 0 of the trainer
logs metrics, through an ``MlflowClient`` bound to the run id (no global MLflow state, so it
works from any Ray worker). An unreachable server stops the job before any work with a clear
message, unless ``tracking.on_unreachable = warn`` (then a loud warning and no tracking).
Credentials embedded in URIs are never logged as params.

A job's classifier (the distilled student; the teacher of ``train_teacher``) is logged as an
MLflow Model named ``model`` (:meth:`Tracker.log_model`): ``mlflow.pytorch.load_model("runs:/<run_id>/model")``
returns a module that takes float32 NCHW RGB images in [0, 1] (normalisation inside) and returns
logits. It is saved in MLflow's ``pt2`` format (``torch.export``): loading runs no pickled code and
needs only torch, not dda_ray. ``tracking.register_as`` also registers it in the model registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import Config, ConfigError
from .runtime import read_jsonl


class TrackingError(ConfigError):
    """The tracking server cannot be reached (and tracking.on_unreachable = fail)."""


_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_key|access_key)", re.I)
_URI_CREDENTIALS = re.compile(r"(://)([^/@:]+):([^/@]+)@")


def redact(value: object) -> object:
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub(r"\1\2:***@", value)
    return value


def tracking_uri(cfg: Config) -> str:
    import os

    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(cfg.run.output_dir).expanduser().resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlartifacts/`` beside the
    database file. MLflow's own default is ``./mlruns`` in the current directory, so an embedded-store
    run started from the repository left its checkpoints and models there, away from its mlflow.db.
    None (the server's or store's choice) for every other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError if an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310 - user-given URI
            if resp.status >= 400:
                raise TrackingError(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({e}); start it, fix tracking.uri / MLFLOW_TRACKING_URI, "
            "or set tracking.on_unreachable=warn to run without tracking"
        ) from e


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def params_of(cfg: Config) -> dict[str, str]:
    """The flattened resolved config as MLflow params (secrets dropped, URI credentials redacted)."""
    out = {}
    for k, v in cfg.flat().items():
        if _SECRET_KEY.search(k):
            continue
        out[k] = str(redact(v))[:6000]
    return out


MODEL_NAME = "model"  # the artifact path of a job's MLflow Model: runs:/<run_id>/model
MODEL_METADATA = ("arch", "num_classes", "mean", "std", "accuracy", "mode", "dataset", "classes")  # copied from meta.json


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model``, ``mlflow.register_model``) at ``uri``
    for a moment, then restore exactly what was set before (the global URI and MLFLOW_TRACKING_URI,
    which ``mlflow.set_tracking_uri`` also writes): the Tracker itself keeps no global state."""
    import os

    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    # set_tracking_uri writes MLFLOW_TRACKING_URI too, so a URI equal to the variable's is restored by
    # the variable alone (unset global, same effective URI); one that differs is set again.
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None if saved == saved_env else saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def register_run_model(uri: str, run_id: str, name: str) -> int:
    """Register the MLflow Model of run ``run_id`` (``runs:/<run_id>/model``) as a new version of ``name``; returns the version."""
    import mlflow

    with fluent_tracking_uri(uri):
        return int(mlflow.register_model(f"runs:/{run_id}/{MODEL_NAME}", name).version)


_STARTED: list[tuple[str, str, str]] = []  # (uri, experiment id, run id) of every run Tracker.start created here


def started_runs() -> list[tuple[str, str, str]]:
    """``(uri, experiment id, run id)`` of the runs :meth:`Tracker.start` created in this process, oldest first
    (the job summary names the first one a job started: its own run, not a search's trials)."""
    return list(_STARTED)


def run_location(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a user finds a run: its page on an MLflow server, or the ``mlflow ui`` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}   (then open run {run_id})"
    return f"run {run_id} in {redact(uri)}"


RUN_FILE = "mlflow_run.json"  # in the run directory: the MLflow run (uri, run_id, job) a resume continues
RESUMING_JOBS = ("distill", "tune_trial", "train_teacher")  # the jobs whose run.resume continues the work itself


def _earlier_run(cfg: Config, client, uri: str, job: str):
    """With ``run.resume``, the MLflow run this run directory's earlier attempt created (same store, same
    job, not deleted), so that an interrupted job or a retried Tune trial continues one run with every
    epoch's metrics instead of opening another; else None."""
    if not cfg.run.resume or job not in RESUMING_JOBS:
        return None
    try:
        rec = json.loads((cfg.run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("uri") != uri or rec.get("job") != job or not rec.get("run_id"):
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(str(rec["run_id"]))
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


class Tracker:
    """One MLflow run; a disabled tracker (``Tracker.disabled()``) accepts every call and does nothing."""

    def __init__(self, uri: str | None, run_id: str | None, client=None):
        """``client``: an ``MlflowClient`` for ``uri`` to share (None: one made on first use)."""
        self.uri, self.run_id = uri, run_id
        self._client = client

    @classmethod
    def disabled(cls) -> Tracker:
        return cls(None, None)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    @classmethod
    def start(cls, cfg: Config, job: str, parent_run_id: str | None = None, run_name: str | None = None, extra_tags: dict | None = None) -> Tracker:
        """Create a run for ``job`` (after checking the server), log params and tags."""
        if not cfg.tracking.enabled:
            return cls.disabled()
        uri = tracking_uri(cfg)
        try:
            check_reachable(uri)
        except TrackingError as e:
            if cfg.tracking.on_unreachable == "fail":
                raise
            warnings.warn(f"TRACKING DISABLED: {e}", stacklevel=2)
            print(f"WARNING: TRACKING DISABLED: {e}", flush=True)
            return cls.disabled()
        from mlflow import MlflowClient

        from .models.checkpoint import resolved_teacher_arch

        client = MlflowClient(uri)
        earlier = _earlier_run(cfg, client, uri, job)
        if earlier is not None:  # a resume: the run, its experiment and tags exist already
            return cls._reopen(cfg, client, uri, earlier)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(uri))
        else:
            exp_id = exp.experiment_id
        tags = {
            "job": job,
            "mode": cfg.run.mode,
            "dataset": cfg.data.dataset,
            "teacher": resolved_teacher_arch(cfg) or "unknown",
            "student": cfg.student.arch,
            "mlflow.runName": run_name or cfg.run.name,
            **({"git_commit": c} if (c := git_commit()) else {}),
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            **(extra_tags or {}),
        }
        run = client.create_run(exp_id, tags=tags, run_name=run_name or cfg.run.name)
        _STARTED.append((uri, str(exp_id), run.info.run_id))
        tracker = cls(uri, run.info.run_id, client=client)
        tracker.log_params(params_of(cfg))
        if cfg.run_dir.is_dir():  # what a resume of this run directory continues (_earlier_run)
            from .runtime import atomic_write

            atomic_write(cfg.run_dir / RUN_FILE, json.dumps({"uri": uri, "run_id": run.info.run_id, "job": job}) + "\n")
        return tracker

    @classmethod
    def _reopen(cls, cfg: Config, client, uri: str, run) -> Tracker:
        """Continue ``run`` (a resumed run directory's): status RUNNING again, ``attempts`` counted; params
        it lacks are logged, and those whose value changed (MLflow keeps a param's first value: ``run.resume``,
        a larger ``distill.epochs``) go to the tag ``resume.changed_params``."""
        run_id = run.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "attempts", str(int(run.data.tags.get("attempts", "1")) + 1))
        _STARTED.append((uri, str(run.info.experiment_id), run_id))
        tracker = cls(uri, run_id, client=client)
        params = params_of(cfg)
        tracker.log_params({k: v for k, v in params.items() if k not in run.data.params})
        changed = [f"{k}={v}" for k, v in params.items() if k in run.data.params and run.data.params[k] != v]
        if changed:
            client.set_tag(run_id, "resume.changed_params", " ".join(changed)[:5000])
        return tracker

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint: str | Path, image_size: int, register_as: str | None = None, step: int = 0) -> str | None:
        """Log the project checkpoint ``checkpoint`` as the MLflow Model ``model`` of this run; returns its URI.

        The model is a :class:`~dda_ray.models.checkpoint.NormalizedClassifier`: float32 NCHW RGB in [0, 1]
        -> logits, any batch size (signature and a 4-image input example of ``image_size``). Metrics
        logged at ``step`` (the final epoch) are linked to it. ``register_as`` creates a new version of
        that registered model. A failure to export or upload is a loud warning, not an error: the run's
        training is done and its checkpoint is still logged as plain files.
        """
        if not self.enabled or not Path(checkpoint).is_dir():
            return None
        try:
            return self._log_model(Path(checkpoint), image_size, register_as, step)
        except Exception as e:  # noqa: BLE001 - see the docstring
            message = f"the MLflow Model of {checkpoint} was not logged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            warnings.warn(message, stacklevel=2)
            print(f"WARNING: {message}", flush=True)
            self.set_tag("model_logging_error", message[:5000])
            return None

    def _log_model(self, checkpoint: Path, image_size: int, register_as: str | None, step: int) -> str:
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from .models.checkpoint import load_normalized_classifier

        model, meta = load_normalized_classifier(checkpoint)
        example = torch.rand(4, len(meta["mean"]), image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(example)
        example_np = example.numpy()
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        with fluent_tracking_uri(self.uri):
            # Created here so that it lands in the run's experiment: given only run_id, log_model puts the
            # model in the fluent API's current (default) experiment, where runs:/<run_id>/model is not looked up.
            logged = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=self.run_id, experiment_id=experiment_id)
            info = mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                model_id=logged.model_id,
                run_id=self.run_id,
                input_example=example_np,
                signature=infer_signature(example_np, logits.numpy()),
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # pt2 needs torch only (inferring runs a subprocess)
                registered_model_name=register_as,
                step=step,
                metadata={
                    "input": "float32 NCHW RGB images in [0, 1]; the normalisation (mean, std) is inside the model",
                    "output": "logits (N, num_classes)",
                    **{k: meta[k] for k in MODEL_METADATA if meta.get(k) is not None},
                },
            )
        return info.model_uri

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status)


def log_run_files(tracker, run_dir: Path) -> None:
    """The files every distillation run leaves (a search's trials included): its config, the
    per-epoch metrics, the accuracy curve drawn from them, and the image grids."""
    run_dir = Path(run_dir)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "metrics.jsonl")
    curve = accuracy_curve(run_dir / "metrics.jsonl", run_dir / "accuracy.png")
    if curve is not None:
        tracker.log_artifact(curve)
    tracker.log_artifact(run_dir / "grids", "grids")


def last_epoch(run_dir) -> int:
    """The last epoch ``<run_dir>/metrics.jsonl`` records (0 if none): the step a logged model's metrics are read at."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    return int(lines[-1].get("epoch", 0)) if lines else 0


def log_run_artifacts(tracker: Tracker, cfg: Config, register: bool = True, model: bool = True) -> None:
    """What every distillation run leaves in MLflow: config, metrics, curve, grids, the student's
    checkpoint files, and (``model``) the student as the MLflow Model ``model`` (registered as
    ``tracking.register_as`` when set and ``register``; a tune trial leaves that to the search)."""
    run_dir = cfg.run_dir
    log_run_files(tracker, run_dir)
    tracker.log_artifact(run_dir / "student", "student")
    if not model:
        return
    register_as = cfg.tracking.register_as if register else None
    tracker.log_model(run_dir / "student", cfg.data.image_size, register_as=register_as, step=last_epoch(run_dir))


def accuracy_curve(metrics_file: str | Path, out_png: str | Path, key: str = "test_acc") -> Path | None:
    """Plot ``key`` per epoch from a metrics.jsonl file."""
    import json

    lines = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()] if Path(metrics_file).exists() else []
    points = [(m["epoch"], m[key]) for m in lines if key in m and "epoch" in m]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{key} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
