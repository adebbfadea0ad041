"""Batched torch-only transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dda_ray.data.transforms import Normalize, TrainTransform, random_crop, random_flip, to_float, to_uint8


def _uint8(n=4, h=8, w=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _float(n=16, h=8, w=8, seed=0) -> torch.Tensor:
    """Strictly positive, all-distinct values: a zero-padded window can be located exactly."""
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_to_float_layout_and_range():
    imgs = _uint8(n=3, h=5, w=7)
    x = to_float(imgs)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # channel c of image n at (i, j) is pixel [n, i, j, c] / 255
    assert x[1, 2, 3, 4].item() == pytest.approx(imgs[1, 3, 4, 2] / 255.0)
    torch.testing.assert_close(to_float(torch.from_numpy(imgs)), x)


def test_uint8_round_trip():
    imgs = _uint8()
    back = to_uint8(to_float(imgs))
    assert back.dtype == np.uint8 and back.shape == imgs.shape
    assert np.array_equal(back, imgs)
    # every level survives, including 0 and 255
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    assert np.array_equal(to_uint8(to_float(levels)), levels)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0, 0.3 / 255, 0.6 / 255]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 0, 1]


def test_to_uint8_does_not_track_gradients():
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    assert isinstance(to_uint8(x), np.ndarray)


def test_normalize():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.ones(2, 3, 4, 4)
    out = norm(x)
    assert out.shape == x.shape
    assert torch.allclose(out[:, 0], torch.full((2, 4, 4), 1.0))
    assert torch.allclose(out[:, 1], torch.full((2, 4, 4), 3.0))
    assert torch.allclose(out[:, 2], torch.full((2, 4, 4), 0.5))
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.double()).dtype == torch.float64


def test_random_crop_without_padding_is_identity():
    x = _float()
    assert torch.equal(random_crop(x, 0), x)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("padding", [1, 4])
def test_random_crop_keeps_shape_and_takes_a_window_of_the_padded_input(padding):
    x = _float(n=32, h=8, w=10)
    out = random_crop(x, padding, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (padding,) * 4)
    offsets = []
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 10])
        ]
        assert len(matches) == 1, f"image {i}: output is not exactly one window of the padded input"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1, "every image got the same crop"


def test_random_crop_offsets_follow_the_generator():
    padding, x = 4, _float(n=6)
    out = random_crop(x, padding, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    dy = torch.randint(0, 2 * padding + 1, (6,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (6,), generator=g)
    padded = F.pad(x, (padding,) * 4)
    i = 2
    expected = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    assert torch.equal(out[i], expected)
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


def test_random_crop_is_deterministic_per_seed():
    x = _float()
    a = random_crop(x, 4, torch.Generator().manual_seed(5))
    b = random_crop(x, 4, torch.Generator().manual_seed(5))
    c = random_crop(x, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_flip_flips_exactly_the_chosen_images():
    x = _float(n=32)
    assert not torch.equal(x, x.flip(3))
    out = random_flip(x, torch.Generator().manual_seed(7))
    chosen = torch.rand(32, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < int(chosen.sum()) < 32
    for i in range(32):
        expected = x[i].flip(2) if chosen[i] else x[i]
        assert torch.equal(out[i], expected), i
    assert torch.equal(random_flip(x, torch.Generator().manual_seed(7)), out)


def test_train_transform_output():
    x = _float(n=8, h=32, w=32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    t = TrainTransform(mean, std)
    out = t(x, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, t(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, t(x, torch.Generator().manual_seed(1)))
    # same random draws as crop then flip, then normalisation
    g = torch.Generator().manual_seed(0)
    expected = Normalize(mean, std)(random_flip(random_crop(x, 4, g), g))
    torch.testing.assert_close(out, expected)
    # no crop, no flip: just normalisation
    plain = TrainTransform(mean, std, padding=0, flip=False)
    torch.testing.assert_close(plain(x), Normalize(mean, std)(x))
