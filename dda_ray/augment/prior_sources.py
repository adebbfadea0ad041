"""What the local diffusion prior trains on: the synthetic bank, an unlabeled image folder, or
natural photographs shipped inside installed packages (``augment.prior_source``).

Each source is a :class:`PriorSource` whose ``sample(batch_size, generator)`` returns one batch
of uint8 NHWC images (a CPU tensor) and their int64 class labels (None: every image is the null
class). :func:`dda_ray.augment.prior.train_prior` draws every batch through it, so the training loop is
the same whatever the source.

* ``bank``: the synthetic bank at ``augment.prior_bank`` with its labels (the synthesis targets),
  at the bank's resolution, random horizontal flips.
* ``folder``: every ``.png/.jpg/.jpeg/.bmp/.webp`` under ``augment.prior_folder`` (searched
  recursively), or inside a ``.tar/.tar.gz/.tgz/.zip`` archive of such images. No labels needed.
* ``photos``: the natural colour photographs listed in :data:`PACKAGED_PHOTOS`, read from the
  installed scikit-image, scikit-learn and matplotlib packages (no download).

``folder`` and ``photos`` images are decoded once (Pillow), kept as uint8 arrays (shorter side
scaled down to at most ``8 * data.image_size``, which loses nothing at the crop scales used) and
cropped on the fly: random resized crops at ``data.image_size`` covering a random fraction
``augment.prior_crop_scale`` of the image area, aspect ratio jittered within [3/4, 4/3],
horizontal flips (``augment.prior_hflip``) and brightness/contrast/saturation jitter
(``augment.prior_color_jitter``), all drawn from the training run's seeded ``torch.Generator``.
Their labels (``augment.prior_labels``) are the teacher's argmax on each crop (``teacher``) or the
null class (``none``: an unconditional prior).

Nothing here reads the configured dataset (``data.path``): only the bank, the folder, the
packaged photos and, for ``teacher`` labels, the teacher checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..data.datasets import decode_image
from ..data.photos import PACKAGED_PHOTOS, PackagedPhoto, packaged_photo_path

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTS",
    "PACKAGED_PHOTOS",
    "CropBatch",
    "PackagedPhoto",
    "PriorSource",
    "SourceImages",
    "TeacherLabeler",
    "bank_source",
    "build_prior_source",
    "crop_source",
    "load_folder_images",
    "load_packaged_photos",
    "random_resized_crops",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ASPECT_RATIO = (3 / 4, 4 / 3)  # range of crop width / height (log-uniform)
MAX_SIDE_FACTOR = 8  # decoded images keep a shorter side of at most this many times the prior's resolution
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights (saturation and contrast jitter)


# ----------------------------------------------------------------- decoding
@dataclass
class SourceImages:
    """Decoded source images (uint8 HWC, varying sizes) and their names."""

    names: list[str]
    images: list[np.ndarray]
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded

    def __len__(self) -> int:
        return len(self.images)


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _iter_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(path.rglob("*")):
        if p.is_file() and _is_image(p.name):
            yield p.relative_to(path).as_posix(), p.read_bytes()


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every image in a tar or zip archive, in name order; nothing is extracted."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if not info.is_dir() and _is_image(info.filename):
                        yield info.filename, zf.read(info)
        else:
            with tarfile.open(path, "r:*") as tf:
                members = sorted((m for m in tf.getmembers() if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
                for m in members:
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConfigError(f"augment.prior_folder = {str(path)!r}: cannot read the archive ({e})") from e


def load_folder_images(path: str | Path, max_short_side: int | None = None) -> SourceImages:
    """Every readable image under a folder (recursively) or inside a .tar/.tar.gz/.tgz/.zip archive."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"augment.prior_folder = {str(path)!r} does not exist; point it at a folder of images or a {'/'.join(ARCHIVE_SUFFIXES)} archive of them")
    if path.is_file() and not _is_archive(path):
        raise ConfigError(f"augment.prior_folder = {str(path)!r} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    files = _iter_archive(path) if path.is_file() else _iter_folder(path)
    out = SourceImages([], [])
    for name, data in files:
        try:
            image = decode_image(data, max_short_side=max_short_side)
        except Exception:  # noqa: BLE001 - Pillow raises many types for a broken file; skip it, report it
            out.skipped.append(name)
            continue
        out.names.append(name)
        out.images.append(image)
    if not out.images:
        found = f"; {len(out.skipped)} file(s) failed to decode" if out.skipped else ""
        raise ConfigError(f"augment.prior_folder = {str(path)!r} holds no readable image ({'/'.join(IMAGE_EXTS)}){found}")
    if out.skipped:
        warnings.warn(f"augment.prior_folder: skipped {len(out.skipped)} unreadable image(s), e.g. {out.skipped[0]}", stacklevel=2)
    return out


def load_packaged_photos(max_short_side: int | None = None, photos: tuple[PackagedPhoto, ...] = PACKAGED_PHOTOS) -> SourceImages:
    """The packaged photographs, decoded from the installed packages' files (never downloaded)."""
    out = SourceImages([], [])
    for photo in photos:
        out.names.append(photo.name)
        out.images.append(decode_image(packaged_photo_path(photo).read_bytes(), max_short_side=max_short_side))
    return out


def package_versions(photos: tuple[PackagedPhoto, ...] = PACKAGED_PHOTOS) -> dict[str, str]:
    out = {}
    for dist in sorted({p.distribution for p in photos}):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


# ----------------------------------------------------------------- crops
@dataclass
class CropBatch:
    images: torch.Tensor  # (N, size, size, 3) uint8
    index: torch.Tensor  # (N,) int64: which source image each crop comes from
    boxes: torch.Tensor  # (N, 4) int64: top, left, height, width in that (decoded) image
    flipped: torch.Tensor  # (N,) bool


def crop_boxes(
    shapes: torch.Tensor, index: torch.Tensor, scale: tuple[float, float], generator: torch.Generator, ratio: tuple[float, float] = ASPECT_RATIO
) -> torch.Tensor:
    """Random boxes (top, left, height, width) covering a fraction in ``scale`` of each image's area.

    ``shapes`` is (num_images, 2) heights and widths; ``index`` picks the image of each box. The
    area fraction and the log aspect ratio are uniform; a box wider (taller) than its image is
    clamped to the image's width (height) at the same area, so the area fraction always holds
    (up to rounding) and every draw succeeds: the same number of random numbers per box.
    """
    u = torch.rand((len(index), 4), generator=generator, dtype=torch.float64)
    hw = shapes[index].to(torch.float64)
    H, W = hw[:, 0], hw[:, 1]
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    wide = w > W
    w, h = torch.where(wide, W, w), torch.where(wide, area / W, h)
    tall = h > H
    h, w = torch.where(tall, H, h), torch.where(tall, area / H, w)
    h = torch.minimum(torch.round(h).clamp_min(1), H)
    w = torch.minimum(torch.round(w).clamp_min(1), W)
    top = torch.floor(u[:, 2] * (H - h + 1)).clamp(max=H - h)
    left = torch.floor(u[:, 3] * (W - w + 1)).clamp(max=W - w)
    return torch.stack([top, left, h, w], 1).to(torch.int64)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, then contrast, then saturation of float NCHW images in [0, 255], each factor
    uniform in [1 - strength, 1 + strength] per image."""
    f = 1 + strength * (2 * torch.rand((x.shape[0], 3), generator=generator) - 1)
    gray_w = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    x = x * f[:, 0].view(-1, 1, 1, 1)
    mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * f[:, 1].view(-1, 1, 1, 1) + mean
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (x - gray) * f[:, 2].view(-1, 1, 1, 1) + gray
    return x.clamp(0, 255)


def random_resized_crops(
    images: list[np.ndarray],
    n: int,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 0.5),
    hflip: bool = True,
    jitter: float = 0.0,
) -> CropBatch:
    """``n`` random resized crops (``size`` x ``size``, uint8 NHWC) of uint8 HWC ``images``.

    Each crop picks a source image uniformly, a box with :func:`crop_boxes`, resizes it
    (bilinear, antialiased when shrinking), then flips half the crops (``hflip``) and jitters
    colours (``jitter``). Every random number comes from ``generator``: the same generator state
    gives the same crops.
    """
    shapes = torch.tensor([img.shape[:2] for img in images], dtype=torch.int64)
    index = torch.randint(0, len(images), (n,), generator=generator)
    boxes = crop_boxes(shapes, index, scale, generator)
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for k, ((top, left, h, w), i) in enumerate(zip(boxes.tolist(), index.tolist(), strict=True)):
        patch = torch.from_numpy(images[i][top : top + h, left : left + w]).permute(2, 0, 1)[None].float()
        out[k] = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size or w > size)[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    if hflip:
        flipped = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(3), out)
    if jitter > 0:
        out = color_jitter(out, jitter, generator)
    crops = out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return CropBatch(crops, index, boxes, flipped)


# ----------------------------------------------------------------- labels
class TeacherLabeler:
    """The teacher's argmax class of uint8 NHWC images, with its own normalisation (eval mode, no grad)."""

    def __init__(self, model: torch.nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu", batch_size: int = 256):
        self.model = model.to(device).eval()
        self.normalize, self.device, self.batch_size = normalize, torch.device(device), batch_size

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu") -> TeacherLabeler:
        from ..models.checkpoint import load_teacher

        model, normalize, _ = load_teacher(cfg)
        return cls(model, normalize, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from ..data.transforms import to_float

        out = []
        for s in range(0, len(images), self.batch_size):
            x = to_float(images[s : s + self.batch_size]).to(self.device)
            out.append(self.model(self.normalize(x)).argmax(1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# ----------------------------------------------------------------- sources
Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class PriorSource:
    """A source of prior-training batches: ``sample(batch_size, generator)`` -> (uint8 NHWC
    images, int64 labels or None for the null class), at ``image_size``."""

    kind: str  # bank | folder | photos
    location: str | None  # the bank or folder path; None for photos
    names: list[str]  # bank files, folder file names, or packaged photo names
    num_images: int
    image_size: int
    label_mode: str  # bank | teacher | none
    sample: Sampler
    num_classes: int | None = None  # the label space (None: infer it from the bank's labels)
    label_range: tuple[int, int] | None = None  # bank: (min, max) label
    info: dict = field(default_factory=dict)  # extra fields for training.json

    def describe(self) -> dict:
        out = {"source": self.kind, "labels": self.label_mode, "num_images": self.num_images, "images": list(self.names)}
        if self.kind == "bank":
            out["bank"] = self.location
        elif self.kind == "folder":
            out["folder"] = self.location
        return {**out, **self.info}


def bank_source(bank_dir: str | Path, hflip: bool = True, label_mode: str = "bank") -> PriorSource:
    """The synthetic bank: random rows with their labels (``label_mode`` ``none``: the null class)."""
    from ..data.bank import bank_files, read_bank

    bank_dir = Path(bank_dir)
    if not bank_dir.exists():
        raise ConfigError(f"augment.prior_bank = {str(bank_dir)!r} does not exist; point it at a synthetic bank directory (round-*.parquet)")
    bank = read_bank(bank_dir)
    if len(bank) == 0:
        raise ConfigError(f"augment.prior_bank = {str(bank_dir)!r} holds no images")
    n, h, w, c = bank.images.shape
    if h != w or c != 3:
        raise ConfigError(f"the prior trains on square RGB images; the bank at {bank_dir} holds {h}x{w}x{c}")
    images = torch.from_numpy(np.ascontiguousarray(bank.images))
    labels = torch.from_numpy(bank.labels.astype(np.int64))

    def sample(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        x = images[idx]
        if hflip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
        return x, (labels[idx].clone() if label_mode == "bank" else None)

    return PriorSource(
        kind="bank",
        location=str(bank_dir),
        names=[f.name for f in bank_files(bank_dir)],
        num_images=int(n),
        image_size=int(h),
        label_mode=label_mode,
        sample=sample,
        label_range=(int(bank.labels.min()), int(bank.labels.max())),
    )


def crop_source(
    kind: str,
    location: str | None,
    source: SourceImages,
    image_size: int,
    *,
    num_classes: int,
    labeler: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scale: tuple[float, float] = (0.02, 0.5),
    hflip: bool = True,
    jitter: float = 0.1,
    info: dict | None = None,
) -> PriorSource:
    """Random resized crops of decoded images; labels from ``labeler`` (None: the null class)."""

    def sample(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        crops = random_resized_crops(source.images, batch_size, image_size, generator, scale=scale, hflip=hflip, jitter=jitter)
        return crops.images, (labeler(crops.images).to(torch.int64) if labeler is not None else None)

    extra = {"crop_scale": list(scale), "color_jitter": jitter, "hflip": hflip, "skipped": list(source.skipped), **(info or {})}
    return PriorSource(
        kind=kind,
        location=location,
        names=list(source.names),
        num_images=len(source),
        image_size=int(image_size),
        label_mode="teacher" if labeler is not None else "none",
        sample=sample,
        num_classes=num_classes,
        info=extra,
    )


def build_prior_source(cfg: Config, device: str | torch.device | None = None) -> PriorSource:
    """The source ``cfg.augment.prior_source`` names, with ``cfg.augment.prior_labels`` labels.

    ``folder``/``photos`` crops are ``cfg.data.image_size`` pixels; ``teacher`` labels load the
    teacher with :func:`dda_ray.models.checkpoint.load_teacher` (on ``device``, default ``augment.device``).
    Reads only the bank, the folder or the packaged photos, and the teacher checkpoint.
    """
    from ..runtime import resolve_device

    aug = cfg.augment
    aug.validate("augment")
    if aug.prior_source == "bank":
        if aug.prior_bank is None:
            raise ConfigError("augment.prior_bank is not set; pass --bank DIR (a synthetic bank directory) or augment.prior_bank=DIR")
        return bank_source(aug.prior_bank, aug.prior_hflip, "bank" if aug.prior_labels == "teacher" else "none")
    size = cfg.data.image_size
    max_side = MAX_SIDE_FACTOR * size
    if aug.prior_source == "folder":
        if aug.prior_folder is None:
            raise ConfigError("augment.prior_source = 'folder' but augment.prior_folder is not set; pass --folder DIR or augment.prior_folder=DIR")
        location: str | None = str(Path(aug.prior_folder).expanduser())
        images = load_folder_images(location, max_side)
        info: dict = {}
    else:
        location = None
        images = load_packaged_photos(max_side)
        info = {"packages": package_versions()}
    labeler = None
    if aug.prior_labels == "teacher":
        labeler = TeacherLabeler.from_config(cfg, resolve_device(str(device) if device is not None else aug.device))
    return crop_source(
        aug.prior_source,
        location,
        images,
        size,
        num_classes=cfg.data.num_classes,
        labeler=labeler,
        scale=(aug.prior_crop_scale[0], aug.prior_crop_scale[1]),
        hflip=aug.prior_hflip,
        jitter=aug.prior_color_jitter,
        info=info,
    )
