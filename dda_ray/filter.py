"""The DDA cosine filter: keep a variation iff the teacher still sees it like its original.

Each variation is embedded by the teacher (its pooled penultimate features); the reference is
its original's embedding, taken from the bank's ``teacher_embedding`` column (carried by the
Augmenter as ``parent_embedding``) or recomputed from the parent image. A variation is kept iff
``cos(variation, original) >= filter.threshold``; originals (``variation == -1``) always pass
with score 1. Every row gets ``score`` and ``kept``; a :class:`FilterReport` per batch records the
kept fraction and a score histogram over [-1, 1].
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import ORIGINAL, _writable, decode_image_column, stack_vector_column
from .config import FilterConfig
from .data.transforms import Normalize, to_float

__all__ = ["AllRejectedError", "AllRejectedWarning", "CheckpointCosineFilter", "CosineFilter", "FilterReport", "embed_images"]

log = logging.getLogger(__name__)


class AllRejectedWarning(UserWarning):
    """The filter rejected every variation of a batch (``filter.on_all_rejected = "warn"``)."""


class AllRejectedError(RuntimeError):
    """The filter rejected every variation of a batch (``filter.on_all_rejected = "error"``)."""


@dataclass
class FilterReport:
    """Per-batch (or merged) filter statistics over variations only (originals are not counted)."""

    n_variations: int = 0
    n_kept: int = 0
    score_sum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))
    bin_edges: np.ndarray = field(default_factory=lambda: np.linspace(-1.0, 1.0, 11))

    @classmethod
    def from_scores(cls, scores: np.ndarray, kept: np.ndarray, bins: int = 10) -> FilterReport:
        hist, edges = np.histogram(np.clip(scores, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
        return cls(int(len(scores)), int(np.sum(kept)), float(np.sum(scores)), hist.astype(np.int64), edges)

    @property
    def kept_fraction(self) -> float:
        """Kept / variations; 1.0 for a batch without variations (nothing was rejected)."""
        return self.n_kept / self.n_variations if self.n_variations else 1.0

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.n_variations if self.n_variations else float("nan")

    def merge(self, other: FilterReport) -> FilterReport:
        if len(other.hist) != len(self.hist):
            raise ValueError("cannot merge filter reports with different histogram bins")
        return FilterReport(
            self.n_variations + other.n_variations, self.n_kept + other.n_kept, self.score_sum + other.score_sum, self.hist + other.hist, self.bin_edges
        )

    def to_dict(self) -> dict:
        """Flat, JSON/MLflow-friendly numbers (``hist`` as a list of counts per bin)."""
        return {
            "n_variations": self.n_variations,
            "n_kept": self.n_kept,
            "kept_fraction": self.kept_fraction,
            "mean_score": self.mean_score if self.n_variations else None,
            "hist": self.hist.tolist(),
            "bin_edges": [round(float(e), 6) for e in self.bin_edges],
        }


class CosineFilter:
    """Teacher-embedding cosine filter over Augmenter batches; usable as a Ray Data actor class.

    Args:
        cfg: the ``filter`` section (threshold, on_all_rejected, reference, hist_bins).
        teacher: a classifier whose ``forward(x, return_features=True)`` returns ``.embedding``.
        normalize: the teacher's input normalisation (a ``Normalize`` or a ``(mean, std)`` pair).
        device: where the teacher runs.
        batch_size: images per teacher forward.
        drop_rejected: return only kept rows (originals included); by default every row is
            returned with its ``kept`` flag (image grids want the rejected ones too).
        image_shape: (H, W, C) of byte-encoded images (None: square RGB).
    """

    def __init__(
        self,
        cfg: FilterConfig,
        teacher: nn.Module,
        normalize: Normalize | tuple[Sequence[float], Sequence[float]],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        drop_rejected: bool = False,
        image_shape: Sequence[int] | None = None,
    ):
        cfg.validate("filter")
        self.cfg = cfg
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        self.normalize = normalize if isinstance(normalize, Normalize) else Normalize(*normalize)
        self.batch_size = batch_size
        self.drop_rejected = drop_rejected
        self.image_shape = tuple(image_shape) if image_shape else None
        self.last_report: FilterReport | None = None
        self.total_report = FilterReport.from_scores(np.zeros(0), np.zeros(0, bool), cfg.hist_bins)

    @classmethod
    def from_checkpoint(
        cls,
        cfg: FilterConfig,
        checkpoint: str | Path,
        arch: str,
        num_classes: int,
        **kwargs,
    ) -> CosineFilter:
        """Load the teacher from a project checkpoint (normalisation from its meta.json unless mean=/std= are given)."""
        return CheckpointCosineFilter(cfg, checkpoint, arch, num_classes, **kwargs)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Teacher pooled embeddings (N, D) float32 of uint8 NHWC images."""
        outs = []
        for s in range(0, len(images), self.batch_size):
            x = self.normalize(to_float(_writable(images[s : s + self.batch_size])).to(self.device))
            outs.append(self.teacher(x, return_features=True).embedding.float().cpu())
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(outs).numpy()

    @staticmethod
    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise cosine similarity of two (N, D) arrays."""
        if len(a) == 0:
            return np.zeros(0, dtype=np.float32)
        return F.cosine_similarity(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), dim=1, eps=1e-8).numpy()

    def _reference(self, batch: dict, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Original embeddings for the variation rows ``rows``."""
        if self.cfg.reference == "auto" and "parent_embedding" in batch:
            return stack_vector_column(batch["parent_embedding"])[rows]
        if "parent_image" in batch:
            parents, _ = decode_image_column(batch["parent_image"], self.image_shape)
            return self.embed(parents[rows])
        variation = np.asarray(batch.get("variation", np.zeros(len(images), np.int64)))
        ids = np.asarray(batch["id"]).astype(str) if "id" in batch else None
        if ids is not None and "parent_id" in batch and np.any(variation == ORIGINAL):
            where = {pid: i for i, pid in enumerate(ids) if variation[i] == ORIGINAL}
            parent_ids = np.asarray(batch["parent_id"]).astype(str)[rows]
            missing = sorted({p for p in parent_ids if p not in where})
            if not missing:
                return self.embed(images[[where[p] for p in parent_ids]])
        raise KeyError(
            "the cosine filter needs each variation's original: a parent_embedding column (filter.reference=auto and the bank's "
            "teacher_embedding), a parent_image column (Augmenter(with_parent_image=True)), or the originals in the same batch "
            "(Augmenter(include_original=True))"
        )

    def score(self, images: np.ndarray, parent_embedding: np.ndarray | None = None, parent_images: np.ndarray | None = None) -> np.ndarray:
        """Cosine of each image's teacher embedding with its original's (given, or computed from ``parent_images``)."""
        if parent_embedding is None:
            if parent_images is None:
                raise ValueError("score() needs parent_embedding or parent_images")
            parent_embedding = self.embed(parent_images)
        return self.cosine(self.embed(images), parent_embedding)

    def filter(self, batch: dict) -> tuple[dict, FilterReport]:
        """Add ``score`` (float32) and ``kept`` (bool) to a batch; report over its variations."""
        images, _ = decode_image_column(batch["image"], self.image_shape)
        n = len(images)
        variation = np.asarray(batch.get("variation", np.zeros(n, np.int64)), dtype=np.int64)
        is_var = variation != ORIGINAL
        rows = np.flatnonzero(is_var)
        score = np.ones(n, dtype=np.float32)
        if len(rows):
            ref = self._reference(batch, rows, images)
            score[rows] = self.cosine(self.embed(images[rows]), ref)
        kept = ~is_var | (score >= self.cfg.threshold)
        report = FilterReport.from_scores(score[rows], kept[rows], self.cfg.hist_bins)
        if report.n_variations and report.n_kept == 0:
            msg = (
                f"the cosine filter rejected all {report.n_variations} variations of this batch: filter.threshold = "
                f"{self.cfg.threshold} is above every score (max {float(score[rows].max()):.3f}); lower filter.threshold or augment.strength"
            )
            if self.cfg.on_all_rejected == "error":
                raise AllRejectedError(msg)
            warnings.warn(msg, AllRejectedWarning, stacklevel=3)
        out = dict(batch)
        out["score"] = score
        out["kept"] = kept
        if self.drop_rejected:
            out = {k: _take(v, kept) for k, v in out.items()}
        return out, report

    def __call__(self, batch: dict) -> dict:
        """Ray Data entry point: the filtered batch; the report is kept in ``last_report`` / ``total_report``."""
        out, report = self.filter(batch)
        self.last_report = report
        self.total_report = self.total_report.merge(report)
        log.info("cosine filter: kept %d/%d variations (%.1f%%), mean score %.3f", report.n_kept, report.n_variations, 100 * report.kept_fraction, report.mean_score)
        return out


class CheckpointCosineFilter(CosineFilter):
    """A :class:`CosineFilter` that loads its teacher in ``__init__``: the Ray Data actor class.

    ``ds.map_batches(CheckpointCosineFilter, fn_constructor_args=(cfg.filter, cfg.teacher.checkpoint,
    cfg.teacher.arch, cfg.data.num_classes), batch_size=..., compute=ActorPoolStrategy(size=n))``:
    each actor reads the checkpoint itself, so no model is pickled through the object store.
    """

    def __init__(
        self,
        cfg: FilterConfig,
        checkpoint: str | Path,
        arch: str,
        num_classes: int,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str = "auto",
        **kwargs,
    ):
        from .checkpoint import CheckpointError, load_classifier
        from .runtime import resolve_device

        model, meta = load_classifier(checkpoint, arch, num_classes)
        mean = mean if mean is not None else meta.get("mean")
        std = std if std is not None else meta.get("std")
        if mean is None or std is None:
            raise CheckpointError(f"checkpoint {checkpoint} records no mean/std; pass mean= and std= to the cosine filter")
        super().__init__(cfg, model, (mean, std), device=resolve_device(device), **kwargs)


def _take(column, mask: np.ndarray):
    if isinstance(column, np.ndarray):
        return column[mask]
    return [v for v, m in zip(column, mask, strict=True) if m]


def embed_images(teacher: nn.Module, normalize: Normalize, images: np.ndarray, device="cpu", batch_size: int = 256) -> np.ndarray:
    """Teacher embeddings of uint8 NHWC images without building a filter (e.g. for a bank's column)."""
    f = CosineFilter(FilterConfig(), teacher, normalize, device=device, batch_size=batch_size)
    return f.embed(images)
