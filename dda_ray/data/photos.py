"""Natural colour photographs shipped inside installed packages (scikit-image, scikit-learn,
matplotlib): the ``photos`` source of the local prior (:mod:`dda_ray.augment.prior_sources`), read without
any download.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

__all__ = ["PACKAGED_PHOTOS", "PackagedPhoto", "packaged_photo_path"]


@dataclass(frozen=True)
class PackagedPhoto:
    """One natural photograph shipped inside an installed package."""

    distribution: str  # the PyPI name (pip install ...)
    module: str  # the import name whose directory holds the file
    path: str  # inside that directory
    size: tuple[int, int]  # (width, height) as shipped
    shows: str
    cifar10: str | None = None  # the CIFAR-10 class it depicts, if any

    @property
    def name(self) -> str:
        return f"{self.module}/{self.path}"


# Colour photographs only: grayscale ones (camera, coins, moon, textures), drawings, microscopy,
# medical images and synthetic test patterns are left out. docs/AUGMENTATION.md lists them too.
PACKAGED_PHOTOS: tuple[PackagedPhoto, ...] = (
    PackagedPhoto("scikit-image", "skimage", "data/astronaut.png", (512, 512), "astronaut Eileen Collins in an orange suit; US flag, shuttle model"),
    PackagedPhoto("scikit-image", "skimage", "data/chelsea.png", (451, 300), "Chelsea, a tabby cat (head close-up)", "cat"),
    PackagedPhoto("scikit-image", "skimage", "data/coffee.png", (600, 400), "a cup of coffee on a saucer, wooden table"),
    PackagedPhoto("scikit-image", "skimage", "data/rocket.jpg", (640, 427), "a rocket on its launch pad at dusk, lightning towers"),
    PackagedPhoto("scikit-image", "skimage", "data/motorcycle_left.png", (741, 500), "a red motorcycle in a workshop (left view of a stereo pair)"),
    PackagedPhoto("scikit-image", "skimage", "data/hubble_deep_field.jpg", (1000, 872), "Hubble deep field: galaxies on a black sky"),
    PackagedPhoto("scikit-learn", "sklearn", "datasets/images/china.jpg", (640, 427), "a Chinese pagoda above a lake and trees (a small boat on the water)"),
    PackagedPhoto("scikit-learn", "sklearn", "datasets/images/flower.jpg", (640, 427), "an orange dahlia flower, green background"),
    PackagedPhoto("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", (512, 600), "portrait of Rear Admiral Grace Hopper in uniform"),
)


def _module_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_photo_path(photo: PackagedPhoto) -> Path:
    root = _module_dir(photo.module)
    path = root / photo.path if root is not None else None
    if path is None or not path.is_file():
        why = f"{photo.module} is not installed" if root is None else f"{path} is missing"
        raise ConfigError(f"augment.prior_source = 'photos' needs {photo.name} from the {photo.distribution} package ({why}); pip install {photo.distribution}")
    return path
