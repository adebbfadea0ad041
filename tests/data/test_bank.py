"""The synthetic image bank: Parquet rounds, their schema, and every refusal."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dda_ray.data.bank import BANK_SCHEMA, BankBatch, BankError, make_ids, num_rounds, read_bank, read_table, to_table, write_round


def make_batch(round_idx: int, n: int, seed: int, shape=(8, 8, 3), k: int = 10, d: int = 16) -> BankBatch:
    rng = np.random.default_rng(seed)
    return BankBatch(
        ids=make_ids(round_idx, seed, n),
        images=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        labels=rng.integers(0, k, n).astype(np.int64),
        teacher_logits=rng.standard_normal((n, k)).astype(np.float32),
        teacher_embedding=rng.standard_normal((n, d)).astype(np.float32),
        rounds=np.full(n, round_idx, dtype=np.int32),
        seeds=np.full(n, seed, dtype=np.int64),
    )


def assert_batches_equal(a: BankBatch, b: BankBatch):
    for f in BankBatch.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape, f
        assert np.array_equal(x, y), f
    assert a.images.dtype == np.uint8 and a.labels.dtype == np.int64
    assert a.teacher_logits.dtype == np.float32 and a.teacher_embedding.dtype == np.float32
    assert a.rounds.dtype == np.int32 and a.seeds.dtype == np.int64


def test_make_ids():
    assert make_ids(3, 42, 2).tolist() == ["r00003-s42-00000", "r00003-s42-00001"]


def test_write_two_rounds_and_read_them_back(tmp_path):
    bank = tmp_path / "bank"
    r1 = make_batch(1, 2, seed=11)
    r0 = make_batch(0, 3, seed=10)
    # written out of order: reading is still in round order
    p1 = write_round(bank, r1, 1)
    p0 = write_round(bank, r0, 0)
    assert p0 == bank / "round-00000.parquet" and p1 == bank / "round-00001.parquet"
    assert sorted(os.listdir(bank)) == ["round-00000.parquet", "round-00001.parquet"]  # no temp files left
    assert num_rounds(bank) == 2

    got = read_bank(bank)
    assert len(got) == 5
    assert_batches_equal(got, BankBatch.concat([r0, r1]))
    assert got.ids.tolist() == [f"r00000-s10-{i:05d}" for i in range(3)] + [f"r00001-s11-{i:05d}" for i in range(2)]
    assert got.rounds.tolist() == [0, 0, 0, 1, 1]
    assert len(set(got.ids.tolist())) == 5
    # a single file reads on its own
    assert_batches_equal(read_bank(p1), r1)


def test_files_are_plain_parquet(tmp_path):
    bank = tmp_path / "bank"
    r0, r1 = make_batch(0, 3, seed=1), make_batch(1, 2, seed=2)
    write_round(bank, r0, 0)
    write_round(bank, r1, 1)
    table = pq.read_table(bank / "round-00000.parquet")
    assert table.schema.remove_metadata().equals(BANK_SCHEMA)
    assert table.schema.metadata[b"dda_ray.bank"] == b"1"
    assert table.schema.metadata[b"image_shape"] == b"8,8,3"
    assert table.num_rows == 3
    rows = table.to_pylist()
    assert rows[1]["id"] == r0.ids[1]
    assert rows[1]["image"] == r0.images[1].tobytes()
    assert rows[1]["label"] == int(r0.labels[1])
    assert rows[1]["teacher_logits"] == r0.teacher_logits[1].tolist()
    assert rows[1]["teacher_embedding"] == r0.teacher_embedding[1].tolist()
    assert rows[1]["round"] == 0 and rows[1]["seed"] == 1
    # the directory reads as one dataset with plain pyarrow too
    whole = pq.read_table(bank)
    assert whole.num_rows == 5
    assert sorted(whole.column("id").to_pylist()) == sorted(r0.ids.tolist() + r1.ids.tolist())


def test_non_square_images_and_empty_round(tmp_path):
    bank = tmp_path / "bank"
    batch = make_batch(0, 2, seed=3, shape=(4, 6, 3), k=5, d=7)
    write_round(bank, batch, 0)
    got = read_bank(bank)
    assert got.images.shape == (2, 4, 6, 3)
    assert_batches_equal(got, batch)
    write_round(tmp_path / "empty", make_batch(0, 0, seed=4), 0)
    empty = read_bank(tmp_path / "empty")
    assert len(empty) == 0 and empty.images.shape == (0, 8, 8, 3)


def test_bank_with_an_empty_round_reads(tmp_path):
    bank = tmp_path / "bank"
    r0, r2 = make_batch(0, 3, seed=1), make_batch(2, 2, seed=3)
    write_round(bank, r0, 0)
    write_round(bank, make_batch(1, 0, seed=2), 1)
    write_round(bank, r2, 2)
    assert num_rounds(bank) == 3
    assert_batches_equal(read_bank(bank), BankBatch.concat([r0, r2]))


def test_rewriting_a_round_replaces_it(tmp_path):
    bank = tmp_path / "bank"
    write_round(bank, make_batch(0, 3, seed=1), 0)
    newer = make_batch(0, 2, seed=2)
    write_round(bank, newer, 0)
    assert os.listdir(bank) == ["round-00000.parquet"]
    assert_batches_equal(read_bank(bank), newer)


def test_foreign_parquet_is_refused(tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), bank / "round-00000.parquet")
    with pytest.raises(BankError, match="not a dda_ray bank file") as exc:
        read_bank(bank)
    assert "round-00000.parquet" in str(exc.value)


def test_bank_schema_without_metadata_is_refused(tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    pq.write_table(to_table(make_batch(0, 2, seed=1)).replace_schema_metadata(None), bank / "round-00000.parquet")
    with pytest.raises(BankError, match="not a dda_ray bank file"):
        read_bank(bank)


def test_missing_columns_are_refused(tmp_path):
    table = to_table(make_batch(0, 2, seed=1))
    table = table.drop_columns(["teacher_embedding"]).replace_schema_metadata(table.schema.metadata)
    path = tmp_path / "round-00000.parquet"
    pq.write_table(table, path)
    with pytest.raises(BankError, match="teacher_embedding"):
        read_table(path)


def test_bad_image_shape_metadata_is_refused(tmp_path):
    table = to_table(make_batch(0, 2, seed=1))
    path = tmp_path / "round-00000.parquet"
    pq.write_table(table.replace_schema_metadata({"dda_ray.bank": "1", "image_shape": "8,8"}), path)
    with pytest.raises(BankError, match="image_shape"):
        read_bank(path)


def test_corrupt_file_is_refused(tmp_path):
    bank = tmp_path / "bank"
    write_round(bank, make_batch(0, 2, seed=1), 0)
    (bank / "round-00001.parquet").write_bytes(os.urandom(512))
    with pytest.raises(BankError, match="corrupt or not Parquet") as exc:
        read_bank(bank)
    assert "round-00001.parquet" in str(exc.value)


def test_truncated_file_is_refused(tmp_path):
    path = write_round(tmp_path / "bank", make_batch(0, 4, seed=1), 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError):
        read_bank(tmp_path / "bank")


def test_empty_or_missing_bank_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a round")
    with pytest.raises(BankError, match="no bank files"):
        read_bank(tmp_path / "empty")
    with pytest.raises(BankError, match="no bank files"):
        read_bank(tmp_path / "missing")
    assert num_rounds(tmp_path / "missing") == 0


def test_provenance_round_trips_and_mismatches_are_refused(tmp_path):
    from dda_ray.data.bank import check_provenance, read_provenance

    prov = {"teacher": "abc123", "synthesis": "batch_size=4 g_steps=2 seed=0"}
    path = write_round(tmp_path, make_batch(0, 3, seed=0), 0, prov)
    assert read_provenance(path) == prov
    check_provenance(path, prov)  # same teacher and settings: accepted
    with pytest.raises(BankError, match=r"teacher: bank has 'abc123', this run has 'fff000'.*fresh directory"):
        check_provenance(path, {**prov, "teacher": "fff000"})
    legacy = write_round(tmp_path / "old", make_batch(0, 3, seed=0), 0)
    assert read_provenance(legacy) == {}  # files without provenance stay readable
    check_provenance(legacy, prov)
