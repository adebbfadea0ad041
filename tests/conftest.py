"""Shared fixtures: the real CIFAR-10 JPEG copy (decoded once per session) and small helpers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from dda_ray.data.datasets import SplitDataset, load_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPG = REPO_ROOT.parent / "shared/data/cifar10-jpg.tar.gz"


RAY_FIXTURES = {"ray_cluster", "tune_cluster", "ray_head"}


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray goes to one xdist group (``--dist loadgroup``): they run one after
    another on one worker while the other worker takes the rest."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config):
    # Tiny test batches gain nothing from intra-op threads, and on a busy 2-core machine
    # torch's spinning worker threads make a forward pass 10-50x slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_jpg_path() -> Path:
    """The shared CIFAR-10 JPEG archive; its absence is a test failure, never a skip."""
    assert CIFAR10_JPG.is_file(), f"the CIFAR-10 JPEG copy is missing: expected {CIFAR10_JPG}"
    return CIFAR10_JPG


class DecodedCifar:
    def __init__(self, ds: SplitDataset, path: Path, cache_dir: Path, seconds: float):
        self.ds, self.path, self.cache_dir, self.seconds = ds, path, cache_dir, seconds


@pytest.fixture(scope="session")
def cifar10_decoded(cifar10_jpg_path, tmp_path_factory) -> DecodedCifar:
    """Decode the full archive once (about 10 s) into a session cache directory."""
    cache_dir = tmp_path_factory.mktemp("cifar10_cache")
    assert not list(cache_dir.iterdir())
    t0 = time.perf_counter()
    ds = load_dataset("imagefolder", cifar10_jpg_path, cache_dir=cache_dir, image_size=32, progress=False)
    return DecodedCifar(ds, cifar10_jpg_path, cache_dir, time.perf_counter() - t0)


@pytest.fixture
def tests_on_path(monkeypatch):
    """Make helper modules of tests/ (``_toy_models``) importable by name."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


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


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for d in _ray_temp_dirs:  # the test clusters' temp dirs, once every cluster has shut down
        shutil.rmtree(d, ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A random tiny teacher (wrn16_1 with real BatchNorm statistics) and a tiny local diffusion
    prior, saved once per session in the formats a run loads (``teacher/``, ``prior/``)."""
    from dda_ray.models.checkpoint import save_classifier

    from ._tiny_pipelines import build_tiny_prior
    from .synthesis.test_synthesis import teacher_with_stats

    root = tmp_path_factory.mktemp("tiny_assets")
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    build_tiny_prior(root / "prior", num_classes=10, image_size=32)
    return root


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
