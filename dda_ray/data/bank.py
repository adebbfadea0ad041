"""The synthetic image bank: one Parquet file per synthesis round.

Schema (``BANK_SCHEMA``; file-level metadata ``dda_ray.bank = "1"`` and ``image_shape = "H,W,C"``):

=================  ===================  ==================================================
column             type                 meaning
=================  ===================  ==================================================
id                 string               ``r{round:05d}-s{seed}-{index:05d}``, unique in a bank
image              binary               raw uint8 HWC pixels (``image_shape`` in metadata)
label              int64                target class the image was synthesised for
teacher_logits     list<float32>        teacher logits on the image (soft labels)
teacher_embedding  list<float32>        teacher pooled embedding (cosine filter reference)
round              int32                synthesis round (initial bank rounds first)
seed               int64                seed of the round
=================  ===================  ==================================================

Rounds also carry provenance metadata (``provenance.teacher``: a hash of the teacher's weights;
``provenance.synthesis``: the settings and seed that made them), so a bank shared between runs
(``synthesis.bank_dir``) is never silently reused with another teacher or budget: its stored
teacher embeddings are what the cosine filter compares against.

Files are named ``round-{round:05d}.parquet`` and written to a temporary name then renamed,
so a reader (Ray Data included, which reads the directory as one dataset) never sees a
half-written round. Appending a round means writing one more file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime import atomic_write

BANK_VERSION = "1"
BANK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("teacher_logits", pa.list_(pa.float32())),
        ("teacher_embedding", pa.list_(pa.float32())),
        ("round", pa.int32()),
        ("seed", pa.int64()),
    ]
)


class BankError(RuntimeError):
    """A bank file is missing, corrupt, or not a dda_ray bank."""


@dataclass
class BankBatch:
    """Columns of a bank (or of a slice of one) as numpy arrays."""

    ids: np.ndarray  # (N,) str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    teacher_logits: np.ndarray  # (N, K) float32
    teacher_embedding: np.ndarray  # (N, D) float32
    rounds: np.ndarray  # (N,) int32
    seeds: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(batches: list[BankBatch]) -> BankBatch:
        # an empty round's list columns have no known width ((0, 0) arrays): leave it out
        batches = [b for b in batches if len(b)] or batches[:1]
        return BankBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in BankBatch.__dataclass_fields__))


def make_ids(round_idx: int, seed: int, n: int) -> np.ndarray:
    return np.array([f"r{round_idx:05d}-s{seed}-{i:05d}" for i in range(n)])


def decode_images(column, shape: tuple[int, int, int]) -> np.ndarray:
    """Binary column (pyarrow array or numpy object array of bytes) -> (N, H, W, C) uint8."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    if not values:
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), *shape)


PROVENANCE_PREFIX = "provenance."


def to_table(batch: BankBatch, provenance: dict[str, str] | None = None) -> pa.Table:
    shape = batch.images.shape[1:]
    table = pa.table(
        {
            "id": pa.array(batch.ids.astype(str), pa.string()),
            "image": pa.array([img.tobytes() for img in np.ascontiguousarray(batch.images)], pa.binary()),
            "label": pa.array(batch.labels.astype(np.int64)),
            "teacher_logits": pa.array(list(batch.teacher_logits.astype(np.float32)), pa.list_(pa.float32())),
            "teacher_embedding": pa.array(list(batch.teacher_embedding.astype(np.float32)), pa.list_(pa.float32())),
            "round": pa.array(batch.rounds.astype(np.int32)),
            "seed": pa.array(batch.seeds.astype(np.int64)),
        },
        schema=BANK_SCHEMA,
    )
    meta = {"dda_ray.bank": BANK_VERSION, "image_shape": ",".join(map(str, shape))}
    meta.update({PROVENANCE_PREFIX + k: str(v) for k, v in (provenance or {}).items()})
    return table.replace_schema_metadata(meta)


def write_round(bank_dir: str | Path, batch: BankBatch, round_idx: int, provenance: dict[str, str] | None = None) -> Path:
    """Append one round to the bank (atomically: temp file, then rename)."""
    bank_dir = Path(bank_dir)
    bank_dir.mkdir(parents=True, exist_ok=True)
    path = bank_dir / f"round-{round_idx:05d}.parquet"
    table = to_table(batch, provenance)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def round_of(path: str | Path) -> int:
    """The round index in a bank file's name (``round-00012.parquet`` -> 12; see :func:`write_round`)."""
    return int(Path(path).stem.split("-")[1])


def bank_files(bank_dir: str | Path) -> list[Path]:
    bank_dir = Path(bank_dir)
    if not bank_dir.exists():
        return []
    if bank_dir.is_file():
        return [bank_dir]
    return sorted(bank_dir.glob("round-*.parquet"))


def read_provenance(path: str | Path) -> dict[str, str]:
    """The provenance metadata of one bank file (empty for files written before it existed)."""
    path = Path(path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise BankError(f"bank file {path} is corrupt or not Parquet: {e}") from e
    _image_shape(meta, path)
    n = len(PROVENANCE_PREFIX)
    return {k.decode()[n:]: v.decode() for k, v in meta.items() if k.decode().startswith(PROVENANCE_PREFIX)}


def check_provenance(path: str | Path, expected: dict[str, str]) -> None:
    """Refuse a bank file made by another teacher or with other synthesis settings."""
    found = read_provenance(path)
    diff = {k: (found[k], v) for k, v in expected.items() if k in found and found[k] != v}
    if diff:
        what = "; ".join(f"{k}: bank has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        raise BankError(
            f"bank file {path} was made differently ({what}). Point synthesis.bank_dir at a fresh directory or delete {Path(path).parent}."
        )


def _image_shape(meta: dict | None, path: Path) -> tuple[int, int, int]:
    meta = meta or {}
    if meta.get(b"dda_ray.bank") != BANK_VERSION.encode():
        raise BankError(f"{path} is not a dda_ray bank file (missing dda_ray.bank={BANK_VERSION} metadata)")
    try:
        h, w, c = (int(v) for v in meta[b"image_shape"].decode().split(","))
    except (KeyError, ValueError) as e:
        raise BankError(f"{path}: bank metadata has no valid image_shape") from e
    return h, w, c


def read_table(path: str | Path) -> tuple[pa.Table, tuple[int, int, int]]:
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise BankError(f"bank file {path} is corrupt or not Parquet: {e}") from e
    shape = _image_shape(table.schema.metadata, path)
    missing = [f.name for f in BANK_SCHEMA if f.name not in table.column_names]
    if missing:
        raise BankError(f"bank file {path} lacks column(s) {missing}; expected the schema in dda_ray/data/bank.py")
    return table, shape


def from_table(table: pa.Table, shape: tuple[int, int, int]) -> BankBatch:
    def fixed(col: str) -> np.ndarray:
        arr = table.column(col).combine_chunks()
        n = len(arr)
        if n == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return arr.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1)

    return BankBatch(
        ids=np.asarray(table.column("id").to_pylist()),
        images=decode_images(table.column("image").combine_chunks(), shape),
        labels=table.column("label").to_numpy().astype(np.int64),
        teacher_logits=fixed("teacher_logits"),
        teacher_embedding=fixed("teacher_embedding"),
        rounds=table.column("round").to_numpy().astype(np.int32),
        seeds=table.column("seed").to_numpy().astype(np.int64),
    )


def read_bank(bank_dir: str | Path) -> BankBatch:
    """Every round of a bank, concatenated in round order."""
    files = bank_files(bank_dir)
    if not files:
        raise BankError(f"no bank files (round-*.parquet) under {bank_dir}")
    return BankBatch.concat([from_table(*read_table(f)) for f in files])


def num_rounds(bank_dir: str | Path) -> int:
    return len(bank_files(bank_dir))
