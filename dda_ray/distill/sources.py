"""Where the KD loop's rows come from (:func:`dda_ray.distill.driver.drive` runs them).

* the rounds with the student between epochs (:class:`StudentRounds`, shared by every source);
* the local engine's sources: :class:`BankSource` (the in-memory epoch pool) and :class:`RealSource`;
* the bank's rows in memory (:func:`load_bank_rows`) and what a checkpoint records of a source (:func:`resume_extra`).

The initial bank and the run's Synthesizer come from :mod:`dda_ray.synthesis.initial_bank`; the Ray engine's
source, a Ray Train worker's Ray Data shard, is :class:`dda_ray.engines.ray_source.RaySource`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..augment.filter import all_rejected_line
from ..config import Config
from ..data.bank import BankBatch, bank_files, from_table, read_bank, read_table, round_of, write_round
from ..data.datasets import ImageArrays
from ..data.pool import ORIGINAL, batched, kept_slots, slot_order, split_slots
from ..runtime import derive_seed
from ..synthesis.initial_bank import bank_provenance, initial_bank_dir
from ..synthesis.synthesizer import Synthesizer
from .kd import Distiller

# An augment step: bank rows in -> (variations (N, K, H, W, C), kept (N, K) bool, stats) out.
AugmentFn = Callable[[BankBatch], tuple[np.ndarray, np.ndarray, dict]]


class StudentRounds:
    """The work between epochs that both engines share: ``synthesis.rounds_per_epoch`` rounds with
    the current student (and its rotation head), numbered after the initial bank, seeded by (run
    seed, round), written to ``<run_dir>/rounds/`` with their provenance; the rotation head restarts
    (seeded) after each. ``synthesizer`` None: another process makes the rounds (Ray Train ranks
    other than 0); this one only keeps the round count and the head in step."""

    def __init__(self, cfg: Config, synthesizer: Synthesizer | None, next_round: int, progress: bool = False):
        self.cfg, self.synthesizer, self.next_round, self.progress = cfg, synthesizer, next_round, progress
        self.rounds_dir = cfg.run_dir / "rounds"
        self.provenance = bank_provenance(cfg, synthesizer, initial=False) if synthesizer is not None else None

    def run(self, distiller: Distiller) -> list[BankBatch]:
        """This epoch's rounds; returns the batches made here (a round already on disk, kept from
        an interrupted attempt, is read back instead of made again)."""
        made = []
        for _ in range(self.cfg.synthesis.rounds_per_epoch):
            r = self.next_round
            if self.synthesizer is not None:
                path = self.rounds_dir / f"round-{r:05d}.parquet"
                if path.exists():
                    made.append(from_table(*read_table(path)))
                else:
                    seed = derive_seed(self.cfg.run.seed, "round", r)
                    res = self.synthesizer.run_round(r, seed, student=distiller.student_module, rot_head=distiller.rot_head, progress=self.progress)
                    write_round(self.rounds_dir, res.batch, r, self.provenance)
                    made.append(res.batch)
            self.next_round = r + 1
            distiller.reset_rotation_head(torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "rot_head", r)))
        return made


def _timed_rounds(rounds: StudentRounds | None, distiller: Distiller) -> tuple[list[BankBatch], float]:
    t0 = time.perf_counter()
    made = rounds.run(distiller) if rounds is not None else []
    return made, time.perf_counter() - t0


def kept_stats(variations: int, kept: int, cache_hits: int, diffused: int, filter_batches: int = 0, all_rejected_batches: int = 0, all_rejected_max_score: float | None = None) -> dict:
    """The epoch's augment/filter totals, under the names and meanings both engines report."""
    return {
        # batches the filter saw this epoch, those it kept no variation of, and the best score among the latter
        "filter_batches": filter_batches,
        "all_rejected_batches": all_rejected_batches,
        "all_rejected_max_score": all_rejected_max_score,
        "kept_fraction": kept / variations if variations else float("nan"),
        "variations": variations,
        "kept": kept,
        "rejected": variations - kept,
        # the augment stage's variation-cache lookups served from the cache (the Ray stream looks a parent up
        # in every batch holding one of its slots, the local engine once, when the row joins its pool)
        "augment_cache_hits": cache_hits,
        "augment_diffused": diffused,  # images this epoch ran diffusion on
    }


# the local engine's augment/filter counts between two epoch reports
AUGMENTED_ZERO = {"cache_hits": 0, "diffused": 0, "filter_batches": 0, "all_rejected_batches": 0, "all_rejected_max_score": None}


class BankSource:
    """In-memory epoch pool: bank rows, their variations and the filter's verdicts; new rounds with
    the student join it every epoch. Batches follow :mod:`dda_ray.data.pool`'s slot order, the
    order the Ray engine streams, so both engines train on the same batches for the same seed."""

    def __init__(self, cfg: Config, bank: BankBatch, synthesizer: Synthesizer | None, augment: AugmentFn | None = None, progress: bool = True):
        self.cfg, self.augment = cfg, augment
        self.k = cfg.augment.num_variations if augment is not None else 0
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self.augmented = dict(AUGMENTED_ZERO)  # since the last epoch's report
        self._add(bank)
        # Rounds with the student continue the numbering after the initial bank.
        next_round = cfg.synthesis.init_rounds
        for path in bank_files(cfg.run_dir / "rounds"):  # resuming: rounds already made by this run
            self._add(from_table(*read_table(path)))
            next_round = max(next_round, round_of(path) + 1)
        self.rounds = StudentRounds(cfg, synthesizer, next_round, progress) if synthesizer is not None else None

    def _add(self, batch: BankBatch) -> None:
        variations = kept = None
        if self.augment is not None and len(batch):
            variations, kept, stats = self.augment(batch)
            for key in ("cache_hits", "diffused", "filter_batches", "all_rejected_batches"):
                self.augmented[key] += int(stats.get(key, 0))
            best = stats.get("all_rejected_max_score")
            if best is not None:
                prev = self.augmented["all_rejected_max_score"]
                self.augmented["all_rejected_max_score"] = best if prev is None else max(prev, best)
        self.parts.append((batch.images, batch.labels, variations, kept))
        self._images = np.concatenate([p[0] for p in self.parts])
        self._labels = np.concatenate([p[1] for p in self.parts])
        if self.k:
            shape = self._images.shape[1:]
            self._variations = np.concatenate([p[2] if p[2] is not None else np.zeros((len(p[1]), self.k, *shape), np.uint8) for p in self.parts])
            self._kept = np.concatenate([p[3] if p[3] is not None else np.zeros((len(p[1]), self.k), bool) for p in self.parts])

    def __len__(self) -> int:
        """Rows in the epoch pool: bank rows plus kept variations."""
        return len(self._labels) + (int(self._kept.sum()) if self.k else 0)

    @property
    def next_round(self) -> int:
        return self.rounds.next_round if self.rounds is not None else self.cfg.synthesis.init_rounds

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        made, synthesis_s = _timed_rounds(self.rounds, distiller)
        for batch in made:
            self._add(batch)
        stats = {"synthesis_s": synthesis_s, "pool_rows": len(self), "next_round": self.next_round}
        if self.k:  # the whole epoch pool's verdicts (the Ray engine filters the whole pool every epoch)
            stats.update(kept_stats(int(self._kept.size), int(self._kept.sum()), **self.augmented))
            self.augmented = dict(AUGMENTED_ZERO)
            if (line := all_rejected_line(epoch + 1, stats)) is not None:
                stats["log_lines"] = [line]
        return stats

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        passes = 0
        while True:
            order = slot_order(len(self._labels), self.k, self.cfg.run.seed, epoch, passes)
            order = kept_slots(order, self._kept if self.k else None)
            for idx in batched(order, self.cfg.distill.batch_size):
                rows, var = split_slots(idx, self.k)
                images = self._images[rows]
                v = var != ORIGINAL
                if v.any():
                    images[v] = self._variations[rows[v], var[v]]
                yield torch.from_numpy(images), torch.from_numpy(self._labels[rows])
            passes += 1
            if self.cfg.distill.steps_per_epoch is None:
                return


class RealSource:
    """The real training split (``real_kd``: the upper bound, same loop, budget and order rule)."""

    rounds = None

    def __init__(self, data: ImageArrays, batch_size: int, seed: int, one_pass: bool = False):
        self.data, self.batch_size, self.seed, self.one_pass = data, batch_size, seed, one_pass

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        return {"synthesis_s": 0.0, "pool_rows": len(self.data)}

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        passes = 0
        while True:
            for idx in batched(slot_order(len(self.data), 0, self.seed, epoch, passes), self.batch_size):
                yield torch.from_numpy(self.data.images[idx]), torch.from_numpy(self.data.labels[idx])
            passes += 1
            if self.one_pass:
                return


def resume_extra(source) -> dict:
    """What a checkpoint records besides the models: the round counter and, for a chained method,
    the chain's state (so a resumed run makes the rounds an uninterrupted one would)."""
    rounds = getattr(source, "rounds", None)
    extra = {"next_round": rounds.next_round if rounds is not None else 0}
    synthesizer = rounds.synthesizer if rounds is not None else None
    if isinstance(synthesizer, Synthesizer) and synthesizer.chained:
        extra["synthesizer"] = synthesizer.state_dict()
    return extra


def load_bank_rows(cfg: Config, teacher_fingerprint: str | None = None) -> BankBatch:
    """The initial bank's rows, then those of ``distill.extra_banks`` (checked against the teacher
    when its fingerprint is given). With ``synthesis.init_rounds = 0`` the extra banks alone."""
    from ..augment.crops import read_extra_banks

    parts = [read_bank(initial_bank_dir(cfg))] if cfg.synthesis.init_rounds > 0 or not cfg.distill.extra_banks else []
    extra = read_extra_banks(cfg.distill.extra_banks, teacher_fingerprint)
    return BankBatch.concat(parts + ([extra] if extra is not None else []))
