"""Helpers shared by several test modules: plain functions and constants, imported as
``from .._helpers import X``. Fixtures shared by several modules live in ``conftest.py``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dda_ray.config import AugmentConfig, SynthesisConfig, load_config
from dda_ray.data import Normalize
from dda_ray.data.bank import BankBatch, make_ids, write_round
from dda_ray.data.datasets import SplitDataset
from dda_ray.models import build_model
from dda_ray.runtime import prepare_run_dir, read_jsonl

from ._tiny_pipelines import random_images

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------- the CIFAR-10 copy, test Ray clusters, tiny Ray runs
class DecodedCifar:
    def __init__(self, ds: SplitDataset, path: Path, cache_dir: Path, seconds: float):
        self.ds, self.path, self.cache_dir, self.seconds = ds, path, cache_dir, seconds


def end_processes_under(temp_dir: str) -> None:
    """Terminate this test's own child processes (a failed Ray start's gcs/raylet/dashboard) by pid."""
    import psutil

    mine = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(temp_dir in part for part in proc.cmdline()):
                proc.terminate()
                mine.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        proc.kill()


_ray_temp_dirs: list[str] = []


def start_test_ray(tmp_path_factory, **kwargs) -> None:
    """``ray.init`` of a local test cluster in its own temp dir, retried when the node "times out
    during startup": Ray waits a fixed 30 s for the raylet to register, which a busy 2-core machine
    can miss (ray-project/ray#65983). The half-started node's processes are ours: ended by pid
    before the next try."""
    import tempfile

    import ray

    for attempt in range(3):
        # Not under pytest's basetemp: with xdist workers (``popen-gwN/``) the dashboard's socket
        # paths would pass the 107-byte AF_UNIX limit and its MetricsHead module fail to start.
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        _ray_temp_dirs.append(temp_dir)
        try:
            ray.init(_temp_dir=temp_dir, **kwargs)
            return
        except Exception as e:  # noqa: BLE001
            ray.shutdown()
            end_processes_under(temp_dir)
            if attempt == 2 or "timed out during startup" not in str(e):
                raise


def tiny_run_args(out_dir: Path, assets: Path, cifar: DecodedCifar, overrides: dict | None = None) -> list[str]:
    """``section.field=value`` arguments of a seconds-long Ray run on the tiny assets and the real
    CIFAR-10 copy: two small synthesis rounds, batch 16, one thread. Each test adds what it checks."""
    values = {
        "run.output_dir": out_dir,
        "run.engine": "ray",
        "run.stream_log": True,
        "data.path": cifar.path,
        "data.cache_dir": cifar.cache_dir,
        "data.eval_subset": 100,
        "teacher.arch": "wrn16_1",
        "teacher.checkpoint": assets / "teacher",
        "student.arch": "wrn16_1",
        "synthesis.nz": 32,
        "synthesis.ngf": 16,
        "synthesis.init_rounds": 2,
        "synthesis.init_batch_size": 16,
        "synthesis.init_g_steps": 2,
        "synthesis.batch_size": 16,
        "synthesis.g_steps": 2,
        "distill.batch_size": 16,
        "distill.lr": 0.02,  # the random tiny teacher's features make lr 0.1 diverge on mixed batches
        "augment.model": assets / "prior",
        "resources.num_workers": 0,
        "resources.torch_threads": 1,
        "tracking.enabled": False,
        **(overrides or {}),
    }
    return [f"{k}={v}" for k, v in values.items()]


# ------------------------------------------------------------------------- synthesis
NORM = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def small_cfg(**kw) -> SynthesisConfig:
    base = dict(nz=32, ngf=16, batch_size=8, g_steps=6, adv=10.0)
    if kw.get("method") == "cmi":
        base.update(cr=0.8, cmi_negatives=16, cmi_head_dim=16)
    base.update(kw)
    cfg = SynthesisConfig(**base)
    cfg.resolve()
    return cfg


def teacher_with_stats(seed: int = 0) -> nn.Module:
    """A random wrn16_1 whose BN running stats are non-trivial (as after training)."""
    torch.manual_seed(seed)
    t = build_model("wrn16_1", 10)
    for m in t.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return t.eval()


# ---------------------------------------------------------------------- local engine
def tiny_config(tmp_path, teacher, cifar, **overrides):
    base = {
        "run.output_dir": str(tmp_path),
        "run.name": "tiny",
        "run.engine": "local",
        "run.mode": "inversion",
        "data.path": str(cifar.path),
        "data.cache_dir": str(cifar.cache_dir),
        "data.eval_subset": 200,
        "teacher.arch": "wrn16_1",
        "teacher.checkpoint": str(teacher),
        "student.arch": "wrn16_1",
        "synthesis.nz": 32,
        "synthesis.ngf": 16,
        "synthesis.init_rounds": 2,
        "synthesis.init_batch_size": 16,
        "synthesis.init_g_steps": 3,
        "synthesis.batch_size": 16,
        "synthesis.g_steps": 2,
        "distill.epochs": 2,
        "distill.steps_per_epoch": 3,
        "distill.batch_size": 16,
        "tracking.enabled": False,
    }
    base.update(overrides)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    prepare_run_dir(cfg)
    return cfg


# ------------------------------------------------------------------ the Ray pipeline
def ray_config(tmp_path, assets, cifar, **overrides):
    """The tiny Ray run (_helpers.tiny_run_args) in dda mode: 3 initial rounds, 2 epochs over the
    whole bank, 2 variations per image at strength 0.5, threshold 0.5."""
    args = tiny_run_args(
        tmp_path,
        assets,
        cifar,
        {
            "run.name": "ray",
            "run.mode": "dda",
            "synthesis.init_rounds": 3,
            "distill.epochs": 2,
            "distill.steps_per_epoch": "null",
            "augment.num_variations": 2,
            "augment.steps": 10,
            "augment.strength": 0.5,
            "augment.batch_size": 4,
            "filter.threshold": 0.5,
            **overrides,
        },
    )
    cfg = load_config(None, args)
    prepare_run_dir(cfg)
    return cfg


def stream_records(run_dir: Path, stage: str) -> list[dict]:
    return [r for p in sorted((run_dir / "stream").glob(f"{stage}-*.jsonl")) for r in read_jsonl(p)]


# ------------------------------------------------------------------- the local prior
def write_bank(bank_dir: Path, n: int = 48, size: int = 16, num_classes: int = 4) -> Path:
    """A tiny two-round bank of smooth random images (what synthesis writes, minus the teacher)."""
    for r in range(2):
        images = random_images(n // 2, size, seed=r)
        batch = BankBatch(
            ids=make_ids(r, 0, n // 2),
            images=images,
            labels=np.arange(n // 2, dtype=np.int64) % num_classes,
            teacher_logits=np.zeros((n // 2, num_classes), np.float32),
            teacher_embedding=np.zeros((n // 2, 8), np.float32),
            rounds=np.full(n // 2, r, np.int32),
            seeds=np.zeros(n // 2, np.int64),
        )
        write_round(bank_dir, batch, r)
    return bank_dir


def tiny_cfg(**kw) -> AugmentConfig:
    base = {
        "prior_steps": 30,
        "prior_batch_size": 16,
        "prior_lr": 2e-3,
        "prior_channels": [8, 16],
        "prior_log_every": 1,
        "prior_ema": 0.9,
        "device": "cpu",
    }
    base.update(kw)
    return AugmentConfig(**base)


# ------------------------------------------- ports, the Ray CLI and cluster/gpu.yaml's head
VENV_BIN = Path(sys.executable).parent


EXCLUDES = [".venv", "outputs", ".git", ".logs", "mlruns", ".pytest_cache", ".ruff_cache", "**/__pycache__"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_head_command() -> str:
    """cluster/gpu.yaml's ``ray start --head`` command."""
    import yaml

    (cmd,) = [c for c in yaml.safe_load((REPO_ROOT / "cluster" / "gpu.yaml").read_text())["head_start_ray_commands"] if "ray start" in c]
    return cmd


def cluster_auth_env() -> dict[str, str]:
    """The auth variables cluster/gpu.yaml's head exports before ``ray start`` (``export A=x B=y;``)."""
    cmd = cluster_head_command()
    exported = re.search(r"export ([^;]+);", cmd)
    assert exported, f"cluster/gpu.yaml's head exports no auth settings before ray start: {cmd}"
    return dict(a.split("=", 1) for a in exported.group(1).split())


# The test cluster's token: a file of its own, as cluster/token.sh makes (never the home directory's).
TOKEN_FILE = Path(tempfile.mkdtemp(prefix="ddatok-")) / "dda-ray-gpu.token"


def ray_env(auth: bool = True) -> dict:
    """Environment for both ``ray start`` and ``ray job submit``: venv first, no usage stats, and the
    cluster's token auth (``auth=False``: a client without the token)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    if auth:
        cluster = cluster_auth_env()
        env["RAY_AUTH_MODE"] = cluster["RAY_AUTH_MODE"]
        env["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)  # the cluster's $HOME/.ray/dda-ray-gpu.token, here in a temp dir
    else:
        env["RAY_AUTH_MODE"] = "disabled"  # sends no token, and writes none to ~/.ray
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address explicitly
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ray_cli(*args: str, timeout: float = 60, auth: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=ray_env(auth), capture_output=True, text=True, timeout=timeout)


def http_json(url: str, timeout: float = 5, auth: bool = True) -> dict | list | None:
    headers = {"Authorization": f"Bearer {TOKEN_FILE.read_text().strip()}"} if auth and TOKEN_FILE.exists() else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return json.loads(r.read().decode())
    except (OSError, ValueError):
        return None


def processes_of(pgid: int, temp_dir: Path) -> list[int]:
    """PIDs of this head only: its process group, or a command line / working directory inside
    its private temp dir (job drivers run in a session of their own, from the unpacked working dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        pid = int(proc.name)
        try:
            if os.getpgid(pid) == pgid or str(temp_dir).encode() in (proc / "cmdline").read_bytes() or os.readlink(proc / "cwd").startswith(str(temp_dir)):
                pids.append(pid)
        except OSError:
            continue
    return pids
