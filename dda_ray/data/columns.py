"""Row codecs: Ray Data batch columns <-> arrays, shared by the filter and the Ray stages.

Images travel in a batch as raw bytes per image, the bank's encoding (:mod:`dda_ray.data.bank`);
embeddings as list columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .bank import decode_images


def decode_image_column(column, image_shape: Sequence[int] | None = None) -> np.ndarray:
    """An ``image`` column -> uint8 NHWC array.

    Accepts a uint8 (N, H, W, C) array, a sequence of HWC arrays, or raw bytes per image (the
    bank's encoding; shape from ``image_shape``, else a square RGB image is assumed).
    """
    if isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.ndim == 4:
        return column
    values = list(column)
    if not values:
        return np.zeros((0, *(tuple(image_shape) if image_shape else (0, 0, 3))), dtype=np.uint8)
    if isinstance(values[0], (bytes, bytearray, memoryview)):
        if image_shape is None:
            n_bytes = len(values[0])
            side = math.isqrt(n_bytes // 3)
            if side * side * 3 != n_bytes:
                raise ValueError(f"cannot infer the shape of a {n_bytes}-byte image; pass image_shape=(H, W, C)")
            image_shape = (side, side, 3)
        return decode_images(values, tuple(image_shape))
    return np.stack([np.asarray(v, dtype=np.uint8) for v in values])


def encode_image_column(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> object array of raw bytes (the bank's ``image`` encoding)."""
    out = np.empty(len(images), dtype=object)
    out[:] = [img.tobytes() for img in np.ascontiguousarray(images)]
    return out


def stack_vector_column(column) -> np.ndarray:
    """A list column (2-D array, or object array of 1-D arrays) -> 2-D float32 array."""
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in column]) if len(column) else np.zeros((0, 0), np.float32)
    return arr.astype(np.float32, copy=False)
