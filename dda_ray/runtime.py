"""Process-level helpers shared by every job: run directories, seeding, threads, devices."""

from __future__ import annotations

import json
import os
import random
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


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, image id, variation index, ...).

    Uses a hash of the parts' text, not Python's salted ``hash()``, so the same parts give the
    same seed in every process and on every machine.
    """
    import hashlib

    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
