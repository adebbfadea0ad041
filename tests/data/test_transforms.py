"""Batched torch-only transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dda_ray.data.transforms import (
    Normalize,
    TrainTransform,
    random_crop,
    random_flip,
    random_resized_crop,
    resized_crop_boxes,
    to_float,
    to_uint8,
)


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


def _resized_crop_law(size: int = 32, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), steps: int = 3000) -> tuple[float, float]:
    """Mean area fraction and mean |log(w / h)| of torchvision's RandomResizedCrop boxes, by integrating
    the draw numerically: area uniform, log-ratio uniform, sides rounded, kept only if the box fits
    (the whole-image fallback after 10 misses has probability ~1e-9 here)."""
    a = np.linspace(*scale, steps + 1)
    lr = np.linspace(np.log(ratio[0]), np.log(ratio[1]), steps + 1)
    a, lr = np.meshgrid((a[1:] + a[:-1]) / 2, (lr[1:] + lr[:-1]) / 2)
    w = np.round(np.sqrt(a * np.exp(lr)) * size)
    h = np.round(np.sqrt(a / np.exp(lr)) * size)
    fits = (w <= size) & (h <= size)
    return float((w * h)[fits].mean() / size**2), float(np.abs(np.log(w / h))[fits].mean())


def test_resized_crop_boxes_follow_the_redraw_law_and_stay_inside():
    n = 40000
    box = resized_crop_boxes(n, (32, 32), generator=torch.Generator().manual_seed(0))
    assert box.dtype == torch.long and box.shape == (n, 4)
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= 32).all() and (y0 + h <= 32).all()
    area = (w * h).double() / 32**2
    log_r = (w.double() / h.double()).log()
    want_area, want_log_r = _resized_crop_law()
    # a box too wide or tall is redrawn (torchvision, kornia), not clipped: clipping gives a mean area of ~0.619
    assert abs(area.mean().item() - want_area) < 4 * area.std().item() / n**0.5, (area.mean().item(), want_area)
    assert abs(log_r.abs().mean().item() - want_log_r) < 4 * log_r.abs().std().item() / n**0.5
    assert area.min() >= 0.25 - 2 / 32 and log_r.abs().max() <= np.log(4 / 3) + 2 / 8
    # the corner is uniform over the positions that keep the box inside: mean offset = (32 - w) / 2
    slack = (32 - w).double()
    assert abs((x0.double() - slack / 2).mean().item()) < 4 * (slack / 12**0.5).mean().item() / n**0.5 + 0.02


def test_resized_crop_boxes_fall_back_to_the_whole_image_when_no_draw_fits():
    box = resized_crop_boxes(8, (16, 16), scale=(1.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert box.tolist() == [[0, 0, 16, 16]] * 8
    x = _float(n=8, h=16, w=16)
    out = random_resized_crop(x, scale=(1.5, 2.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x)


def test_random_resized_crop_is_the_box_resized_with_corners_aligned_and_is_differentiable():
    x = _float(n=12, h=16, w=16).requires_grad_(True)
    out = random_resized_crop(x, generator=torch.Generator().manual_seed(5))
    box = resized_crop_boxes(12, (16, 16), generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    for i, (x0, y0, w, h) in enumerate(box.tolist()):
        want = F.interpolate(x[i : i + 1, :, y0 : y0 + h, x0 : x0 + w], size=(16, 16), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[i : i + 1], want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


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
