"""The epoch pool and its order: what the KD loop sees in one epoch, in what order, on both engines.

The pool of an epoch is every bank row (initial rounds, then the rounds made with the student,
in file order) and, in ``dda`` mode, each row's ``K = augment.num_variations`` variations that the
filter keeps. It is addressed by *slots*: slot ``s`` is row ``s // (K + 1)``, copy
``s % (K + 1) - 1`` (``-1``: the original, ``k >= 0``: its k-th variation).

Every pass over the pool visits the slots in a fresh random permutation seeded by
``(run seed, epoch, pass)``; rejected variations drop out of that sequence. So the order is a
uniform shuffle of the whole pool — a batch mixes all rounds, and a variation meets its parent in
the same batch no more often than any other row — without buffering the stream: the Ray engine's
datasource emits slots in this order *before* augmentation (each augment call makes the one
variation a slot asks for, from the per-image cache), and the local engine indexes its in-memory
pool with the same permutation. Same seed, same batches, on either engine, and a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ORIGINAL = -1


def slot_order(num_rows: int, num_variations: int, seed: int, epoch: int, pass_: int = 0) -> np.ndarray:
    """The slots of a ``num_rows``-row pool in the order pass ``pass_`` of ``epoch`` visits them."""
    from ..runtime import derive_seed

    n = num_rows * (num_variations + 1)
    return np.random.default_rng(derive_seed(seed, "epoch_order", epoch, pass_)).permutation(n)


def split_slots(slots: np.ndarray, num_variations: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, variation) of each slot; variation ``-1`` is the original."""
    slots = np.asarray(slots, dtype=np.int64)
    return slots // (num_variations + 1), slots % (num_variations + 1) - 1


def batched(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive runs of ``batch_size`` (the last may be short)."""
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


def kept_slots(order: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """``order`` without the variations the filter rejected (``kept``: (rows, K) bool, or None
    when the pool holds originals only)."""
    if kept is None or kept.shape[1] == 0:
        return order
    rows, var = split_slots(order, kept.shape[1])
    ok = var == ORIGINAL
    ok[~ok] = kept[rows[~ok], var[~ok]]
    return order[ok]
