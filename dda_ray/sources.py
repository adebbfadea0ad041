"""Training sources for the single-process path: the synthetic bank (growing every epoch) and real data.

The Ray path has its own source (:mod:`dda_ray.pipeline`) feeding the same ``train_loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import fingerprint
from .config import Config
from .data.bank import BankBatch, bank_files, check_provenance, from_table, read_bank, read_table, round_of, write_round
from .data.datasets import ImageArrays
from .distill import Distiller, cycle_batches
from .runtime import derive_seed
from .synthesis import Synthesizer

# An augment step: bank rows in -> (kept images, their labels, stats) out.
AugmentFn = Callable[[BankBatch], tuple[np.ndarray, np.ndarray, dict]]


def initial_bank_dir(cfg: Config) -> Path:
    return Path(cfg.synthesis.bank_dir) if cfg.synthesis.bank_dir else cfg.run_dir / "bank"


def bank_provenance(cfg: Config, synthesizer: Synthesizer, initial: bool = True) -> dict[str, str]:
    """What made a bank's rounds: the teacher's weights and the synthesis settings and seed."""
    sc = cfg.synthesis
    size, steps = (sc.init_batch_size, sc.init_g_steps) if initial else (sc.batch_size, sc.g_steps)
    settings = f"batch_size={size} g_steps={steps} lr_g={sc.lr_g} nz={sc.nz} ngf={sc.ngf} bn={sc.bn} oh={sc.oh} seed={cfg.run.seed}"
    return {"teacher": fingerprint(synthesizer.teacher), "synthesis": settings}


def build_initial_bank(cfg: Config, synthesizer: Synthesizer, progress: bool = True) -> Path:
    """Synthesise the initial bank (no student, adv = 0), skipping rounds already on disk.

    Rounds are independent and seeded by (run seed, round), so a bank shared between runs or
    finished after an interruption is identical to one made in one go. Rounds on disk made by
    another teacher or with other settings are refused (:func:`check_provenance`). With
    ``resources.synthesis_tasks > 0`` and Ray running, the missing rounds are spread over that many
    concurrent Ray tasks (:func:`synthesize_rounds`, each with ``synthesis_cpus`` / ``synthesis_gpus``);
    otherwise they run here, one after another.
    """
    sc = cfg.synthesis
    bank_dir = initial_bank_dir(cfg)
    provenance = bank_provenance(cfg, synthesizer)
    existing = bank_files(bank_dir)
    for path in existing:
        check_provenance(path, provenance)
    done = {round_of(p) for p in existing}
    todo = [r for r in range(sc.init_rounds) if r not in done]
    if todo and cfg.resources.synthesis_tasks > 0:
        import ray

        if ray.is_initialized():
            _build_with_ray_tasks(cfg, bank_dir, todo, provenance, progress)
            return bank_dir
    for r in tqdm(todo, desc="initial bank", unit="round", disable=not progress or not todo):
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return bank_dir


def synthesize_rounds(cfg_dict: dict, bank_dir: str, rounds: list[int], provenance: dict[str, str]) -> list[int]:
    """Body of one Ray task: load the teacher, synthesise ``rounds`` of the initial bank, write them."""
    from .checkpoint import load_teacher
    from .config import config_from_dict
    from .runtime import resolve_device, set_threads

    cfg = config_from_dict(cfg_dict)
    set_threads(cfg.resources.torch_threads)
    teacher, normalize, _ = load_teacher(cfg)
    device = resolve_device("auto" if cfg.resources.synthesis_gpus > 0 else "cpu")
    synthesizer = Synthesizer(teacher, normalize, cfg.data.num_classes, cfg.synthesis, cfg.data.image_size, device)
    if fingerprint(synthesizer.teacher) != provenance["teacher"]:
        raise RuntimeError(f"the task's teacher ({cfg.teacher.checkpoint}) is not the driver's: is the checkpoint on storage every node sees?")
    sc = cfg.synthesis
    for r in rounds:
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return rounds


def _build_with_ray_tasks(cfg: Config, bank_dir: Path, todo: list[int], provenance: dict[str, str], progress: bool) -> None:
    """At most ``synthesis_tasks`` tasks in flight, each taking an equal share of the missing rounds.

    The progress bar counts round files as they land in ``bank_dir`` (each task writes its rounds
    one by one, atomically), so it moves per round, not per task."""
    import ray

    res = cfg.resources
    n = min(res.synthesis_tasks, len(todo))
    chunks = [todo[i::n] for i in range(n)]
    task = ray.remote(synthesize_rounds).options(num_cpus=res.synthesis_cpus, num_gpus=res.synthesis_gpus, max_retries=2)
    cfg_dict = cfg.to_dict()
    pending = [task.remote(cfg_dict, str(bank_dir), chunk, provenance) for chunk in chunks]
    wanted = set(todo)
    with tqdm(total=len(todo), desc=f"initial bank ({n} Ray tasks)", unit="round", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            ray.get(ready)  # a task that failed (after its retries) raises here
            written = sum(1 for p in bank_files(bank_dir) if round_of(p) in wanted)
            bar.update(written - bar.n)
    missing = sorted(set(range(cfg.synthesis.init_rounds)) - {round_of(p) for p in bank_files(bank_dir)})
    if missing:
        raise RuntimeError(f"initial bank rounds {missing} are missing under {bank_dir} after the Ray tasks finished")


class BankSource:
    """In-memory pool of synthetic rows; new rounds with the student join it every epoch."""

    def __init__(
        self,
        cfg: Config,
        bank: BankBatch,
        synthesizer: Synthesizer | None,
        generator: torch.Generator,
        augment: AugmentFn | None = None,
        progress: bool = True,
    ):
        self.cfg, self.synthesizer, self.generator, self.augment, self.progress = cfg, synthesizer, generator, augment, progress
        self.rounds_dir = cfg.run_dir / "rounds"
        self.provenance = bank_provenance(cfg, synthesizer, initial=False) if synthesizer is not None else None
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.stats: dict = {}
        self._add(bank)
        # Rounds with the student continue the numbering after the initial bank.
        self.next_round = cfg.synthesis.init_rounds
        for path in bank_files(self.rounds_dir):  # resuming: rounds already made by this run
            self._add(from_table(*read_table(path)))
            self.next_round = max(self.next_round, round_of(path) + 1)

    def _add(self, batch: BankBatch) -> None:
        self.images.append(batch.images)
        self.labels.append(batch.labels)
        if self.augment is not None and len(batch):
            imgs, labels, stats = self.augment(batch)
            if len(labels):
                self.images.append(imgs)
                self.labels.append(labels)
            self.stats = stats
        self._images = np.concatenate(self.images)
        self._labels = np.concatenate(self.labels)

    def __len__(self) -> int:
        return len(self._labels)

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        sc = self.cfg.synthesis
        if self.synthesizer is not None:
            for _ in range(sc.rounds_per_epoch):
                r = self.next_round
                res = self.synthesizer.run_round(
                    r,
                    derive_seed(self.cfg.run.seed, "round", r),
                    student=distiller.student_module,
                    rot_head=distiller.rot_head,
                    progress=self.progress,
                )
                write_round(self.rounds_dir, res.batch, r, self.provenance)
                self.next_round = r + 1
                distiller.reset_rotation_head(torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "rot_head", r)))
                self._add(res.batch)
        return {"pool_rows": len(self), "next_round": self.next_round, **self.stats}

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        one_pass = 1 if self.cfg.distill.steps_per_epoch is None else None
        for idx in cycle_batches(len(self), self.cfg.distill.batch_size, self.generator, one_pass):
            yield torch.from_numpy(self._images[idx]), torch.from_numpy(self._labels[idx])


class RealSource:
    """The real training split (``real_kd``: the upper bound, same loop and budget)."""

    def __init__(self, data: ImageArrays, batch_size: int, generator: torch.Generator, one_pass: bool = False):
        self.data, self.batch_size, self.generator, self.one_pass = data, batch_size, generator, one_pass

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        return {"pool_rows": len(self.data)}

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in cycle_batches(len(self.data), self.batch_size, self.generator, 1 if self.one_pass else None):
            yield torch.from_numpy(self.data.images[idx]), torch.from_numpy(self.data.labels[idx])


def load_bank_rows(cfg: Config) -> BankBatch:
    return read_bank(initial_bank_dir(cfg))
