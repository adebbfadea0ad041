"""The cluster flow for real, on this machine: ``ray start --head`` + ``ray job submit --working-dir``.

What it pins down (DESIGN.md's pitfalls): the job runs the project's venv python (venv bin
first on PATH for ``ray start``), auth is set the same way for head and submit and leaves no
token file in the home directory, the uploaded working dir excludes the venv and outputs,
``jobs/distill.py`` attaches to the cluster through ``RAY_ADDRESS`` and streams Ray Data into
training, and the head is stopped through its own process group (never a bare ``ray stop``,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from dda_ray.checkpoint import load_classifier, save_classifier

from ._tiny_pipelines import build_tiny_prior
from .test_synthesis import teacher_with_stats

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
EXCLUDES = [".venv", "outputs", ".git", ".logs", "mlruns", ".pytest_cache", ".ruff_cache", "**/__pycache__"]
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    """Environment for both ``ray start`` and ``ray job submit``: venv first, auth off, no usage stats."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # the same for head and client: no token, so none is written to ~/.ray
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address explicitly
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=ray_env(), capture_output=True, text=True, timeout=timeout)


def http_json(url: str, timeout: float = 5) -> dict | list | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except (OSError, ValueError):
        return None


def home_ray_files() -> set[str]:
    d = Path.home() / ".ray"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (our unique temp dir: only processes of this head)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


class RayHead:
    def __init__(self, proc: subprocess.Popen, temp_dir: Path, dashboard_port: int, log: Path):
        self.proc, self.temp_dir, self.log = proc, temp_dir, log
        self.address = f"http://127.0.0.1:{dashboard_port}"

    def stop(self) -> None:
        """Stop this head only: its process group (``ray start --block`` and the daemons it spawned),
        then any straggler whose command line names this head's private temp dir."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            break
        deadline = time.time() + 15
        while (left := processes_mentioning(str(self.temp_dir))) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGTERM if time.time() < deadline - 5 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head():
    home_before = home_ray_files()
    # Short path: Ray's unix sockets live under the temp dir and must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ddajob-", dir="/tmp"))
    dashboard_port = free_port()
    log = temp_dir / "ray-start.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--num-cpus=2", "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "w") as out:
        # A new session: its process group is this head's handle for stopping it.
        proc = subprocess.Popen(cmd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
    head = RayHead(proc, temp_dir, dashboard_port, log)
    t0 = time.time()
    try:
        deadline = t0 + 120
        while http_json(f"{head.address}/api/version") is None or http_json(f"{head.address}/api/jobs/") is None:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the dashboard at {head.address} did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        print(f"ray head up in {time.time() - t0:.0f}s")
        yield head
    finally:
        head.stop()
        left = processes_mentioning(str(temp_dir))
        start_log = log.read_text() if log.exists() else ""
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test head survived: {left}"
    assert "Generated new authentication token" not in start_log
    assert home_ray_files() == home_before, "the test cluster left files in ~/.ray"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("job_assets")
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    build_tiny_prior(root / "prior", num_classes=10, image_size=32)
    return root


def tiny_overrides(out_dir: Path, assets: Path, cifar) -> list[str]:
    """The CPU smoke preset cut to seconds: tiny teacher/prior, two small rounds, two short epochs."""
    values = {
        "run.output_dir": out_dir,
        "run.name": "job",
        "run.engine": "ray",
        "run.stream_log": True,
        "data.path": cifar.path,
        "data.cache_dir": cifar.cache_dir,
        "data.eval_subset": 100,
        "teacher.arch": "wrn16_1",
        "teacher.checkpoint": assets / "teacher",
        "synthesis.nz": 32,
        "synthesis.ngf": 16,
        "synthesis.init_rounds": 2,
        "synthesis.init_batch_size": 16,
        "synthesis.init_g_steps": 2,
        "synthesis.batch_size": 16,
        "synthesis.g_steps": 2,
        "distill.epochs": 2,
        "distill.steps_per_epoch": "null",
        "distill.batch_size": 16,
        "augment.model": assets / "prior",
        "augment.num_variations": 1,
        "augment.steps": 4,
        "augment.strength": 0.5,
        "augment.batch_size": 8,
        "filter.threshold": 0.5,
        "resources.num_workers": 0,
        "resources.torch_threads": 1,
        "tracking.enabled": "false",
    }
    return [f"{k}={v}" for k, v in values.items()]


def test_ray_job_submit_runs_the_distillation_job(ray_head, assets, cifar10_decoded, tmp_path):
    out_dir = tmp_path / "out"
    job_id = f"dda-test-{uuid.uuid4().hex[:8]}"
    submit = [
        "job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "python", "jobs/distill.py", "--config", "configs/cifar10_cpu_smoke.yaml",
        *tiny_overrides(out_dir, assets, cifar10_decoded),
    ]  # fmt: skip
    t0 = time.time()
    r = ray_cli(*submit, timeout=120)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
    status = None
    try:
        while time.time() - t0 < JOB_TIMEOUT_S:
            info = http_json(f"{ray_head.address}/api/jobs/{job_id}")
            status = info and info.get("status")
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
    finally:
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            ray_cli("job", "stop", "--address", ray_head.address, job_id, timeout=60)
    logs = ray_cli("job", "logs", "--address", ray_head.address, job_id, timeout=60).stdout
    if os.environ.get("DDA_JOB_LOG"):
        Path(os.environ["DDA_JOB_LOG"]).write_text(logs)
    assert status == "SUCCEEDED", f"job {job_id} ended {status} after {time.time() - t0:.0f}s:\n{logs[-6000:]}"
    assert re.search(rf"Job '{job_id}' succeeded", ray_cli("job", "status", "--address", ray_head.address, job_id).stdout)

    # The driver attached to this head (RAY_ADDRESS from the job), not an embedded Ray of its own.
    assert "Started a local Ray instance" not in logs
    # Per-epoch lines from rank 0 and Ray Data's progress through the augment/filter pools.
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2: test_acc \d", logs), f"no epoch {epoch} line in the job logs:\n{logs[-4000:]}"
    assert "Execution plan of Dataset" in logs and "MapBatches(AugmentStage)" in logs and "MapBatches(FilterStage)" in logs
    assert re.search(r"Running Dataset|Total Progress", logs), "no Ray Data progress in the job logs"
    assert "Generated new authentication token" not in logs

    run_dir = out_dir / "job"
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["epoch"] == 2 and 0 <= final["test_acc"] <= 100
    load_classifier(run_dir / "student", "wrn16_1", 10)
    # The upload left the venv and outputs behind (the job's own outputs went to run.output_dir).
    pkgs = list((ray_head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*"))
    assert pkgs, "no unpacked working dir found under the head's temp dir"
    for pkg in pkgs:
        assert (pkg / "jobs" / "distill.py").exists()
        for name in (".venv", "outputs", ".git", ".logs", "mlruns"):
            assert not (pkg / name).exists(), f"{name} was uploaded with the working dir"
    print(f"job {job_id} succeeded in {time.time() - t0:.0f}s")
