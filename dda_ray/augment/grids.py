"""Image grids of augmentation + filtering: one PNG per sample batch, for eyes and MLflow artifacts.

Each row is one original (grey border) followed by its variations, each framed green (kept) or
red (rejected) with its cosine score written below. Images are upscaled (nearest neighbour) so
32x32 pixels stay readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.columns import decode_image_column
from ..data.pool import ORIGINAL

__all__ = ["KEPT_COLOR", "REJECTED_COLOR", "ORIGINAL_COLOR", "grid_size", "make_grid", "grid_from_batch", "save_grid"]

KEPT_COLOR = (0, 200, 0)
REJECTED_COLOR = (220, 0, 0)
ORIGINAL_COLOR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
PAD = 4  # pixels between cells and around the grid
TEXT_H = 12  # caption band under each cell (PIL's default bitmap font is ~10 px high)


def grid_size(rows: int, cols: int, height: int, width: int, scale: int = 4, border: int = 3) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``rows`` x ``cols`` cells of ``height`` x ``width`` images."""
    cell_w, cell_h = width * scale + 2 * border, height * scale + 2 * border + TEXT_H
    return PAD + cols * (cell_w + PAD), PAD + rows * (cell_h + PAD)


def cell_origin(row: int, col: int, height: int, width: int, scale: int = 4, border: int = 3) -> tuple[int, int]:
    """(x, y) of the top-left corner of a cell's border."""
    cell_w, cell_h = width * scale + 2 * border, height * scale + 2 * border + TEXT_H
    return PAD + col * (cell_w + PAD), PAD + row * (cell_h + PAD)


def make_grid(
    originals: np.ndarray,
    variations: np.ndarray,
    scores: np.ndarray,
    kept: np.ndarray,
    *,
    scale: int = 4,
    border: int = 3,
    captions: Sequence[str] | None = None,
    present: np.ndarray | None = None,
) -> Image.Image:
    """A grid image: row ``i`` = ``originals[i]`` then ``variations[i, 0..V-1]``.

    Args:
        originals: (N, H, W, 3) uint8.
        variations: (N, V, H, W, 3) uint8.
        scores: (N, V) cosine scores (NaN: no score written).
        kept: (N, V) bool.
        captions: optional text under each original (e.g. its label); default "orig".
        present: (N, V) bool; False leaves that cell empty (rows with fewer variations).
    """
    originals, variations = np.asarray(originals), np.asarray(variations)
    n, v = variations.shape[:2]
    h, w = originals.shape[1:3]
    if originals.shape[0] != n:
        raise ValueError(f"{originals.shape[0]} originals but {n} rows of variations")
    canvas = Image.new("RGB", grid_size(n, v + 1, h, w, scale, border), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def put(row: int, col: int, img: np.ndarray, color, text: str) -> None:
        x, y = cell_origin(row, col, h, w, scale, border)
        inner_w, inner_h = w * scale, h * scale
        draw.rectangle([x, y, x + inner_w + 2 * border - 1, y + inner_h + 2 * border - 1], fill=color)
        tile = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8)).resize((inner_w, inner_h), Image.NEAREST)
        canvas.paste(tile, (x + border, y + border))
        if text:
            draw.text((x + 1, y + inner_h + 2 * border + 1), text, fill=TEXT_COLOR)

    for i in range(n):
        put(i, 0, originals[i], ORIGINAL_COLOR, captions[i] if captions is not None else "orig")
        for k in range(v):
            if present is not None and not present[i, k]:
                continue
            s = float(scores[i, k])
            put(i, k + 1, variations[i, k], KEPT_COLOR if kept[i, k] else REJECTED_COLOR, "" if np.isnan(s) else f"{s:.2f}")
    return canvas


def grid_from_batch(
    batch: dict,
    *,
    originals: dict[str, np.ndarray] | None = None,
    max_rows: int = 8,
    image_shape: Sequence[int] | None = None,
    **kwargs,
) -> Image.Image:
    """A grid from a filtered batch (columns ``id``, ``parent_id``, ``image``, ``variation``, ``score``, ``kept``).

    The originals come from the batch's own ``variation == -1`` rows, a ``parent_image`` column,
    or ``originals`` (``{parent_id: HWC uint8}``). Rows follow first appearance of each parent;
    parents with fewer variations than the most are padded with blank, unscored cells.
    """
    images = decode_image_column(batch["image"], image_shape)
    parent_ids = np.asarray(batch["parent_id"]).astype(str)
    variation = np.asarray(batch.get("variation", np.zeros(len(images), np.int64)))
    scores = np.asarray(batch.get("score", np.full(len(images), np.nan)), dtype=np.float32)
    kept = np.asarray(batch.get("kept", np.ones(len(images), bool)), dtype=bool)
    parent_images = decode_image_column(batch["parent_image"], image_shape) if "parent_image" in batch else None

    found: dict[str, np.ndarray] = dict(originals or {})
    rows: dict[str, list[int]] = {}
    for i, pid in enumerate(parent_ids):
        if variation[i] == ORIGINAL:
            found[pid] = images[i]
            rows.setdefault(pid, [])
        else:
            rows.setdefault(pid, []).append(i)
            if parent_images is not None:
                found.setdefault(pid, parent_images[i])
    order = [p for p in rows if p in found][:max_rows]
    if not order:
        raise ValueError("no originals for this batch: pass originals=, a parent_image column, or rows with variation == -1")
    v = max(1, max(len(rows[p]) for p in order))
    h, w, c = images.shape[1:]
    var = np.full((len(order), v, h, w, c), 255, dtype=np.uint8)
    sc = np.full((len(order), v), np.nan, dtype=np.float32)
    kp = np.ones((len(order), v), dtype=bool)
    present = np.zeros((len(order), v), dtype=bool)
    for r, pid in enumerate(order):
        for k, i in enumerate(rows[pid][:v]):
            var[r, k], sc[r, k], kp[r, k], present[r, k] = images[i], scores[i], kept[i], True
    return make_grid(np.stack([found[p] for p in order]), var, sc, kp, present=present, **kwargs)


def save_grid(directory: str | Path, name: str, grid: Image.Image | dict, **kwargs) -> Path:
    """Write ``grid`` (an image, or a batch dict given to :func:`grid_from_batch`) to ``<directory>/<name>.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image = grid if isinstance(grid, Image.Image) else grid_from_batch(grid, **kwargs)
    path = directory / (name if name.endswith(".png") else f"{name}.png")
    image.save(path)
    return path
