"""Real datasets (teacher training, real-data KD, evaluation), decoded once and cached.

Supported sources:

* ``cifar10`` / ``cifar100`` in the official *python* format (``cifar-10-batches-py``),
  downloaded to the cache directory when absent. The pickles are read with a restricted
  unpickler that only admits numpy arrays, so a tampered file cannot run code.
* ``imagefolder``: ``<root>/{train,test}/<class>/*.{jpg,png}`` as an extracted folder or a
  ``.tar.gz`` of it (e.g. ``../shared/data/cifar10-jpg.tar.gz``); class order is alphabetical.
* ``tiny_imagenet``: the official ``tiny-imagenet-200`` layout (``wnids.txt``,
  ``train/<wnid>/images``, ``val/images`` + ``val/val_annotations.txt``), evaluated on ``val``.

Every loader returns :class:`ImageArrays` (uint8 NHWC + int64 labels). The decoded arrays are
stored as ``.npz`` under ``cache_dir`` keyed by the source's path, size and mtime, so a second
run starts in about a second instead of re-decoding JPEGs.

An image file that does not decode (truncated, not an image, ...) stops the load with a
:class:`DatasetError` naming the file (the archive member for a ``.tar.gz``), or, with
``skip_corrupt=True`` (``data.skip_corrupt``), is left out with a warning; the dataset then lists
what it left out in :attr:`SplitDataset.skipped`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..progress import bar as progress_bar
from ..runtime import atomic_write

CIFAR_URLS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Per-channel statistics of the training sets (standard values used by the DFKD codebases).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or not in the expected layout."""


@dataclass
class ImageArrays:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> ImageArrays:
        """A class-balanced-in-expectation random subset of ``n`` rows (all rows when None)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageArrays(self.images[idx], self.labels[idx])


@dataclass
class SplitDataset:
    train: ImageArrays
    test: ImageArrays
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # undecodable files left out (skip_corrupt=True)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------ caching
def _cache_key(kind: str, path: Path) -> str:
    """Identity of the source: path, size and mtime of the archive, or of every file in a folder
    (a folder's own mtime misses edits inside ``train/<class>/``)."""
    h = hashlib.sha1(f"{kind}|{path.resolve()}|v2".encode())  # v2: decode_image applies EXIF orientation, alpha on white
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"|{p.relative_to(path) if p != path else ''}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _load_cached(cache_file: Path) -> SplitDataset | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return SplitDataset(
                ImageArrays(z["train_x"], z["train_y"]),
                ImageArrays(z["test_x"], z["test_y"]),
                [str(c) for c in z["classes"]],
                [str(n) for n in z["skipped"]] if "skipped" in z.files else [],
            )
    except Exception:  # a truncated cache is rebuilt, never trusted
        return None


def _save_cache(cache_file: Path, ds: SplitDataset) -> None:
    arrays = {
        "train_x": ds.train.images,
        "train_y": ds.train.labels,
        "test_x": ds.test.images,
        "test_y": ds.test.labels,
        "classes": np.array(ds.classes),
        "skipped": np.array(ds.skipped, dtype=str),
    }
    atomic_write(cache_file, lambda tmp: np.savez(tmp, **arrays))  # readers never see a half-written cache


# ------------------------------------------------------------- image folders
def decode_image(data: bytes, size: int | None = None, max_short_side: int | None = None) -> np.ndarray:
    """Bytes of an image file -> uint8 RGB HWC: the project's one image decoder (Pillow).

    The EXIF orientation is applied and transparent areas become white (not black). ``size``
    resizes to ``size`` x ``size`` (bilinear: the dataset loaders); ``max_short_side`` instead
    scales the shorter side down to at most that, keeping the aspect ratio (Lanczos: the prior's
    folder and photo sources).
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            back = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(back, img)
        img = img.convert("RGB")
        w, h = img.size
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        elif max_short_side is not None and min(w, h) > max_short_side:
            k = max_short_side / min(w, h)
            img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.LANCZOS)
        return np.asarray(img, dtype=np.uint8).copy()


class _Decoder:
    """Decodes the images of one dataset source; an undecodable one is a DatasetError naming it, or,
    with ``skip``, is recorded in ``skipped`` and left out."""

    def __init__(self, source: Path, skip: bool):
        self.source, self.skip, self.skipped = source, skip, []

    def __call__(self, data: bytes, size: int | None, name: str) -> np.ndarray | None:
        from PIL import Image

        try:
            return decode_image(data, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways of saying "not a valid image"
            if self.skip:
                self.skipped.append(name)
                return None
            where = f"member {name} of archive {self.source}" if self.source.is_file() else str(self.source / name)
            raise DatasetError(
                f"cannot decode image {where} ({type(e).__name__}: {e}); remove or replace it, "
                "or set data.skip_corrupt=true to leave unreadable images out with a warning"
            ) from e


def _stack(xs: list[np.ndarray], ys: list[int], what: str) -> ImageArrays:
    if not xs:
        raise DatasetError(f"{what} has no readable images")
    return ImageArrays(np.stack(xs), np.asarray(ys, dtype=np.int64))


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"cannot read archive {path}: {e}") from e


def _iter_dir(path: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            yield p.relative_to(path).as_posix(), p.read_bytes()


def _split_files(files: Iterator[tuple[str, bytes]], splits: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """Group ``<...>/<split>/<class>/<file>`` entries into {split: {class: [(name, bytes)]}}."""
    out: dict[str, dict[str, list]] = {s: {} for s in splits}
    for name, data in files:
        parts = name.strip("./").split("/")
        for i, part in enumerate(parts[:-2]):
            if part in splits and i + 2 == len(parts) - 1:
                out[part].setdefault(parts[i + 1], []).append((name, data))
                break
    return out


def load_image_folder(path: str | Path, image_size: int | None = None, progress: bool = True, skip_corrupt: bool = False) -> SplitDataset:
    """``train/<class>/*`` and ``test/<class>/*`` (or ``val``) from a folder or ``.tar.gz``."""

    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"dataset path {path} does not exist; point data.path at an image folder "
            "(train/<class>/*.jpg, test/<class>/*.jpg) or a .tar.gz of one"
        )
    files = _iter_tar(path) if path.is_file() else _iter_dir(path)
    groups = _split_files(progress_bar(files, desc=f"reading {path.name}", unit="img", disable=not progress, mininterval=2), ("train", "test", "val"))
    test_key = "test" if groups["test"] else "val"
    if not groups["train"] or not groups[test_key]:
        raise DatasetError(f"{path} has no train/<class>/ and test/<class>/ (or val/<class>/) image folders")
    classes = sorted(groups["train"])
    if sorted(groups[test_key]) != classes:
        raise DatasetError(f"{path}: the test split's classes differ from the train split's")

    decode = _Decoder(path, skip_corrupt)

    def to_arrays(split: dict[str, list], name: str) -> ImageArrays:
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for member, data in sorted(split[c]):
                if (image := decode(data, image_size, member)) is not None:
                    xs.append(image)
                    ys.append(ci)
        return _stack(xs, ys, f"{path} ({name} split)")

    train, test = to_arrays(groups["train"], "train"), to_arrays(groups[test_key], test_key)
    return SplitDataset(train, test, classes, decode.skipped)


# ------------------------------------------------------------ CIFAR (python)
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python pickles contain (dicts, lists, bytes, numpy arrays)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 (Python >= 3.14 default)
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol 2 byte strings written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DatasetError(f"cannot read CIFAR batch {path}: {e}") from e


def _download_cifar(name: str, root: Path) -> None:
    url, _ = CIFAR_URLS[name]
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url).name
    try:
        atomic_write(archive, lambda tmp: urllib.request.urlretrieve(url, tmp))  # noqa: S310 - fixed https URL
        with tarfile.open(archive, "r:gz") as tf:
            tf.extractall(root, filter="data")
    except OSError as e:
        raise DatasetError(
            f"{name} not found under {root} and the download from {url} failed ({e}). "
            f"Download it yourself and extract it into {root}, or set data.path."
        ) from e


def load_cifar(name: str, root: str | Path, download: bool = True) -> SplitDataset:
    root = Path(root)
    folder = root / CIFAR_URLS[name][1]
    if not folder.exists() and root.name == CIFAR_URLS[name][1]:
        folder = root
    if not folder.exists():
        if not download:
            raise DatasetError(f"{name} not found at {folder} (download disabled); get it from {CIFAR_URLS[name][0]}")
        _download_cifar(name, root)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        meta = _read_cifar_batch(folder / "batches.meta")["label_names"]
    else:
        train_files = [folder / "train"]
        meta = _read_cifar_batch(folder / "meta")["fine_label_names"]

    def read(files: list[Path]) -> ImageArrays:
        xs, ys = [], []
        for f in files:
            d = _read_cifar_batch(f)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return ImageArrays(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))

    return SplitDataset(read(train_files), read([folder / "test_batch" if name == "cifar10" else folder / "test"]), list(meta))


# --------------------------------------------------------------- Tiny-ImageNet
def load_tiny_imagenet(root: str | Path, progress: bool = True, skip_corrupt: bool = False) -> SplitDataset:

    root = Path(root)
    if (root / "tiny-imagenet-200").exists():
        root = root / "tiny-imagenet-200"
    wnids_file = root / "wnids.txt"
    if not wnids_file.exists():
        raise DatasetError(f"{root} is not a Tiny-ImageNet folder (no wnids.txt); expected the tiny-imagenet-200 layout")
    classes = sorted(wnids_file.read_text().split())
    index = {c: i for i, c in enumerate(classes)}
    decode = _Decoder(root, skip_corrupt)
    xs, ys = [], []
    for c in progress_bar(classes, desc="tiny-imagenet train", disable=not progress):
        for p in sorted((root / "train" / c / "images").glob("*")):
            if (image := decode(p.read_bytes(), 64, p.relative_to(root).as_posix())) is not None:
                xs.append(image)
                ys.append(index[c])
    train = _stack(xs, ys, f"{root} (train split)")
    ann = root / "val" / "val_annotations.txt"
    if not ann.exists():
        raise DatasetError(f"{ann} is missing")
    xs, ys = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            if (image := decode((root / "val" / "images" / parts[0]).read_bytes(), 64, f"val/images/{parts[0]}")) is not None:
                xs.append(image)
                ys.append(index[parts[1]])
    return SplitDataset(train, _stack(xs, ys, f"{root} (val split)"), classes, decode.skipped)


# ------------------------------------------------------------------ entry point
def load_dataset(
    name: str,
    path: str | Path,
    cache_dir: str | Path | None = None,
    image_size: int | None = None,
    download: bool = True,
    progress: bool = True,
    skip_corrupt: bool = False,
) -> SplitDataset:
    """Load a dataset by kind, decoding once and reusing the ``.npz`` cache afterwards.

    An undecodable image is a DatasetError naming it, unless ``skip_corrupt`` (then a warning and
    ``SplitDataset.skipped``). A dataset that lost images that way is cached under its own name
    (``...-skipped.npz``), which only ``skip_corrupt`` runs read: without it the files are decoded
    again and the error names the bad file.
    """
    path = Path(path).expanduser()
    if name in CIFAR_URLS:
        return load_cifar(name, path, download=download)  # already raw arrays: no extra cache
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist (data.path); check the path or mount")
    if cache_dir is not None:
        stem = Path(cache_dir).expanduser() / f"{name}-{_cache_key(name, path)}-{image_size or 0}"
        for cache_file in [stem.with_suffix(".npz")] + ([stem.with_name(stem.name + "-skipped.npz")] if skip_corrupt else []):
            cached = _load_cached(cache_file)
            if cached is not None:
                _warn_skipped(cached, path)
                return cached
    if name == "imagefolder":
        ds = load_image_folder(path, image_size, progress, skip_corrupt)
    elif name == "tiny_imagenet":
        ds = load_tiny_imagenet(path, progress, skip_corrupt)
    else:
        raise DatasetError(f"unknown dataset kind {name!r}; use cifar10, cifar100, imagefolder or tiny_imagenet")
    if cache_dir is not None:
        _save_cache(stem.with_name(stem.name + "-skipped.npz") if ds.skipped else stem.with_suffix(".npz"), ds)
    _warn_skipped(ds, path)
    return ds


def _warn_skipped(ds: SplitDataset, path: Path) -> None:
    if ds.skipped:
        shown = ", ".join(ds.skipped[:5]) + (f", ... ({len(ds.skipped) - 5} more)" if len(ds.skipped) > 5 else "")
        print(f"warning: left out {len(ds.skipped)} unreadable image(s) of {path} (data.skip_corrupt=true): {shown}", flush=True)
