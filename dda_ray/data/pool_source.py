"""The epoch pool as a Ray Data datasource: what the Ray engine's stream reads.

Each execution of the stream (one per epoch pass) re-lists the bank's round files, or reads the
real subset, and yields the pool's rows in the slot order :mod:`dda_ray.data.pool` defines for
(seed, epoch, pass): the order the local engine trains in too. The trainer writes which (epoch,
pass) comes next (:func:`write_epoch_order`) before it iterates.
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


def write_epoch_order(run_dir: str | Path, epoch: int, pass_: int) -> None:
    """Which (epoch, pass) the next execution of the stream is: the trainer writes it before it
    iterates, the datasource reads it to seed that pass's order (see :mod:`dda_ray.data.pool`)."""
    write_text_atomic(Path(run_dir) / ORDER_FILE, json.dumps({"epoch": epoch, "pass": pass_}))


def read_epoch_order(run_dir: str | Path) -> tuple[int, int]:
    path = Path(run_dir) / ORDER_FILE
    if not path.exists():
        return 0, 0
    state = json.loads(path.read_text())
    return int(state["epoch"]), int(state["pass"])


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
    """The read task's body: the pool in this (epoch, pass)'s slot order, in blocks of slots.

    A slot row carries its parent's columns plus ``parent_id`` and ``variation`` (-1: the
    original; k: the augment stage makes the k-th variation of the parent)."""
    table, shape = load()
    epoch, pass_ = read_epoch_order(run_dir)
    order = slot_order(table.num_rows, num_variations, seed, epoch, pass_)
    meta = {"image_shape": ",".join(map(str, shape))}
    for chunk in batched(order, block_rows):
        rows, var = split_slots(chunk, num_variations)
        block = table.take(pa.array(rows))
        parents = block.column("id").to_pylist()
        cols = {
            "id": pa.array([p if k == ORIGINAL else f"{p}-v{k}" for p, k in zip(parents, var.tolist(), strict=True)]),
            "parent_id": block.column("id"),
            "variation": pa.array(var),
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
