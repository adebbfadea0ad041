"""MLflow tracking: a real ``mlflow server`` on 127.0.0.1, unreachable servers, URI selection, secrets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dda_ray.config import load_config
from dda_ray.tracking import Tracker, TrackingError, params_of, redact, tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with a sqlite backend and proxied artifacts, stopped through its own Popen."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")  # noqa: SIM115 - closed in stop()
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [
                str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
            ],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=root,
        )  # fmt: skip

    def wait(self, timeout: float = 420.0) -> None:
        # usually well under a minute; seen taking over 3 minutes (imports, DB migrations) while the 2 cores ran other test sessions
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"mlflow server did not answer /health within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


_SHARED: dict = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def mlflow_server_started(tmp_path_factory):
    """The server process, started but maybe not answering yet (it takes ~30 s on a busy machine:
    request this fixture first and ``wait()`` late, so the start overlaps other setup).

    Other test modules import this fixture, and pytest then runs it once per importing module:
    they all share one server (a second one costs another start and its DB migrations), which the
    last user stops through its own process handle."""
    if _SHARED["server"] is None:
        _SHARED["server"] = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    _SHARED["users"] += 1
    try:
        yield _SHARED["server"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["server"].stop()
            _SHARED["server"] = None


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_started):
    mlflow_server_started.wait()
    return mlflow_server_started


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
