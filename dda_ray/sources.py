"""Where the KD loop's rows come from, for both engines (:func:`dda_ray.driver.drive` runs them).

* the initial bank (:func:`build_initial_bank`) and the run's Synthesizer (:func:`run_synthesizer`,
  the one construction every caller uses);
* the rounds with the student between epochs (:class:`StudentRounds`, shared by every source);
* the local engine's sources: :class:`BankSource` (the in-memory epoch pool) and :class:`RealSource`;
* the Ray engine's source: :class:`RaySource` (a Ray Train worker's Ray Data shard).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .checkpoint import fingerprint
from .config import Config
from .data.bank import BankBatch, bank_files, check_provenance, from_table, read_bank, read_table, round_of, write_round
from .data.datasets import ImageArrays
from .data.pool import ORIGINAL, batched, kept_slots, slot_order, split_slots
from .distill import Distiller
from .filter import all_rejected_line
from .progress import bar as progress_bar
from .runtime import derive_seed
from .synthesis import Synthesizer, build_synthesizer

# An augment step: bank rows in -> (variations (N, K, H, W, C), kept (N, K) bool, stats) out.
AugmentFn = Callable[[BankBatch], tuple[np.ndarray, np.ndarray, dict]]


def initial_bank_dir(cfg: Config) -> Path:
    return Path(cfg.synthesis.bank_dir) if cfg.synthesis.bank_dir else cfg.run_dir / "bank"


def bank_provenance(cfg: Config, synthesizer: Synthesizer, initial: bool = True) -> dict[str, str]:
    """What made a bank's rounds: the teacher's weights and the synthesis settings and seed."""
    sc = cfg.synthesis
    size, steps = (sc.init_batch_size, sc.init_g_steps) if initial else (sc.batch_size, sc.g_steps)
    settings = f"batch_size={size} g_steps={steps} lr_g={sc.lr_g} nz={sc.nz} ngf={sc.ngf} bn={sc.bn} oh={sc.oh} seed={cfg.run.seed}"
    if sc.method == "fast":
        settings += f" lr_z={sc.lr_z} bn_momentum={sc.bn_momentum} meta_lr={sc.meta_lr}"
    if sc.method == "cmi":
        settings += f" cr={sc.cr} cr_t={sc.cr_t} cmi_bank_size={sc.cmi_bank_size} cmi_negatives={sc.cmi_negatives} cmi_head_dim={sc.cmi_head_dim}"
    if not initial:
        settings += f" adv={sc.adv} adv_term={sc.adv_term}"
    return {"teacher": fingerprint(synthesizer.teacher), "synthesis": settings, "method": sc.method}


SYNTHESIS_STATE = "synthesizer.pt"  # a chained method (fast, cmi): the chain's state after the bank's last round


def _save_synthesis_state(bank_dir: Path, synthesizer: Synthesizer) -> None:
    tmp = bank_dir / f".{SYNTHESIS_STATE}.tmp"
    torch.save(synthesizer.state_dict(), tmp)
    tmp.replace(bank_dir / SYNTHESIS_STATE)


def load_bank_synthesis_state(cfg: Config, synthesizer: Synthesizer) -> None:
    """A chained method's state where the initial bank's chain left it (``_build_chain`` resumes
    an interrupted bank from it; ``fast``'s rounds with the student continue it). ``dda``: nothing."""
    if not synthesizer.chained:
        return
    path = initial_bank_dir(cfg) / SYNTHESIS_STATE
    method = cfg.synthesis.method
    if not path.exists():
        raise RuntimeError(f"the {method} synthesis state {path} is missing: the initial bank under {path.parent} was not made with synthesis.method={method}")
    synthesizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def build_initial_bank(cfg: Config, synthesizer: Synthesizer, progress: bool = True) -> Path:
    """Synthesise the initial bank (no student, adv = 0), skipping rounds already on disk.

    Rounds are independent and seeded by (run seed, round), so a bank shared between runs or
    finished after an interruption is identical to one made in one go. Rounds on disk made by
    another teacher or with other settings are refused (:func:`check_provenance`). With
    ``resources.synthesis_tasks > 0`` and Ray running, the missing rounds are spread over that many
    concurrent Ray tasks (:func:`synthesize_rounds`, each with ``synthesis_cpus`` / ``synthesis_gpus``);
    otherwise they run here, one after another. A chained method's rounds (``fast``, ``cmi``) form
    one chain, run in order (:func:`_build_chain`): in one Ray task when tasks are asked for, else
    here; ``synthesizer`` ends holding the chain either way.
    """
    sc = cfg.synthesis
    bank_dir = initial_bank_dir(cfg)
    provenance = bank_provenance(cfg, synthesizer)
    existing = bank_files(bank_dir)
    for path in existing:
        check_provenance(path, provenance)
    done = {round_of(p) for p in existing}
    todo = [r for r in range(sc.init_rounds) if r not in done]
    if synthesizer.chained and todo and cfg.resources.synthesis_tasks > 0 and _ray_running():
        # one chain: one Ray task (on a cluster it runs where the synthesis GPUs are), then continue from it here
        _build_with_ray_tasks(cfg, bank_dir, todo, provenance, progress, max_tasks=1)
        load_bank_synthesis_state(cfg, synthesizer)
        return bank_dir
    if synthesizer.chained:
        return _build_chain(cfg, synthesizer, bank_dir, todo, provenance, progress)
    if todo and cfg.resources.synthesis_tasks > 0 and _ray_running():
        _build_with_ray_tasks(cfg, bank_dir, todo, provenance, progress)
        return bank_dir
    for r in progress_bar(todo, desc="initial bank", unit="round", disable=not progress or not todo):
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return bank_dir


def run_synthesizer(cfg: Config, teacher: tuple | None = None, device: torch.device | str | None = None, progress: bool = True) -> Synthesizer:
    """THE construction of a run's Synthesizer: built against the teacher, the initial bank made
    (rounds already on disk skipped, see :func:`build_initial_bank`), and for ``fast`` the chain
    left at the bank's end, where the rounds with the student continue it (Fast's warm-up and
    training are one process). ``cmi``'s rounds with the student start a fresh chain (projection
    head, empty memory bank), as the reference's bank-then-train scripts do (two processes).

    ``teacher``: ``(model, normalize)`` as :func:`~dda_ray.checkpoint.load_teacher` returns them;
    None: a standalone call (the Ray driver, Tune's shared bank, the benchmarks) sets the threads,
    seeds with ``run.seed`` and loads the teacher here. ``device``: default ``resources.use_gpu``'s.
    """
    from .checkpoint import load_teacher
    from .runtime import resolve_device, seed_everything, set_threads

    if teacher is None:
        set_threads(cfg.resources.torch_threads)
        seed_everything(cfg.run.seed)
        teacher = load_teacher(cfg)[:2]
    device = resolve_device("auto" if cfg.resources.use_gpu else "cpu") if device is None else device
    synthesizer = build_synthesizer(cfg, teacher[0], teacher[1], device)
    build_initial_bank(cfg, synthesizer, progress)
    if synthesizer.method == "cmi":
        synthesizer.reset_chain()
    return synthesizer


def _build_chain(cfg: Config, synthesizer: Synthesizer, bank_dir: Path, todo: list[int], provenance: dict[str, str], progress: bool) -> Path:
    """A chained method (``fast``, ``cmi``): rounds form one chain (each continues the state the
    one before left: fast's meta-generator, cmi's head and memory bank), so they run here in order,
    and the chain's state is saved beside the rounds after each one: an interrupted bank resumes
    exactly, and runs sharing the bank continue from its end."""
    sc = cfg.synthesis
    if (bank_dir / SYNTHESIS_STATE).exists():
        load_bank_synthesis_state(cfg, synthesizer)
    elif sc.init_rounds - len(todo):
        raise RuntimeError(f"{bank_dir} holds rounds but no {SYNTHESIS_STATE}: it was not made with synthesis.method={sc.method}")
    if todo and todo != list(range(synthesizer.rounds_done, sc.init_rounds)):
        raise RuntimeError(f"{sc.method} bank {bank_dir}: rounds {todo} are missing but its chain stopped after round {synthesizer.rounds_done - 1}")
    for r in progress_bar(todo, desc=f"initial bank ({sc.method} chain)", unit="round", disable=not progress or not todo):
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
        _save_synthesis_state(bank_dir, synthesizer)
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
    synthesizer = build_synthesizer(cfg, teacher, normalize, device)
    if fingerprint(synthesizer.teacher) != provenance["teacher"]:
        raise RuntimeError(f"the task's teacher ({cfg.teacher.checkpoint}) is not the driver's: is the checkpoint on storage every node sees?")
    sc = cfg.synthesis
    if synthesizer.chained:  # the whole chain, in order, from its saved state
        _build_chain(cfg, synthesizer, Path(bank_dir), rounds, provenance, progress=False)
        return rounds
    for r in rounds:
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return rounds


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _build_with_ray_tasks(cfg: Config, bank_dir: Path, todo: list[int], provenance: dict[str, str], progress: bool, max_tasks: int | None = None) -> None:
    """At most ``synthesis_tasks`` (and ``max_tasks``) tasks in flight, each taking an equal share of the missing rounds.

    The progress bar counts round files as they land in ``bank_dir`` (each task writes its rounds
    one by one, atomically), so it moves per round, not per task."""
    import ray

    res = cfg.resources
    n = min(res.synthesis_tasks, len(todo), max_tasks or len(todo))
    chunks = [todo[i::n] for i in range(n)]
    task = ray.remote(synthesize_rounds).options(num_cpus=res.synthesis_cpus, num_gpus=res.synthesis_gpus, max_retries=2)
    cfg_dict = cfg.to_dict()
    pending = [task.remote(cfg_dict, str(bank_dir), chunk, provenance) for chunk in chunks]
    wanted = set(todo)
    with progress_bar(total=len(todo), desc=f"initial bank ({n} Ray tasks)", unit="round", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            ray.get(ready)  # a task that failed (after its retries) raises here
            written = sum(1 for p in bank_files(bank_dir) if round_of(p) in wanted)
            bar.update(written - bar.n)
    missing = sorted(set(range(cfg.synthesis.init_rounds)) - {round_of(p) for p in bank_files(bank_dir)})
    if missing:
        raise RuntimeError(f"initial bank rounds {missing} are missing under {bank_dir} after the Ray tasks finished")


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


class RaySource:
    """A Ray Train worker's rows: its Ray Data shard of the stream :func:`dda_ray.pipeline.build_dataset`
    builds, in the pool's slot order; rank 0 makes the rounds with the student between epochs."""

    def __init__(self, cfg: Config, synthesizer: Synthesizer | None, rank: int, world_size: int, next_round: int | None = None, real_rows: int | None = None, shard=None):
        import ray.train

        self.cfg, self.rank, self.world_size, self.real_rows = cfg, rank, world_size, real_rows
        # this Train worker's shard; or the whole stream when the loop runs outside Ray Train (a Tune trial's own process)
        self.shard = ray.train.get_dataset_shard("train") if shard is None else shard
        if next_round is None:
            next_round = cfg.synthesis.init_rounds + len(bank_files(cfg.run_dir / "rounds"))
        # rank 0 makes and writes the rounds; other ranks only keep the round count in step
        self.rounds = StudentRounds(cfg, synthesizer if rank == 0 else None, next_round) if cfg.run.mode != "real_kd" else None
        self.shape = (cfg.data.image_size, cfg.data.image_size, 3)
        self.log_dir = cfg.run_dir / "stream" if cfg.run.stream_log else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pass_batches = None  # batches in the last whole pass this worker saw: sizes the next execution

    def _passes(self, batches_left: int | None) -> int:
        """Passes the next execution streams: enough for ``batches_left`` at the last whole pass's size."""
        return 1 if batches_left is None or not self.pass_batches else max(1, -(-batches_left // self.pass_batches))

    def _barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def prepare_epoch(self, epoch: int, distiller: Distiller) -> dict:
        from .data.pool_source import set_epoch_order

        self.epoch_started = time.time()
        _, synthesis_s = _timed_rounds(self.rounds, distiller)
        if self.rank == 0:
            set_epoch_order(self.cfg.run_dir, epoch, 0, self._passes(self.cfg.distill.steps_per_epoch))
        self._barrier()  # every rank's stream starts after the round is on disk and the order is set
        return {"synthesis_s": synthesis_s, **({"next_round": self.rounds.next_round} if self.rounds is not None else {})}

    def end_epoch(self, epoch: int) -> dict:
        """The pool's size and, in ``dda``, the augment/filter totals of this epoch's stream (read
        from the stages' logs)."""
        if self.rounds is None:
            return {"pool_rows": self.real_rows}
        dirs = [initial_bank_dir(self.cfg), *self.cfg.distill.extra_banks, self.cfg.run_dir / "rounds"]
        originals = sum(pq.ParquetFile(p).metadata.num_rows for d in dirs for p in bank_files(d))
        if self.cfg.run.mode != "dda":
            return {"pool_rows": originals}
        from .stages import read_stream_stats

        st = read_stream_stats(self.cfg.run_dir, since=self.epoch_started)
        stats = kept_stats(
            st["variations"], st["kept"], st["cache_hits"], st["parents"] - st["cache_hits"], st["filter_batches"], st["all_rejected_batches"], st["all_rejected_max_score"]
        )
        # the pool's kept variations: exact after one whole pass (steps_per_epoch null), else the stream's kept fraction of them
        k = self.cfg.augment.num_variations
        kept = st["kept"] if st["variations"] == originals * k else round(originals * k * (stats["kept_fraction"] if st["variations"] else 0.0))
        line = all_rejected_line(epoch + 1, stats) if self.rank == 0 else None
        return {"pool_rows": originals + kept, **stats, **({"log_lines": [line]} if line else {})}

    def batches(self, epoch: int):
        """This worker's rows in the pool's slot order; with ``steps_per_epoch`` set, passes repeat
        until the loop stops, each in a fresh order. An execution of the stream (re-lists the bank,
        reads cached variations, starts the actor pools) streams as many passes as the steps left
        need at the last whole pass's size (one while that is unknown); batches end with each pass
        all the same (:func:`~dda_ray.data.pool_source.per_pass`). With several workers an execution
        after the first may start before rank 0 has set its order; it then repeats the previous one's."""
        from .data.pool_source import per_pass, set_epoch_order
        from .pipeline import BankCollate
        from .runtime import append_jsonl

        log = self.log_dir / f"train-rank{self.rank}-epoch{epoch}.jsonl" if self.log_dir else None
        collate, size, steps = BankCollate(self.shape), self.cfg.distill.batch_size, self.cfg.distill.steps_per_epoch
        first, done = 0, 0
        while True:
            if first and self.rank == 0:  # the first execution's order was set in prepare_epoch
                set_epoch_order(self.cfg.run_dir, epoch, first, self._passes(None if steps is None else steps - done))
            counts: dict[int, int] = {}  # batches per pass of this execution
            for batch in per_pass(self.shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=1), size):
                p = int(batch["pass"][0])
                if counts and p not in counts:
                    self.pass_batches = counts[max(counts)]  # the pass before ended whole
                counts[p] = counts.get(p, 0) + 1
                b = collate(batch)
                if log is not None:
                    append_jsonl(log, {"t": time.time(), "pid": os.getpid(), "rows": len(b["ids"]), "ids": b["ids"], "pass": p})
                done += 1
                yield b["image"], b["label"]
            if counts:  # the execution ran to its end: its last pass was whole too
                self.pass_batches = counts[max(counts)]
            first = max(counts) + 1 if counts else first + 1
            if steps is None:
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
    from .data.crops import read_extra_banks

    parts = [read_bank(initial_bank_dir(cfg))] if cfg.synthesis.init_rounds > 0 or not cfg.distill.extra_banks else []
    extra = read_extra_banks(cfg.distill.extra_banks, teacher_fingerprint)
    return BankBatch.concat(parts + ([extra] if extra is not None else []))
