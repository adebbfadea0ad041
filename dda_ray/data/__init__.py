"""Real datasets, torch-only transforms, and the synthetic image bank."""

from .datasets import NORMALIZATION, DatasetError, ImageArrays, SplitDataset, load_dataset
from .transforms import Normalize, TrainTransform, to_float, to_uint8

__all__ = [
    "NORMALIZATION",
    "DatasetError",
    "ImageArrays",
    "SplitDataset",
    "load_dataset",
    "Normalize",
    "TrainTransform",
    "to_float",
    "to_uint8",
    "channel_stats",
    "load_data",
    "data_source",
]


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 NHWC images, in [0, 1] units."""
    import numpy as np

    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


def data_source(cfg_data) -> tuple[str, str]:
    """The dataset kind and path a run reads: ``data.dataset`` at ``data.path``, or, when that path
    is absent and ``data.fallback`` names an official dataset, that dataset in ``data.path``'s
    folder (downloaded there by :func:`load_dataset` unless ``data.download`` is false)."""
    from pathlib import Path

    from .datasets import CIFAR_URLS

    c = cfg_data
    path = Path(c.path).expanduser()
    if c.fallback and c.dataset not in CIFAR_URLS and not path.exists():
        return c.fallback, str(path.parent)
    return c.dataset, c.path


def load_data(cfg_data, progress: bool = True) -> SplitDataset:
    """Load the dataset a :class:`~dda_ray.config.DataConfig` describes and check its class count."""
    c = cfg_data
    kind, path = data_source(c)
    if kind != c.dataset:
        print(f"note: data.path = {c.path} is absent: reading the official {kind} from {path} instead (data.fallback)", flush=True)
    ds = load_dataset(kind, path, c.cache_dir, c.image_size, c.download, progress, skip_corrupt=c.skip_corrupt)
    if ds.num_classes != cfg_data.num_classes:
        raise DatasetError(f"{cfg_data.path} has {ds.num_classes} classes but data.num_classes = {cfg_data.num_classes}")
    return ds
