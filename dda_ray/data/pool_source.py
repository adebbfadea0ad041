"""The epoch pool as a Ray Data datasource: what the Ray engine's stream reads.

Each execution of the stream re-lists the bank's round files, or reads the real subset, and yields
the pool's rows in the slot order :mod:`dda_ray.data.pool` defines for (seed, epoch, pass): the
order the local engine trains in too. The trainer writes which (epoch, pass) comes next, and how
many passes the execution streams back to back (:func:`write_epoch_order`), before it iterates;
every row carries its ``pass``, and :func:`per_pass` cuts the trainer's batches at each pass's end,
so an execution of several passes gives the batches one execution per pass would. (Each execution
starts the stream's actor pools anew: an epoch of ``distill.steps_per_epoch`` steps that takes more
than one pass over the pool is, from its second execution on, one execution.)
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import config_from_dict
from ..runtime import write_text_atomic
from .bank import bank_files, read_table
from .pool import ORIGINAL, batched, slot_order, split_slots

ORDER_FILE = "epoch_order.json"


def write_epoch_order(run_dir: str | Path, epoch: int, pass_: int, passes: int = 1) -> None:
    """Which (epoch, pass) the next execution of the stream starts with, and how many passes it
    streams (``pass_``, ``pass_ + 1``, ...): the trainer writes it before it iterates, the datasource
    reads it to seed each pass's order (see :mod:`dda_ray.data.pool`)."""
    write_text_atomic(Path(run_dir) / ORDER_FILE, json.dumps({"epoch": epoch, "pass": pass_, "passes": max(1, int(passes))}))


def read_epoch_order(run_dir: str | Path) -> tuple[int, int, int]:
    """(epoch, first pass, number of passes) of the next execution."""
    path = Path(run_dir) / ORDER_FILE
    if not path.exists():
        return 0, 0, 1
    state = json.loads(path.read_text())
    return int(state["epoch"]), int(state["pass"]), int(state.get("passes", 1))


def per_pass(batches, size: int):
    """Numpy batches of the stream (a ``pass`` column, rows in stream order) -> batches of ``size``
    rows that never mix two passes: each pass ends with its own (possibly short) batch, as when
    every pass was an execution of its own."""
    pending, current = None, None
    for batch in batches:
        passes = np.asarray(batch["pass"])
        for seg in np.split(np.arange(len(passes)), np.flatnonzero(np.diff(passes)) + 1):
            if not len(seg):
                continue
            piece = {k: np.asarray(v)[seg] for k, v in batch.items()}
            if pending is not None and int(passes[seg[0]]) != current:
                yield pending
                pending = None
            current = int(passes[seg[0]])
            pending = piece if pending is None else {k: np.concatenate([pending[k], piece[k]]) for k in piece}
            while pending is not None and len(pending["pass"]) >= size:
                yield {k: v[:size] for k, v in pending.items()}
                pending = {k: v[size:] for k, v in pending.items()} if len(pending["pass"]) > size else None
    if pending is not None:
        yield pending


def bank_pool(dirs: list[str]) -> tuple[pa.Table, tuple[int, int, int]]:
    """Every bank row under ``dirs`` (round files in order), listed now: rounds made during training join."""
    tables, shape = [], None
    for d in dirs:
        for path in bank_files(d):
            table, shape = read_table(path)
            if table.num_rows:
                tables.append(table.select(["id", "image", "label", "teacher_embedding", "round"]))
    if not tables:
        raise RuntimeError(f"no bank rows under {dirs}")
    return pa.concat_tables(tables), shape


def real_pool(cfg_dict: dict) -> tuple[pa.Table, tuple[int, int, int]]:
    """The real training split (real_kd) as a pool table (decoded once into ``data.cache_dir``)."""
    from . import load_data

    cfg = config_from_dict(cfg_dict)
    data = load_data(cfg.data, progress=False).train.subset(cfg.data.train_subset, cfg.run.seed)
    n = len(data)
    table = pa.table(
        {
            "id": pa.array([f"real-{i:06d}" for i in range(n)]),
            "image": pa.array([img.tobytes() for img in data.images], pa.binary()),
            "label": pa.array(data.labels.astype(np.int64)),
        }
    )
    return table, tuple(data.images.shape[1:])


def pool_blocks(load, run_dir: str, seed: int, num_variations: int, block_rows: int):
    """The read task's body: the pool in the slot order of each pass of this execution, in blocks of slots.

    A slot row carries its parent's columns plus ``parent_id``, ``variation`` (-1: the
    original; k: the augment stage makes the k-th variation of the parent) and ``pass``."""
    table, shape = load()
    epoch, first, passes = read_epoch_order(run_dir)
    meta = {"image_shape": ",".join(map(str, shape))}
    for pass_ in range(first, first + passes):
        order = slot_order(table.num_rows, num_variations, seed, epoch, pass_)
        for chunk in batched(order, block_rows):
            rows, var = split_slots(chunk, num_variations)
            block = table.take(pa.array(rows))
            parents = block.column("id").to_pylist()
            cols = {
                "id": pa.array([p if k == ORIGINAL else f"{p}-v{k}" for p, k in zip(parents, var.tolist(), strict=True)]),
                "parent_id": block.column("id"),
                "variation": pa.array(var),
                "pass": pa.array(np.full(len(chunk), pass_, dtype=np.int64)),
            }
            for name in block.column_names:
                if name != "id":
                    cols[name] = block.column(name)
            yield pa.table(cols).replace_schema_metadata(meta)


def make_pool_datasource(load, run_dir: str, seed: int, num_variations: int, block_rows: int = 256):
    """A Ray Data datasource over the epoch pool, read anew at every execution of the plan (each
    epoch and each pass): the bank is re-listed, so rounds made during training join, and the slot
    order is this (epoch, pass)'s. One read task streams the blocks in order."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class EpochPoolDatasource(Datasource):
        def get_name(self) -> str:
            return "DDAEpochPool"

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None, **_):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            read = partial(pool_blocks, load, str(run_dir), seed, num_variations, block_rows)
            return [ReadTask(read, meta, per_task_row_limit=per_task_row_limit)]

    return EpochPoolDatasource()
