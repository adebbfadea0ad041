"""Real-data loaders: the shared CIFAR-10 JPEG copy, image folders, CIFAR pickles, Tiny-ImageNet."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dda_ray.config import DataConfig
from dda_ray.data import NORMALIZATION, channel_stats, load_data
from dda_ray.data import datasets as dsmod
from dda_ray.data.datasets import CIFAR_URLS, DatasetError, ImageArrays, load_cifar, load_dataset, load_image_folder

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _forbid(monkeypatch, *names):
    """Make decoding functions raise: a load that still succeeds came from the cache."""

    def boom(*_a, **_k):
        raise AssertionError("decoded again instead of using the cache")

    for name in names:
        monkeypatch.setattr(dsmod, name, boom)


# ----------------------------------------------------------- the real CIFAR-10 copy
def test_cifar10_jpg_layout(cifar10_decoded):
    ds = cifar10_decoded.ds
    assert ds.classes == CIFAR10_CLASSES == sorted(ds.classes)
    assert ds.num_classes == 10
    assert ds.train.images.shape == (50_000, 32, 32, 3) and len(ds.train) == 50_000
    assert ds.test.images.shape == (10_000, 32, 32, 3) and len(ds.test) == 10_000
    for split in (ds.train, ds.test):
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (len(split.images),)
    assert np.bincount(ds.train.labels, minlength=10).tolist() == [5_000] * 10
    assert np.bincount(ds.test.labels, minlength=10).tolist() == [1_000] * 10
    # labels are grouped by class in alphabetical order
    assert np.all(np.diff(ds.test.labels) >= 0)
    # real pixels, close to the published CIFAR-10 statistics
    mean, std = channel_stats(ds.test.images[::5])
    ref_mean, ref_std = NORMALIZATION["cifar10"]
    np.testing.assert_allclose(mean, ref_mean, atol=0.02)
    np.testing.assert_allclose(std, ref_std, atol=0.02)
    assert len({ds.train.images[i].tobytes() for i in range(0, 50_000, 500)}) == 100


def test_cifar10_jpg_second_load_hits_the_cache(cifar10_decoded, monkeypatch):
    caches = list(cifar10_decoded.cache_dir.glob("imagefolder-*-32.npz"))
    assert len(caches) == 1, list(cifar10_decoded.cache_dir.iterdir())
    assert not list(cifar10_decoded.cache_dir.glob("*.tmp*"))
    _forbid(monkeypatch, "decode_image", "_iter_tar", "load_image_folder")
    again = load_dataset("imagefolder", cifar10_decoded.path, cache_dir=cifar10_decoded.cache_dir, image_size=32, progress=False)
    first = cifar10_decoded.ds
    assert again.classes == first.classes
    assert np.array_equal(again.train.labels, first.train.labels)
    assert np.array_equal(again.test.labels, first.test.labels)
    assert np.array_equal(again.test.images, first.test.images)
    assert np.array_equal(again.train.images, first.train.images)


def test_load_data_checks_the_class_count(cifar10_decoded, monkeypatch):
    _forbid(monkeypatch, "decode_image", "_iter_tar", "load_image_folder")
    cfg = DataConfig(
        dataset="imagefolder", path=str(cifar10_decoded.path), cache_dir=str(cifar10_decoded.cache_dir), num_classes=10, image_size=32
    )
    assert load_data(cfg, progress=False).num_classes == 10
    cfg.num_classes = 100
    with pytest.raises(DatasetError) as exc:
        load_data(cfg, progress=False)
    assert "10 classes" in str(exc.value) and "data.num_classes = 100" in str(exc.value)


# ------------------------------------------------------------- tiny image folder
COLORS = {  # (class, split, index) -> solid RGB colour; PNG keeps them exact
    ("zebra", "train", 0): (255, 0, 0),
    ("zebra", "train", 1): (0, 255, 0),
    ("zebra", "train", 2): (10, 20, 30),
    ("ant", "train", 0): (0, 0, 255),
    ("ant", "train", 1): (200, 100, 50),
    ("zebra", "test", 0): (1, 2, 3),
    ("ant", "test", 0): (4, 5, 6),
    ("ant", "test", 1): (7, 8, 9),
}


def _write_folder(root: Path, test_name: str = "test") -> Path:
    for (cls, split, i), rgb in COLORS.items():
        d = root / (test_name if split == "test" else split) / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), rgb).save(d / f"{i}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


def _expected(split: str):
    classes = ["ant", "zebra"]
    rows = sorted((c, i) for (c, s, i) in COLORS if s == split)
    colors = np.array([COLORS[(c, split, i)] for c, i in rows], dtype=np.uint8)
    labels = np.array([classes.index(c) for c, _ in rows], dtype=np.int64)
    return colors, labels


def _check_mini(ds, size: int = 16):
    assert ds.classes == ["ant", "zebra"]
    for split, arr in (("train", ds.train), ("test", ds.test)):
        colors, labels = _expected(split)
        assert arr.images.shape == (len(labels), size, size, 3)
        assert arr.images.dtype == np.uint8 and arr.labels.dtype == np.int64
        assert np.array_equal(arr.labels, labels)
        assert np.array_equal(arr.images, np.broadcast_to(colors[:, None, None, :], arr.images.shape))


def test_image_folder_directory(tmp_path):
    root = _write_folder(tmp_path / "mini")
    _check_mini(load_dataset("imagefolder", root, cache_dir=tmp_path / "cache", image_size=16, progress=False))
    assert len(list((tmp_path / "cache").glob("imagefolder-*-16.npz"))) == 1


def test_image_folder_keeps_native_size_without_image_size(tmp_path):
    root = _write_folder(tmp_path / "mini")
    _check_mini(load_image_folder(root, None, progress=False), size=20)


def test_image_folder_accepts_val_instead_of_test(tmp_path):
    root = _write_folder(tmp_path / "mini", test_name="val")
    _check_mini(load_dataset("imagefolder", root, image_size=16, progress=False))


@pytest.mark.parametrize("arcname", ["mini", "."])
def test_image_folder_tar_gz(tmp_path, arcname, monkeypatch):
    root = _write_folder(tmp_path / "mini")
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname=arcname)
    cache = tmp_path / "cache"
    ds = load_dataset("imagefolder", archive, cache_dir=cache, image_size=16, progress=False)
    _check_mini(ds)
    _forbid(monkeypatch, "decode_image", "_iter_tar", "load_image_folder")
    _check_mini(load_dataset("imagefolder", archive, cache_dir=cache, image_size=16, progress=False))


def test_truncated_cache_is_rebuilt(tmp_path):
    root = _write_folder(tmp_path / "mini")
    cache = tmp_path / "cache"
    load_dataset("imagefolder", root, cache_dir=cache, image_size=16, progress=False)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    _check_mini(load_dataset("imagefolder", root, cache_dir=cache, image_size=16, progress=False))


def test_image_folder_without_test_split_is_refused(tmp_path):
    root = _write_folder(tmp_path / "mini")
    for p in (root / "test").rglob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError, match="train/<class>/ and test/<class>/"):
        load_dataset("imagefolder", root, progress=False)


def test_image_folder_with_mismatched_classes_is_refused(tmp_path):
    root = _write_folder(tmp_path / "mini")
    (root / "test" / "bee").mkdir()
    Image.new("RGB", (20, 20)).save(root / "test" / "bee" / "0.png")
    with pytest.raises(DatasetError, match="classes differ"):
        load_dataset("imagefolder", root, progress=False)


def test_corrupt_archive_is_refused(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(os.urandom(1000))
    with pytest.raises(DatasetError, match="cannot read archive") as exc:
        load_dataset("imagefolder", archive, progress=False)
    assert str(archive) in str(exc.value)


@pytest.mark.parametrize("kind", ["imagefolder", "tiny_imagenet"])
def test_missing_path_names_the_path(tmp_path, kind):
    missing = tmp_path / "no" / "such" / "dataset"
    with pytest.raises(DatasetError) as exc:
        load_dataset(kind, missing, cache_dir=tmp_path / "cache", progress=False)
    assert str(missing) in str(exc.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(missing)


def test_unknown_dataset_kind_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset kind 'mnist'"):
        load_dataset("mnist", tmp_path)


def test_load_data_wrong_num_classes_on_a_folder(tmp_path):
    root = _write_folder(tmp_path / "mini")
    cfg = DataConfig(dataset="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"), num_classes=2, image_size=16)
    _check_mini(load_data(cfg, progress=False))
    cfg.num_classes = 10
    with pytest.raises(DatasetError, match="2 classes but data.num_classes = 10"):
        load_data(cfg, progress=False)


# ------------------------------------------------------------------ CIFAR (python)
class _Py2Pickler(pickle._Pickler):
    """Writes byte strings as Python 2 ``str`` (BINSTRING), as the official CIFAR pickles do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (the era of the official files) lived under numpy.core
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _hwc_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the official (N, 3072) rows: the R plane, then G, then B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, protocol: int | None = None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(obj, path):
        if protocol is None:
            _dump_py2(obj, path)
        else:
            path.write_bytes(pickle.dumps(obj, protocol=protocol))

    train_x, train_y = [], []
    for b in range(1, 6):
        x = _hwc_images(per_batch, seed=b)
        y = [(b + i) % 10 for i in range(per_batch)]
        dump(
            {
                "batch_label": f"training batch {b} of 5",
                "labels": y,
                "data": _cifar_rows(x),
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
            folder / f"data_batch_{b}",
        )
        train_x.append(x)
        train_y += y
    test_x = _hwc_images(n_test, seed=99)
    test_y = [i % 10 for i in range(n_test)]
    dump(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_y,
            "data": _cifar_rows(test_x),
            "filenames": [f"t{i}.png" for i in range(n_test)],
        },
        folder / "test_batch",
    )
    dump({"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}, folder / "batches.meta")
    return folder, np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def _check_cifar10(ds, train_x, train_y, test_x, test_y):
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train.images.dtype == np.uint8 and ds.train.images.flags["C_CONTIGUOUS"]
    assert ds.train.labels.dtype == np.int64
    assert np.array_equal(ds.train.images, train_x)
    assert np.array_equal(ds.train.labels, train_y)
    assert np.array_equal(ds.test.images, test_x)
    assert np.array_equal(ds.test.labels, test_y)


@pytest.mark.parametrize("protocol", [None, 4], ids=["py2-official", "py3-protocol4"])
def test_cifar10_python_format(tmp_path, protocol):
    folder, *expected = _write_cifar10(tmp_path, protocol=protocol)
    assert len(expected[0]) == 20
    _check_cifar10(load_cifar("cifar10", tmp_path, download=False), *expected)
    # the batches folder itself is accepted as the root too
    _check_cifar10(load_cifar("cifar10", folder, download=False), *expected)
    _check_cifar10(load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache", download=False), *expected)


def test_cifar100_python_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:03d}" for i in range(100)]
    train_x, test_x = _hwc_images(5, 1), _hwc_images(3, 2)
    train_y, test_y = [99, 0, 5, 42, 7], [3, 1, 4]
    _dump_py2({"data": _cifar_rows(train_x), "fine_labels": train_y, "coarse_labels": [0] * 5, "filenames": ["a"] * 5}, folder / "train")
    _dump_py2({"data": _cifar_rows(test_x), "fine_labels": test_y, "coarse_labels": [0] * 3, "filenames": ["b"] * 3}, folder / "test")
    _dump_py2({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, folder / "meta")
    ds = load_cifar("cifar100", tmp_path, download=False)
    assert ds.classes == names and ds.num_classes == 100
    assert np.array_equal(ds.train.images, train_x) and ds.train.labels.tolist() == train_y
    assert np.array_equal(ds.test.images, test_x) and ds.test.labels.tolist() == test_y


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_with_code_payload_is_refused(tmp_path):
    folder, *_ = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = folder / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _cifar_rows(_hwc_images(2, 0)), "labels": _Payload(marker)}, protocol=2))
    with pytest.raises(DatasetError, match="cannot read CIFAR batch") as exc:
        load_cifar("cifar10", tmp_path, download=False)
    assert str(batch) in str(exc.value) and "refusing" in str(exc.value)
    assert not marker.exists(), "the pickled payload ran"
    # the payload is live: an unrestricted unpickler runs it
    with open(batch, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_cifar_batch_is_refused(tmp_path):
    folder, *_ = _write_cifar10(tmp_path)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_without_download_names_the_url(tmp_path, name):
    with pytest.raises(DatasetError) as exc:
        load_dataset(name, tmp_path / "nothing", download=False)
    msg = str(exc.value)
    assert CIFAR_URLS[name][0] in msg and "download disabled" in msg
    assert str(tmp_path / "nothing") in msg
    assert not (tmp_path / "nothing").exists()


# -------------------------------------------------------------------- Tiny-ImageNet
TINY_COLORS = {"n02": (250, 10, 10), "n01": (10, 250, 10)}


def _write_tiny(root: Path, per_class: int = 3) -> Path:
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("n02\nn01\n")  # not sorted: classes must come out sorted
    for wnid, rgb in TINY_COLORS.items():
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), rgb).save(d / f"{wnid}_{i}.JPEG", format="JPEG", quality=95)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    (root / "val" / "images").mkdir(parents=True)
    val = [("val_0.JPEG", "n01"), ("val_1.JPEG", "n02"), ("val_2.JPEG", "n01")]
    for fname, wnid in val:
        Image.new("RGB", (64, 64), TINY_COLORS[wnid]).save(root / "val" / "images" / fname, format="JPEG", quality=95)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in val))
    return root


def test_tiny_imagenet_layout(tmp_path, monkeypatch):
    _write_tiny(tmp_path / "data" / "tiny-imagenet-200")
    cache = tmp_path / "cache"
    ds = load_dataset("tiny_imagenet", tmp_path / "data", cache_dir=cache, progress=False)
    assert ds.classes == ["n01", "n02"]
    assert ds.train.images.shape == (6, 64, 64, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.images.shape == (3, 64, 64, 3)
    assert ds.test.labels.tolist() == [0, 1, 0]
    for arr in (ds.train, ds.test):
        for img, label in zip(arr.images, arr.labels, strict=True):
            expected = TINY_COLORS[ds.classes[label]]
            assert np.abs(img.astype(int) - expected).max() <= 3  # JPEG, solid colour
    # the inner folder is accepted as the root, and the cache serves the second load
    direct = load_dataset("tiny_imagenet", tmp_path / "data" / "tiny-imagenet-200", progress=False)
    assert np.array_equal(direct.train.images, ds.train.images)
    _forbid(monkeypatch, "decode_image", "load_tiny_imagenet")
    cached = load_dataset("tiny_imagenet", tmp_path / "data", cache_dir=cache, progress=False)
    assert np.array_equal(cached.test.images, ds.test.images) and cached.classes == ds.classes


def test_tiny_imagenet_without_wnids_is_refused(tmp_path):
    (tmp_path / "tiny").mkdir()
    with pytest.raises(DatasetError, match="wnids.txt"):
        load_dataset("tiny_imagenet", tmp_path / "tiny", progress=False)


def test_tiny_imagenet_without_val_annotations_is_refused(tmp_path):
    root = _write_tiny(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        load_dataset("tiny_imagenet", root, progress=False)


# ------------------------------------------------------------------------- helpers
def test_subset_and_channel_stats():
    images = np.zeros((10, 2, 2, 3), dtype=np.uint8)
    images[..., 0] = 255
    arrays = ImageArrays(images, np.arange(10, dtype=np.int64))
    assert arrays.subset(None) is arrays and arrays.subset(10) is arrays
    sub = arrays.subset(4, seed=1)
    assert len(sub) == 4 and len(set(sub.labels.tolist())) == 4
    assert np.all(np.diff(sub.labels) > 0)
    assert np.array_equal(arrays.subset(4, seed=1).labels, sub.labels)
    mean, std = channel_stats(images)
    assert mean == (1.0, 0.0, 0.0) and std == (0.0, 0.0, 0.0)


# ------------------------------------------------------------- undecodable images
def _with_corrupt_images(root: Path) -> list[str]:
    """Two bad files in the tiny folder: bytes that are no image, and a JPEG cut in half."""
    (root / "train" / "zebra" / "9.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(buf, format="JPEG")
    (root / "test" / "ant" / "5.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return ["train/zebra/9.png", "test/ant/5.jpg"]


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_an_undecodable_image_is_named_or_left_out_with_a_warning(tmp_path, packed, monkeypatch, capsys):
    root = _write_folder(tmp_path / "mini")
    bad = _with_corrupt_images(root)
    path = root
    if packed:
        path = tmp_path / "mini.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(root, arcname="mini")
        bad = [f"mini/{name}" for name in bad]
    cache = tmp_path / "cache"

    with pytest.raises(DatasetError) as exc:
        load_dataset("imagefolder", path, cache_dir=cache, image_size=16, progress=False)
    msg = str(exc.value)
    where = f"member {bad[0]} of archive {path}" if packed else str(root / bad[0])
    assert f"cannot decode image {where}" in msg and "data.skip_corrupt=true" in msg, msg
    assert not cache.exists() or not list(cache.glob("*.npz"))  # nothing cached from a failed load

    ds = load_dataset("imagefolder", path, cache_dir=cache, image_size=16, progress=False, skip_corrupt=True)
    _check_mini(ds)  # every good image, nothing else
    assert ds.skipped == bad
    assert f"warning: left out 2 unreadable image(s) of {path} (data.skip_corrupt=true): {bad[0]}, {bad[1]}" in capsys.readouterr().out

    with pytest.raises(DatasetError, match="cannot decode image"):  # the skipping run's cache does not hide the error
        load_dataset("imagefolder", path, cache_dir=cache, image_size=16, progress=False)
    _forbid(monkeypatch, "decode_image", "_iter_tar", "_iter_dir", "load_image_folder")
    cfg = DataConfig(dataset="imagefolder", path=str(path), cache_dir=str(cache), num_classes=2, image_size=16, skip_corrupt=True)
    cached = load_data(cfg, progress=False)  # what the jobs call: data.skip_corrupt reaches the loader
    assert cached.skipped == bad and np.array_equal(cached.train.images, ds.train.images)
    assert "left out 2 unreadable image(s)" in capsys.readouterr().out


def test_a_split_left_without_readable_images_is_refused(tmp_path):
    root = _write_folder(tmp_path / "mini")
    for p in (root / "test").rglob("*.png"):
        p.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"\(test split\) has no readable images"):
        load_dataset("imagefolder", root, progress=False, skip_corrupt=True)


def test_presets_fall_back_to_the_official_cifar10_download_when_the_local_copy_is_absent(tmp_path, monkeypatch, capsys):
    """A fresh machine without ../shared: the presets' data.fallback reads the official CIFAR-10
    from data.path's folder, downloading it there once (a fake downloader here: no network); with
    data.download=false the run stops before starting, naming where it looked."""
    from dda_ray.api import preflight
    from dda_ray.config import load_config

    calls = []
    expected = {}

    def fake_download(name, root):
        calls.append((name, root))
        expected["data"] = _write_cifar10(root)[1:]

    monkeypatch.setattr(dsmod, "_download_cifar", fake_download)
    absent = tmp_path / "shared" / "data" / "cifar10-jpg.tar.gz"
    overrides = [f"data.path={absent}", f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'out'}", "data.eval_subset=null"]
    cfg = load_config("configs/cifar10_cpu_smoke.yaml", overrides)
    assert cfg.data.fallback == "cifar10" and cfg.data.dataset == "imagefolder"
    preflight(cfg)  # download allowed: nothing to refuse before the run starts
    assert calls == []  # ... and nothing fetched by the check itself
    ds = load_data(cfg.data, progress=False)
    assert calls == [("cifar10", absent.parent)]
    _check_cifar10(ds, *expected["data"])
    assert "reading the official cifar10" in capsys.readouterr().out
    load_data(cfg.data, progress=False)  # the second run finds the download in place
    assert len(calls) == 1

    cfg = load_config("configs/cifar10_cpu_smoke.yaml", [*overrides, f"data.path={tmp_path / 'elsewhere' / 'x.tar.gz'}", "data.download=false"])
    with pytest.raises(DatasetError, match="cifar10 is not at .*elsewhere/cifar-10-batches-py and data.download = false"):
        preflight(cfg)
    cfg = load_config("configs/cifar10_cpu_smoke.yaml", [*overrides, "data.path=no/such/dir.tar.gz", "data.fallback=null"])
    with pytest.raises(DatasetError, match=r"does not exist \(relative to .*ray job submit --working-dir"):
        preflight(cfg)
