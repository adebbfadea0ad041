"""The DDA cosine filter: keep a variation iff the teacher still sees it like its original.

Each variation is embedded by the teacher (its pooled penultimate features); the reference is
its original's embedding, taken from the bank's ``teacher_embedding`` column (carried by
:class:`~dda_ray.engines.stages.AugmentStage` as ``parent_embedding``) or recomputed from the parent image. A variation is kept iff
``cos(variation, original) >= filter.threshold``; originals (``variation == -1``) always pass
with score 1. Every row gets ``score`` and ``kept``; a :class:`FilterReport` per batch records the
kept fraction and a score histogram over [-1, 1]. The Ray Data actor around it is
:class:`dda_ray.engines.stages.FilterStage`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import FilterConfig
from ..data.columns import decode_image_column, stack_vector_column
from ..data.pool import ORIGINAL
from ..data.transforms import Normalize, to_float
from ..runtime import to_device

__all__ = ["AllRejectedError", "AllRejectedWarning", "CosineFilter", "FilterReport", "all_rejected_line"]


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
    max_score: float = float("nan")  # the best variation's score (nan without variations)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))
    bin_edges: np.ndarray = field(default_factory=lambda: np.linspace(-1.0, 1.0, 11))

    @classmethod
    def from_scores(cls, scores: np.ndarray, kept: np.ndarray, bins: int = 10) -> FilterReport:
        hist, edges = np.histogram(np.clip(scores, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
        best = float(np.max(scores)) if len(scores) else float("nan")
        return cls(int(len(scores)), int(np.sum(kept)), float(np.sum(scores)), best, hist.astype(np.int64), edges)

    @property
    def all_rejected(self) -> bool:
        """The batch had variations and the filter kept none of them."""
        return bool(self.n_variations) and self.n_kept == 0

    @property
    def kept_fraction(self) -> float:
        """Kept / variations; 1.0 for a batch without variations (nothing was rejected)."""
        return self.n_kept / self.n_variations if self.n_variations else 1.0

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.n_variations if self.n_variations else float("nan")

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


def all_rejected_line(epoch: int, stats: dict) -> str | None:
    """The epoch's one warning line when the filter rejected every variation of some batches
    (``stats``: an epoch's ``filter_batches``, ``all_rejected_batches``, ``all_rejected_max_score``,
    ``variations``, ``kept``), or None."""
    bad = int(stats.get("all_rejected_batches") or 0)
    if not bad:
        return None
    best = stats.get("all_rejected_max_score")
    best_s = f" (best score in them {best:.3f})" if best is not None and best == best else ""
    return (
        f"warning: epoch {epoch}: the cosine filter rejected every variation of {bad} of {int(stats.get('filter_batches') or bad)} batches"
        f"{best_s}; kept {int(stats.get('kept') or 0)} of {int(stats.get('variations') or 0)} variations this epoch. "
        "Lower filter.threshold or augment.strength"
    )


class CosineFilter:
    """Teacher-embedding cosine filter over augmented batches (slot rows of :mod:`dda_ray.engines.stages`).

    Args:
        cfg: the ``filter`` section (threshold, on_all_rejected, reference, hist_bins).
        teacher: a classifier whose ``forward(x, return_features=True)`` returns ``.embedding``.
        normalize: the teacher's input normalisation (a ``Normalize`` or a ``(mean, std)`` pair).
        device: where the teacher runs.
        batch_size: images per teacher forward.
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
        image_shape: Sequence[int] | None = None,
    ):
        cfg.validate("filter")
        self.cfg = cfg
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        self.normalize = normalize if isinstance(normalize, Normalize) else Normalize(*normalize)
        self.batch_size = batch_size
        self.image_shape = tuple(image_shape) if image_shape else None

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Teacher pooled embeddings (N, D) float32 of uint8 NHWC images."""
        outs = []
        for s in range(0, len(images), self.batch_size):
            x = self.normalize(to_device(to_float(images[s : s + self.batch_size]), self.device))
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
            parents = decode_image_column(batch["parent_image"], self.image_shape)
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
            "teacher_embedding), a parent_image column (AugmentStage with filter.grid_batches > 0), or the originals in the same batch "
            "(variation -1 rows with the same parent_id)"
        )

    def filter(self, batch: dict, warn: bool = True) -> tuple[dict, FilterReport]:
        """Add ``score`` (float32) and ``kept`` (bool) to a batch; report over its variations.

        A batch whose variations are all rejected raises :class:`AllRejectedError` under
        ``on_all_rejected: error``; otherwise it warns (:class:`AllRejectedWarning`), unless ``warn``
        is false: the pipeline's stages count such batches and say it once per epoch
        (:func:`all_rejected_line`)."""
        images = decode_image_column(batch["image"], self.image_shape)
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
        if report.all_rejected and (warn or self.cfg.on_all_rejected == "error"):
            msg = (
                f"the cosine filter rejected all {report.n_variations} variations of this batch: filter.threshold = "
                f"{self.cfg.threshold} is above every score (max {report.max_score:.3f}); lower filter.threshold or augment.strength"
            )
            if self.cfg.on_all_rejected == "error":
                raise AllRejectedError(msg)
            warnings.warn(msg, AllRejectedWarning, stacklevel=3)
        out = dict(batch)
        out["score"] = score
        out["kept"] = kept
        return out, report
