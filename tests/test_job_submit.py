"""The cluster flow for real, on this machine: ``ray start --head`` + ``ray job submit --working-dir``.

What it pins down (DESIGN.md's pitfalls): the job runs the project's venv python (venv bin
first on PATH for ``ray start``), the head runs with cluster/gpu.yaml's token auth and dashboard
binding (a client without the token is refused; with it, accepted) and no token file is left in
the home directory, the uploaded working dir excludes the venv and outputs,
``jobs/distill.py`` attaches to the cluster through ``RAY_ADDRESS`` and streams Ray Data into
training, and the head is stopped through its own process group (never a bare ``ray stop``,
which would stop every Ray on the machine). ``DDA_KEEP_RAY_TEMP=1`` keeps the head's temp dir
(its logs) for debugging.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from dda_ray.models.checkpoint import load_classifier

from ._helpers import (
    EXCLUDES,
    REPO_ROOT,
    TOKEN_FILE,
    VENV_BIN,
    cluster_auth_env,
    cluster_head_command,
    free_port,
    http_json,
    processes_of,
    ray_cli,
    ray_env,
    tiny_run_args,
)

pytestmark = pytest.mark.slow

EPOCHS = 3
LOG_LINES_MAX = 80  # what `ray job logs` of a run that fails nowhere may hold (issue: 3,066 lines for 3 epochs)
JOB_TIMEOUT_S = 300  # about 60-110 s on 2 idle-ish cores; the slack is for a busy machine


def home_ray_files() -> set[str]:
    d = Path.home() / ".ray"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


class RayHead:
    def __init__(self, proc: subprocess.Popen, temp_dir: Path, dashboard_port: int, log: Path):
        self.proc, self.temp_dir, self.log = proc, temp_dir, log
        self.address = f"http://127.0.0.1:{dashboard_port}"

    def processes(self) -> list[int]:
        return processes_of(self.proc.pid, self.temp_dir)

    def stop(self) -> None:
        """Stop this head only, never a bare ``ray stop`` (it stops every Ray on the machine).

        SIGTERM to ``ray start --block`` makes it tear down the daemons it started (draining is
        off, see the fixture); whatever is left of its process group or temp dir is killed after.
        """
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while self.processes() and time.time() < deadline:
                time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def cluster_dashboard_host() -> str:
    """cluster/gpu.yaml's ``--dashboard-host`` for the head."""
    return re.search(r"--dashboard-host=(\S+)", cluster_head_command()).group(1)


def start_head(timeout_s: float = 150) -> tuple[RayHead | None, str]:
    """``ray start --head --block`` in a new session; returns (head, "") once the node and the job
    API are up, or (None, log tail) after stopping a head that failed to start."""
    # Short path: Ray's unix sockets live under the temp dir and must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ddajob-", dir="/tmp"))
    dashboard_port = free_port()
    log = temp_dir / "ray-start.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--num-cpus=2",
        f"--port={free_port()}",
        "--include-dashboard=true", f"--dashboard-host={cluster_dashboard_host()}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        # Every port chosen here: Ray's fixed defaults (6379, 8265, 10001, 52365) would collide
        # with any other Ray on this machine.
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    env = ray_env()
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops at once instead of draining for 30 s
    with open(log, "w") as out:
        # A new session: its process group is this head's handle for stopping it.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
    head = RayHead(proc, temp_dir, dashboard_port, log)
    deadline = time.time() + timeout_s
    raylet_crash = ""
    while proc.poll() is None and time.time() < deadline and not raylet_crash:
        if "Ray runtime started" in log.read_text() and http_json(f"{head.address}/api/jobs/") is not None:
            return head, ""
        # The raylet aborts when the dashboard agent takes over ~30 s to report its ports (slow
        # imports on a busy machine); `ray start` would only notice much later.
        for out in temp_dir.glob("session_*/logs/raylet.out"):
            raylet_crash = "\n".join(line for line in out.read_text(errors="replace").splitlines() if "Check failed" in line)
        time.sleep(1)
    tail = log.read_text()[-2000:] + "\n" + raylet_crash[-1500:]
    head.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return None, tail


@pytest.fixture(scope="module")
def ray_head():
    TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    # cluster/token.sh, with the token in the test's own file
    subprocess.run(["sh", str(REPO_ROOT / "cluster" / "token.sh")], env={**os.environ, "DDA_RAY_TOKEN": str(TOKEN_FILE)}, check=True, capture_output=True)
    assert TOKEN_FILE.stat().st_mode & 0o077 == 0, "the token file is readable by others"
    home_before = home_ray_files()
    t0 = time.time()
    failures = []
    head = None
    for _ in range(2):  # a second try starts with a warm page cache
        head, why = start_head()
        if head is not None:
            break
        failures.append(why)
    assert head is not None, "the test Ray head did not start:\n" + "\n---\n".join(failures)
    print(f"ray head up in {time.time() - t0:.0f}s ({len(failures)} failed start(s))")
    try:
        yield head
    finally:
        head.stop()
        left = head.processes()
        start_log = head.log.read_text() if head.log.exists() else ""
        if not os.environ.get("DDA_KEEP_RAY_TEMP"):
            shutil.rmtree(head.temp_dir, ignore_errors=True)
        shutil.rmtree(TOKEN_FILE.parent, ignore_errors=True)
    assert not left, f"processes of the test head survived: {left}"
    assert "Generated new authentication token" not in start_log
    assert home_ray_files() == home_before, "the test cluster left files in ~/.ray"


def tiny_overrides(out_dir: Path, assets: Path, cifar) -> list[str]:
    """The tiny Ray run (_helpers.tiny_run_args) for three short epochs on one Ray Train worker
    (a cluster job's shape) with one variation per image."""
    return tiny_run_args(
        out_dir,
        assets,
        cifar,
        {
            "run.name": "job",
            "distill.epochs": EPOCHS,  # what epochs 2+ train on (rounds with the student, cache reuse): tests/engines/test_pipeline.py
            "distill.steps_per_epoch": "null",
            "resources.num_workers": 1,
            "resources.cpus_per_worker": 0.5,
            "distill.lr": 0.01,
            "augment.num_variations": 1,
            "augment.steps": 4,
            "augment.strength": 0.5,
            "augment.batch_size": 8,
            "filter.threshold": 0.5,
        },
    )


def readme_submit_entrypoint() -> list[str]:
    """The README's ``ray job submit --working-dir . -- ...`` entrypoint, ``$PWD`` expanded as the
    shell does in the project root."""
    import shlex

    (line,) = [ln for ln in (REPO_ROOT / "README.md").read_text().splitlines() if ln.startswith("`ray job submit --working-dir . -- ")]
    words = shlex.split(line.strip("`").replace("$PWD", str(REPO_ROOT)))
    return words[words.index("--") + 1 :]


def test_the_clusters_head_refuses_a_client_without_its_token(ray_head):
    """cluster/gpu.yaml's settings on loopback: the job API answers nothing to a caller without the
    token (HTTP and the CLI alike), and no job is created; with the token it lists the jobs."""
    assert cluster_auth_env()["RAY_AUTH_MODE"] == "token" and cluster_dashboard_host() == "127.0.0.1"
    assert http_json(f"{ray_head.address}/api/jobs/", auth=False) is None
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)
    job_id = f"dda-refused-{uuid.uuid4().hex[:8]}"
    r = ray_cli("job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--no-wait", "--", "python", "-c", "print(1)", timeout=120, auth=False)
    assert r.returncode != 0, f"a submission without the token was accepted:\n{r.stdout}\n{r.stderr}"
    assert re.search(r"401|403|[Uu]nauthori[sz]ed|[Aa]uthentication", r.stdout + r.stderr), r.stdout + r.stderr
    jobs = http_json(f"{ray_head.address}/api/jobs/")
    assert isinstance(jobs, list) and job_id not in {j.get("submission_id") for j in jobs}


def test_ray_job_submit_runs_the_distillation_job(ray_head, tiny_assets, cifar10_decoded, tmp_path):
    """Submitted as the README writes it (its data path resolved by the shell before the upload),
    with the tiny run's sizes added."""
    out_dir = tmp_path / "out"
    job_id = f"dda-test-{uuid.uuid4().hex[:8]}"
    entrypoint = readme_submit_entrypoint()
    assert entrypoint[:4] == ["python", "jobs/distill.py", "--config", "configs/cifar10_cpu_smoke.yaml"]
    readme_fields = {a.split("=", 1)[0] for a in entrypoint[4:]}
    assert "data.path" in readme_fields
    tiny = [a for a in tiny_overrides(out_dir, tiny_assets, cifar10_decoded) if a.split("=", 1)[0] not in readme_fields]
    submit = [
        "job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", *entrypoint, *tiny,
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
    (tmp_path / "job-logs.txt").write_text(logs)  # for reading when an assertion below fails
    # SUCCEEDED also means PATH reached the job: the entrypoint's `python` is the venv's (the
    # machine's other pythons have neither torch nor Ray; `ray job submit` shlex-quotes its
    # arguments, so the entrypoint cannot chain a separate `sys.executable` probe with `&&`).
    assert status == "SUCCEEDED", f"job {job_id} ended {status} after {time.time() - t0:.0f}s:\n{logs[-6000:]}"

    # The driver attached to this head (RAY_ADDRESS from the job), not an embedded Ray of its own.
    assert "attached to the Ray cluster at " in logs and "started a local Ray" not in logs
    # Per-epoch lines and the KD-step bar from rank 0; Ray's own INFO logs and Ray Data's progress
    # bars stay out of a default run (--verbose brings them back: tests/engines/test_pipeline.py).
    # A log a person can read: the attach line, each epoch's line once, the summary block, and few
    # lines in all (progress as plain lines off a terminal, no Ray INFO lines, no per-batch warnings).
    lines = logs.splitlines()
    for e in range(1, EPOCHS + 1):
        said = [line for line in lines if re.search(rf"\bepoch {e}/{EPOCHS}: test_acc \d", line)]
        assert len(said) == 1, f"epoch {e}'s line {len(said)} times in the job logs:\n{logs[-4000:]}"
    assert len(lines) <= LOG_LINES_MAX, f"{len(lines)} lines in `ray job logs` (at most {LOG_LINES_MAX}):\n{logs}"
    assert "finished ==" in logs and "run directory" in logs, logs[-3000:]  # the summary block
    assert "\r" not in logs, "a carriage-return progress bar reached the job log"
    assert "Reporting training result" not in logs  # Ray Train's per-report INFO line: --verbose only
    assert "Execution plan of Dataset" not in logs and not re.search(r"Running Dataset|Total Progress", logs), logs[-4000:]
    ray_info = [line for line in logs.splitlines() if re.search(r"\bINFO\b", line) and not re.search(r"INFO (cli|job_manager)\.py", line)]
    assert not ray_info, ray_info[:5]
    for noise in ("Progress bars disabled", "DeprecationWarning", "Loading pipeline components"):
        assert noise not in logs, noise  # (`ray job logs` and the job manager's own INFO lines are the CLI's)
    assert "Generated new authentication token" not in logs

    run_dir = out_dir / "job"
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["epoch"] == EPOCHS and 0 <= final["test_acc"] <= 100 and math.isfinite(final["test_loss"])
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    load_classifier(run_dir / "student", "wrn16_1", 10)
    # The upload left the venv and outputs behind (the job's own outputs went to run.output_dir).
    pkgs = {p.resolve() for p in ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()}
    assert pkgs, "no unpacked working dir found under the head's temp dir"
    for pkg in pkgs:
        assert (pkg / "jobs" / "distill.py").exists()
        for name in (".venv", "outputs", ".git", ".logs", "mlruns"):
            assert not (pkg / name).exists(), f"{name} was uploaded with the working dir"
    print(f"job {job_id} succeeded in {time.time() - t0:.0f}s")
