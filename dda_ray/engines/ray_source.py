"""The Ray engine's row source: a Ray Train worker's shard of the Ray Data stream
(:func:`dda_ray.engines.ray_train.build_dataset`), in the epoch pool's slot order, and the collate that turns
its numpy batches into tensors."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from ..augment.filter import all_rejected_line
from ..config import Config
from ..data.bank import bank_files, decode_images
from ..distill.kd import Distiller
from ..distill.sources import StudentRounds, _timed_rounds, kept_stats
from ..synthesis.initial_bank import initial_bank_dir
from ..synthesis.synthesizer import Synthesizer


class RaySource:
    """A Ray Train worker's rows: its Ray Data shard of the stream :func:`dda_ray.engines.ray_train.build_dataset`
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
        from .pool_source import set_epoch_order

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
        all the same (:func:`~dda_ray.engines.pool_source.per_pass`). With several workers an execution
        after the first may start before rank 0 has set its order; it then repeats the previous one's."""
        from ..runtime import append_jsonl
        from .pool_source import per_pass, set_epoch_order

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


class BankCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> uint8 NHWC image tensor, int64 labels, and the row ids."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape

    def __call__(self, batch: dict) -> dict:
        images = batch["image"]
        if images.dtype == object:  # raw bytes from the bank
            images = decode_images(images, self.shape)
        return {
            "image": torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)),  # Ray's arrays are read-only
            "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64).copy()),
            "ids": [str(i) for i in batch["id"]],
        }
