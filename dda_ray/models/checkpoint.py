"""Classifier checkpoints: the project's format and the DFKD community's ``.pth`` files.

Project format: a directory holding ``model.safetensors`` (weights; no code can hide in it)
and ``meta.json`` (``arch``, ``num_classes``, ``mean``, ``std``, ``accuracy`` and free-form
extras). It is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint under the final name.

Community format: ``.pth``/``.pt`` files holding ``{"state_dict": ...}`` (or a bare state
dict), read with ``torch.load(..., weights_only=True)``: a file carrying pickled code is
refused. Arch and class count then come from the config. Files in the key layout of the DFKD
codebases (CMI, Fast-Datafree, DDA) are renamed to the registry's (:mod:`.models.community`);
such a teacher's normalisation defaults to those codebases' values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..runtime import atomic_write
from . import build_model
from .community import COMMUNITY_NORMALIZATION, to_registry_layout
from .community import LAYOUT as COMMUNITY_LAYOUT

META = "meta.json"
WEIGHTS = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match the config."""


def save_classifier(
    model: nn.Module, path: str | Path, *, arch: str, num_classes: int, mean, std, accuracy: float | None = None, **extra
) -> Path:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": "dda_ray.classifier/1",
        "arch": arch,
        "num_classes": num_classes,
        "mean": list(mean),
        "std": list(std),
        "accuracy": accuracy,
        **extra,
    }

    def write(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2))

    return atomic_write(path, write, directory=True)


def fingerprint(model: nn.Module) -> str:
    """Short content hash of a model's weights and buffers (names, dtypes, shapes, values).

    Identifies the teacher a bank was synthesised with, whatever file it was loaded from.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def read_meta(path: str | Path) -> dict | None:
    """meta.json of a project checkpoint, or None for a community file."""
    path = Path(path)
    meta_file = path / META if path.is_dir() else (path if path.suffix == ".json" else None)
    if meta_file is None:
        return None
    try:
        return json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {meta_file} is unreadable: {e}") from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() or path.suffix == ".json":
        weights = (path if path.is_dir() else path.parent) / WEIGHTS
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint weights {weights} are corrupt or unreadable: {e}") from e
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code payloads, RuntimeError for corrupt zips
        raise CheckpointError(
            f"refusing or unable to load {path} with weights-only loading ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Only tensors/state dicts are accepted; re-save the weights with torch.save(model.state_dict())."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of tensor names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel / DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_classifier(path: str | Path, arch: str | None, num_classes: int) -> tuple[nn.Module, dict]:
    """Build ``arch`` and load weights; refuse a checkpoint made for another arch/class count.

    ``arch=None`` takes the architecture the checkpoint's ``meta.json`` names (a community
    file without one is refused with a message saying to set the field).
    """
    meta = read_meta(path) or {}
    if arch is None:
        arch = meta.get("arch")
        if not arch:
            from ..config import ConfigError

            raise ConfigError(
                f"teacher.arch is not set and checkpoint {path} has no meta.json naming its architecture; "
                "set teacher.arch to a registry name (e.g. wrn40_2) or 'package.module:factory'"
            )
    if meta:
        if meta.get("arch") != arch:
            raise CheckpointError(
                f"checkpoint {path} holds a {meta.get('arch')!r} but the config asks for {arch!r}; fix teacher.arch or the checkpoint path"
            )
        if meta.get("num_classes") != num_classes:
            raise CheckpointError(f"checkpoint {path} has {meta.get('num_classes')} classes but data.num_classes = {num_classes}")
    model = build_model(arch, num_classes)
    state = load_state_dict(path)
    if not meta and (mapped := to_registry_layout(arch, state)) is not None:
        state, meta = mapped, {"layout": COMMUNITY_LAYOUT}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"checkpoint {path} does not fit a {arch} with {num_classes} classes: {' '.join(first)}") from e
    return model, meta


def teacher_normalization(cfg, meta: dict) -> tuple[list[float], list[float], float]:
    """``(mean, std, input_scale)`` of the teacher's input: the model sees ``(x * input_scale - mean) / std``
    for images ``x`` in [0, 1].

    ``teacher.mean`` / ``teacher.std`` win. Left null with ``teacher.input_scale = 1`` they come from
    the checkpoint's ``meta.json``; for a file in the DFKD codebases' layout, from those codebases'
    values for the dataset (:data:`.models.community.COMMUNITY_NORMALIZATION`); else the dataset's
    standard values (other ``.pth`` files record none). With another ``input_scale`` (e.g. 255 for a
    model fed raw 0-255 pixels) they default to 0 and 1: all of the above describe [0, 1] inputs.
    """
    from ..data.datasets import NORMALIZATION

    t = cfg.teacher
    scale = float(t.input_scale)
    if scale != 1.0:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    elif meta.get("mean") and meta.get("std"):
        mean, std = meta["mean"], meta["std"]
    elif meta.get("layout") == COMMUNITY_LAYOUT:
        mean, std = COMMUNITY_NORMALIZATION.get(cfg.data.dataset, COMMUNITY_NORMALIZATION["cifar10"])
    else:
        mean, std = NORMALIZATION.get(cfg.data.dataset, NORMALIZATION["cifar10"])
    mean = list(t.mean) if t.mean is not None else list(mean)
    std = list(t.std) if t.std is not None else list(std)
    return mean, std, scale


def load_teacher(cfg) -> tuple[nn.Module, Normalize, dict]:  # noqa: F821 - imported lazily
    """The configured teacher (frozen, eval mode) and the normalisation it was trained with.

    ``teacher.arch`` may be null when the checkpoint's meta.json names the architecture; the
    input normalisation is :func:`teacher_normalization`'s.
    """
    from ..data.transforms import Normalize

    if not cfg.teacher.checkpoint:
        raise CheckpointError("teacher.checkpoint is not set; point it at a project checkpoint directory or a .pth file")
    model, meta = load_classifier(cfg.teacher.checkpoint, cfg.teacher.arch, cfg.data.num_classes)
    mean, std, scale = teacher_normalization(cfg, meta)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, Normalize(mean, std, scale), meta


class NormalizedClassifier(nn.Module):
    """A classifier with its input normalisation inside: float32 NCHW RGB images in [0, 1] -> logits.

    What the MLflow Model of a job is (``runs:/<run_id>/model``, :meth:`~dda_ray.tracking.Tracker.log_model`):
    a user feeds plain images, not images normalised with the statistics the network was trained on.
    The statistics are buffers, so they travel inside the exported graph.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def load_normalized_classifier(path: str | Path) -> tuple[NormalizedClassifier, dict]:
    """A project checkpoint (``student/``, ``teacher/``) as a :class:`NormalizedClassifier` in eval mode, with its meta."""
    meta = read_meta(path)
    if not meta or not meta.get("arch") or not meta.get("mean") or not meta.get("std"):
        raise CheckpointError(f"{path} is not a project checkpoint with arch, mean and std in its {META}")
    model, _ = load_classifier(path, meta["arch"], meta["num_classes"])
    return NormalizedClassifier(model, meta["mean"], meta["std"]).eval(), meta


def resolved_teacher_arch(cfg) -> str | None:
    """``teacher.arch``, or the architecture the teacher checkpoint's meta.json names (None if neither)."""
    if cfg.teacher.arch:
        return cfg.teacher.arch
    try:
        return (read_meta(cfg.teacher.checkpoint) or {}).get("arch") if cfg.teacher.checkpoint else None
    except CheckpointError:
        return None
