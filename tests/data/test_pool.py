"""The epoch pool's order (dda_ray.data.pool): what both engines' batches are drawn from.

test_pipeline checks that the Ray stream *is* this order (row ids, epoch 0) and that the local
engine trains on the same batches; these tests check the order itself mixes like uniform sampling.
"""

import numpy as np
import pytest

from dda_ray.data.pool import ORIGINAL, batched, kept_slots, slot_order, split_slots


def test_slot_order_is_a_permutation_seeded_by_run_epoch_and_pass():
    a = slot_order(10, 2, seed=0, epoch=0, pass_=0)
    assert sorted(a.tolist()) == list(range(30))
    assert np.array_equal(a, slot_order(10, 2, 0, 0, 0))  # same (seed, epoch, pass): same order (exact resume)
    for other in (slot_order(10, 2, 1, 0, 0), slot_order(10, 2, 0, 1, 0), slot_order(10, 2, 0, 0, 1)):
        assert not np.array_equal(a, other)  # a fresh order every epoch and every pass
    rows, var = split_slots(a, 2)
    assert sorted(zip(rows.tolist(), var.tolist(), strict=True)) == [(r, k) for r in range(10) for k in (ORIGINAL, 0, 1)]


def test_kept_slots_drops_exactly_the_rejected_variations_and_keeps_the_order():
    order = slot_order(6, 2, 0, 0)
    kept = np.array([[True, False]] * 3 + [[False, False]] * 3)
    out = kept_slots(order, kept)
    rows, var = split_slots(out, 2)
    assert len(out) == 6 + 3  # every original, three kept variations
    assert all(v == ORIGINAL or kept[r, v] for r, v in zip(rows, var, strict=True))
    assert out.tolist() == [s for s in order.tolist() if s in set(out.tolist())]
    assert np.array_equal(kept_slots(order, None), order)


@pytest.mark.parametrize("keep_rate", [1.0, 0.7])
def test_batches_mix_rounds_and_parents_like_uniform_sampling(keep_rate):
    """20 rounds of 48 images, 2 variations each, batch 64, five passes. Under uniform sampling of
    the pool a batch holds E = R * (1 - (1 - n_r / N)^B) distinct rounds (~19 of 20 here; the old
    bank-order stream held 1-4), and a variation shares its parent's batch with probability
    (B - 1) / (N - 1) (~2 %; the old stream put them side by side)."""
    rounds, per_round, k, bs = 20, 48, 2, 64
    rng = np.random.default_rng(0)
    kept = rng.random((rounds * per_round, k)) < keep_rate
    round_of_row = np.repeat(np.arange(rounds), per_round)
    distinct, together, variations = [], 0, 0
    for p in range(5):
        order = kept_slots(slot_order(rounds * per_round, k, seed=3, epoch=0, pass_=p), kept)
        n = len(order)
        for b in batched(order, bs):
            rows, var = split_slots(b, k)
            if len(b) == bs:
                distinct.append(len(set(round_of_row[rows].tolist())))
            originals = set(rows[var == ORIGINAL].tolist())
            together += sum(r in originals for r in rows[var != ORIGINAL].tolist())
            variations += int((var != ORIGINAL).sum())
    share = per_round * (1 + k * keep_rate) / n  # a round's share of the pool
    expected_rounds = rounds * (1 - (1 - share) ** bs)
    assert np.mean(distinct) == pytest.approx(expected_rounds, abs=0.5)
    expected_rate = (bs - 1) / (n - 1)
    assert together / variations == pytest.approx(expected_rate, rel=0.5)


def test_one_execution_of_several_passes_streams_what_one_execution_per_pass_would(tmp_path):
    """The Ray stream's read task with ``passes`` > 1 (dda_ray.engines.pool_source): pass after pass, each in
    its own order, each row tagged with its pass; per_pass cuts the trainer's batches at every pass's end,
    so the batches are those of one execution per pass, whatever the sizes of the batches Ray hands over."""
    import pyarrow as pa

    from dda_ray.engines.pool_source import EpochOrder, per_pass, pool_blocks

    table = pa.table({"id": [f"r{i}" for i in range(7)], "image": [bytes([i]) * 3 for i in range(7)], "label": list(range(7))})
    order = EpochOrder()  # the actor's class, in this process

    def stream(first, passes):
        order.set(epoch=3, pass_=first, passes=passes)
        return pa.concat_tables(list(pool_blocks(lambda: (table, (1, 1, 3)), order.get, 0, 2, block_rows=5))).to_pydict()

    single = [stream(p, 1) for p in range(3)]
    multi = stream(0, 3)
    assert multi["pass"] == [0] * 21 + [1] * 21 + [2] * 21
    assert multi["id"] == [i for s in single for i in s["id"]]
    assert single[0]["id"] != single[1]["id"] and sorted(single[0]["id"]) == sorted(single[1]["id"])

    rng = np.random.default_rng(0)
    rows = {k: np.asarray(v, dtype=object if k == "image" else None) for k, v in multi.items()}
    ray_batches, i = [], 0
    while i < 63:  # Ray's batches straddle passes and have any size
        n = int(rng.integers(1, 12))
        ray_batches.append({k: v[i : i + n] for k, v in rows.items()})
        i += n
    got = [(b["pass"].tolist(), b["id"].tolist()) for b in per_pass(ray_batches, 4)]
    expected = [([p] * len(ids), ids) for p, s in enumerate(single) for ids in (s["id"][j : j + 4] for j in range(0, 21, 4))]
    assert got == expected  # 4, 4, 4, 4, 4, 1 per pass: no batch mixes two passes
