"""Image grids: size, layout, and kept/rejected border colours of the written PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dda_ray.augment.grids import KEPT_COLOR, ORIGINAL_COLOR, REJECTED_COLOR, cell_origin, grid_from_batch, grid_size, make_grid, save_grid
from dda_ray.data.columns import encode_image_column

from .._tiny_pipelines import random_images


def filtered_batch(n=3, v=2, size=32):
    parents = random_images(n, size, seed=0)
    rows = {"id": [], "parent_id": [], "image": [], "variation": [], "score": [], "kept": []}
    for i in range(n):
        rows["id"].append(f"p{i}")
        rows["parent_id"].append(f"p{i}")
        rows["image"].append(parents[i])
        rows["variation"].append(-1)
        rows["score"].append(1.0)
        rows["kept"].append(True)
        for k in range(v):
            rows["id"].append(f"p{i}-v{k}")
            rows["parent_id"].append(f"p{i}")
            rows["image"].append(255 - parents[i])
            rows["variation"].append(k)
            rows["score"].append(0.95 - 0.5 * k)
            rows["kept"].append(k == 0)
    out = {k: np.asarray(vals) for k, vals in rows.items()}
    out["image"] = np.stack(rows["image"])
    return out


def border_pixel(img: Image.Image, row: int, col: int, size=32, scale=4, border=3):
    x, y = cell_origin(row, col, size, size, scale, border)
    return img.getpixel((x + 1, y + 1))


def test_png_size_and_border_colours(tmp_path):
    batch = filtered_batch()
    path = save_grid(tmp_path / "grids", "epoch-000", batch)
    assert path == tmp_path / "grids" / "epoch-000.png" and path.exists()
    img = Image.open(path).convert("RGB")
    assert img.size == grid_size(3, 3, 32, 32) == (4 + 3 * (32 * 4 + 6 + 4), 4 + 3 * (32 * 4 + 6 + 12 + 4))
    for r in range(3):
        assert border_pixel(img, r, 0) == ORIGINAL_COLOR
        assert border_pixel(img, r, 1) == KEPT_COLOR  # variation 0: kept
        assert border_pixel(img, r, 2) == REJECTED_COLOR  # variation 1: rejected
    # the image itself is pasted inside the border, upscaled 4x (nearest)
    x, y = cell_origin(0, 0, 32, 32)
    assert img.getpixel((x + 3 + 5, y + 3 + 5)) == tuple(int(c) for c in batch["image"][0][1, 1])


def test_scores_are_written_under_the_variations():
    batch = filtered_batch(n=1)
    img = grid_from_batch(batch)
    x, y = cell_origin(0, 1, 32, 32)
    band = np.asarray(img)[y + 32 * 4 + 6 : y + 32 * 4 + 6 + 12, x : x + 32 * 4 + 6]
    assert (band.astype(int).sum(-1) < 300).any(), "expected dark caption text under the cell"


def test_grid_from_parent_images_bytes_and_max_rows():
    batch = filtered_batch(n=4)
    var = batch["variation"] >= 0
    only_variations = {k: v[var] for k, v in batch.items()}
    parents = batch["image"][~var]
    only_variations["parent_image"] = encode_image_column(np.repeat(parents, 2, 0))
    only_variations["image"] = encode_image_column(only_variations["image"])
    img = grid_from_batch(only_variations, max_rows=2)
    assert img.size == grid_size(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no originals"):
        grid_from_batch({k: v for k, v in only_variations.items() if k != "parent_image"})


def test_make_grid_checks_shapes():
    with pytest.raises(ValueError, match="originals"):
        make_grid(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 1, 8, 8, 3), np.uint8), np.zeros((3, 1)), np.ones((3, 1), bool))
