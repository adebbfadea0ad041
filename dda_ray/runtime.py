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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file under its final name only when complete (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rewind_run(run_dir: str | Path, epochs_done: int, next_round: int | None) -> None:
    """Bring a run directory back to its last checkpoint before resuming from it.

    An interrupted or failed epoch may have appended its ``metrics.jsonl`` line or written its
    synthesis round before the checkpoint was saved. Lines of epochs after ``epochs_done`` (and
    a torn last line) are dropped, and rounds numbered ``>= next_round`` are removed: the resumed
    epoch re-synthesises them from the restored student with the same seeds, so the run continues
    exactly as if it had never stopped.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the interruption
            if int(rec.get("epoch", 0)) <= epochs_done:
                keep.append(line)
        write_text_atomic(metrics, "".join(f"{line}\n" for line in keep))
    if next_round is not None:
        from .data.bank import round_of

        for path in sorted((run_dir / "rounds").glob("round-*.parquet")):
            if round_of(path) >= next_round:
                path.unlink()


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, image id, variation index, ...).

    Uses a hash of the parts' text, not Python's salted ``hash()``, so the same parts give the
    same seed in every process and on every machine.
    """
    import hashlib

    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
