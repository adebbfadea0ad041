"""Shared fixtures: the real CIFAR-10 JPEG copy (decoded once per session) and every fixture more
than one test module uses (pytest gives them to every module under tests/, no import needed).
Plain helpers shared by several modules are in ``_helpers.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import dda_ray.data
import dda_ray.data.datasets
from dda_ray.data.datasets import load_dataset
from dda_ray.models.checkpoint import save_classifier

from ._helpers import REPO_ROOT, DecodedCifar, _ray_temp_dirs, free_port, start_test_ray, teacher_with_stats
from ._tiny_pipelines import offline, single_thread

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


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for d in _ray_temp_dirs:  # the test clusters' temp dirs, once every cluster has shut down
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A random tiny teacher (wrn16_1 with real BatchNorm statistics) and a tiny local diffusion
    prior, saved once per session in the formats a run loads (``teacher/``, ``prior/``)."""
    from dda_ray.models.checkpoint import save_classifier

    from ._tiny_pipelines import build_tiny_prior

    root = tmp_path_factory.mktemp("tiny_assets")
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    build_tiny_prior(root / "prior", num_classes=10, image_size=32)
    return root


# ------------------------------------------------------------- shared by several modules
@pytest.fixture
def offline_single_thread(monkeypatch):
    """Offline Hugging Face and one torch thread for a test (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("offline_single_thread")``)."""
    offline(monkeypatch)
    with single_thread():
        yield


@pytest.fixture
def no_dataset(monkeypatch):
    """Every loader of the configured dataset fails the test when called."""
    calls = []

    def refuse(name):
        def loader(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"prior training called {name}{args}: it must never read data.path")

        return loader

    for module, name in (
        (dda_ray.data, "load_data"),
        (dda_ray.data, "load_dataset"),
        (dda_ray.data.datasets, "load_dataset"),
        (dda_ray.data.datasets, "load_image_folder"),
        (dda_ray.data.datasets, "load_cifar"),
        (dda_ray.data.datasets, "load_tiny_imagenet"),
        (dda_ray.data.datasets, "_iter_tar"),
        (dda_ray.data.datasets, "_iter_dir"),
    ):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return calls


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "wrn16_1"
    save_classifier(
        teacher_with_stats(), path, arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), accuracy=None
    )
    return path


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token file left in the home directory
    start_test_ray(tmp_path_factory, num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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

    Every module that uses it shares one server (a second one costs another start and its DB
    migrations), which the last user stops through its own process handle."""
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
