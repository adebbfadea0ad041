"""Process-level helpers shared by every job: run directories, seeding, threads, devices."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import Config


class RunDirExistsError(FileExistsError):
    """The run directory exists and the user did not ask to resume."""


def prepare_run_dir(cfg: Config, filename: str = "config.yaml") -> Path:
    """Create ``<output_dir>/<name>`` and write the resolved config beside the outputs.

    An existing directory is only reused with ``run.resume=true``: nothing of an earlier run
    is overwritten by accident.
    """
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.resume:
        raise RunDirExistsError(
            f"run directory {run_dir} already exists; pass run.resume=true to continue it or choose another run.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / filename)
    return run_dir


def quiet_ray_data_console() -> None:
    """Ray Data prints warnings and errors only on this process's console (its ``ray-data.log``
    under the session's logs keeps every level). A default (not ``--verbose``) run calls this in
    the driver and, as Ray's ``worker_process_setup_hook``, in every worker of the job."""
    import logging

    import ray.data  # noqa: F401 - importing it installs Ray Data's handlers, at INFO

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_bars_disabled)


def _not_bars_disabled(record) -> bool:
    """Drop Ray Data's "Progress bars disabled" notice: a quiet run turns them off on purpose."""
    return not str(record.msg).startswith("Progress bars disabled")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def cpu_description() -> str:
    """The CPU model and the instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ...).

    Benchmark results record it: the same code and seed give the same numbers on one machine, but
    kernels of another instruction set round differently, so a run on another CPU follows another
    trajectory (within seed noise)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        model = platform.processor() or model
    return f"{model}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def package_versions(names: tuple[str, ...] = ("torch", "numpy", "pillow", "ray", "diffusers", "pyarrow")) -> dict[str, str | None]:
    """Installed versions of the packages a run's numbers depend on (None where one is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory (an async copy)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def mark(run_dir: str | Path, event: str, **fields) -> None:
    """One line in ``<run_dir>/timeline.jsonl``: ``event`` happened now (wall clock, pid, ``fields``).

    The run's phases across its processes (trial, Train worker, augment/filter actors: set-up,
    model loads, epochs), so where a run's time goes can be read back afterwards
    (``benchmarks/tune_warm_cold.py`` does). Never fails the run."""
    import time

    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        append_jsonl(Path(run_dir) / "timeline.jsonl", {"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    except OSError:
        pass


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object], *, directory: bool = False) -> Path:
    """Write ``path`` only when complete: into a hidden temporary beside it, then ``os.replace``.

    Readers (and a resumed run) see the old content or the new, never half of it; a failed write
    leaves neither a temporary nor a changed ``path``.

    ``data`` is text, bytes, or a callable given the temporary's path to write it (``np.save``,
    ``torch.save``, ``pq.write_table``, ...). A file's temporary keeps ``path``'s suffix, so
    writers that append one (``np.save``) do not, and carries the process id, so concurrent
    writers of one path never share it (the last rename wins). With ``directory=True`` the
    callable fills an existing empty directory (``save_pretrained``); an old directory at
    ``path`` is moved aside, replaced and then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            data(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of text (the name the run loops use)."""
    atomic_write(path, text)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, image id, variation index, ...).

    Uses a hash of the parts' text, not Python's salted ``hash()``, so the same parts give the
    same seed in every process and on every machine.
    """
    import hashlib

    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
