"""The epoch pool as a Ray Data datasource: what the Ray engine's stream reads.

Each execution of the stream re-lists the bank's round files, or reads the real subset, and yields
the pool's rows in the slot order :mod:`dda_ray.data.pool` defines for (seed, epoch, pass): the
order the local engine trains in too. Which (epoch, pass) comes next, and how many passes the
execution streams back to back, travels with the stream: the trainer sets it on the run's
:class:`EpochOrder` actor (:func:`set_epoch_order`) before it iterates, and the read task asks that
actor (wherever on the cluster either runs: no file on a disk the nodes may not share);
every row carries its ``pass``, and :func:`per_pass` cuts the trainer's batches at each pass's end,
so an execution of several passes gives the batches one execution per pass would. (Each execution
starts the stream's actor pools anew: an epoch of ``distill.steps_per_epoch`` steps that takes more
than one pass over the pool is, from its second execution on, one execution.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import config_from_dict
from ..data.bank import bank_files, read_table
from ..data.pool import ORIGINAL, batched, slot_order, split_slots

Order = tuple[int, int, int]  # (epoch, first pass, number of passes) of the stream's next execution


class EpochOrder:
    """The run's stream order, held by one Ray actor (:func:`start_epoch_order`): which (epoch,
    pass) the next execution of the stream starts with and how many passes it streams (``pass``,
    ``pass + 1``, ...). The trainer sets it before it iterates; the datasource's read task gets it
    to seed each pass's order (see :mod:`dda_ray.data.pool`)."""

    def __init__(self) -> None:
        self.order: Order = (0, 0, 1)

    def set(self, epoch: int, pass_: int, passes: int = 1) -> Order:
        self.order = (int(epoch), int(pass_), max(1, int(passes)))
        return self.order

    def get(self) -> Order:
        return self.order


def epoch_order_name(run_dir: str | Path) -> str:
    """The run's EpochOrder actor name (in the job's namespace): one per run directory."""
    return "dda_epoch_order_" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


_KEEPERS: dict = {}  # actor name -> the handle that keeps the run's EpochOrder alive (the driver's)


def start_epoch_order(run_dir: str | Path):
    """Start (or find) the run's EpochOrder actor on this process's node (the driver's, which
    outlives the workers: a run loses its driver's node only with the driver). The affinity is hard:
    a soft one lets Ray place the actor on any node while this one is busy starting workers, and a
    run whose order lives on an augment or train node hangs when that node is lost (seen on a
    three-node cluster). Restarted if its process dies; set again by the trainer every epoch."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    name = epoch_order_name(run_dir)
    actor = ray.remote(EpochOrder).options(name=name, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here)
    _KEEPERS[name] = actor.remote()  # a named actor lives while a handle does: this process keeps one
    return _KEEPERS[name]


def set_epoch_order(run_dir: str | Path, epoch: int, pass_: int, passes: int = 1) -> Order:
    """Set the next execution's order on the run's EpochOrder actor (the trainer, before it iterates)."""
    import ray

    return ray.get(ray.get_actor(epoch_order_name(run_dir)).set.remote(epoch, pass_, passes))


def read_epoch_order(run_dir: str | Path) -> Order:
    """The next execution's order, from the run's EpochOrder actor (the read task, on any node)."""
    import ray

    return tuple(ray.get(ray.get_actor(epoch_order_name(run_dir)).get.remote()))


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
    from ..data import load_data

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


def pool_blocks(load, order: Callable[[], Order], seed: int, num_variations: int, block_rows: int):
    """The read task's body: the pool in the slot order of each pass of this execution (``order()``:
    its (epoch, first pass, passes)), in blocks of slots.

    A slot row carries its parent's columns plus ``parent_id``, ``variation`` (-1: the
    original; k: the augment stage makes the k-th variation of the parent) and ``pass``."""
    table, shape = load()
    epoch, first, passes = order()
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
    order is this (epoch, pass)'s, asked of the run's EpochOrder actor (:func:`start_epoch_order`
    must have started it). One read task streams the blocks in order."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class EpochPoolDatasource(Datasource):
        def get_name(self) -> str:
            return "DDAEpochPool"

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None, **_):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            read = partial(pool_blocks, load, partial(read_epoch_order, str(run_dir)), seed, num_variations, block_rows)
            return [ReadTask(read, meta, per_task_row_limit=per_task_row_limit)]

    return EpochPoolDatasource()
