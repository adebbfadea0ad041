"""Checkpoints of the DFKD community codebases (zju-vipa/CMI, zju-vipa/Fast-Datafree, SLGSP/DDA).

Their CIFAR teachers (the ``.pth`` files the papers' tables start from) hold the same networks as
this registry under other key names. :func:`to_registry_layout` renames a state dict in their layout
to the registry's, per architecture family, and only when the file's keys are in that layout:

========  =====================================================  ==========================================
family    their keys                                             ours
========  =====================================================  ==========================================
wrn*      ``block{1,2,3}.layer.{i}.*``, ``...convShortcut``,     ``blocks.{(b-1)*n+i}.*``, ``...shortcut``,
          final ``bn1``, ``fc``                                  final ``bn``, ``fc``
resnet*   ``conv1``, ``bn1``, ``layer{1..4}.{j}.*``, ``linear``  the same, ``fc``
vgg*      ``block{0..4}.{k}``, ``classifier``                    ``stages.{s}.{k}``, ``fc``
========  =====================================================  ==========================================

(``mobilenetv2`` has no map: their MobileNetV2 is torchvision's ImageNet network, whose strides
differ from the CIFAR variant here, so its weights would load into a different function.)

Those teachers were trained on inputs normalised with the codebases' own per-dataset values
(``NORMALIZE_DICT`` in their ``registry.py``), which differ from the ones this project measures
(``data.datasets.NORMALIZATION``): :data:`COMMUNITY_NORMALIZATION` is what a teacher loaded from
such a file sees unless ``teacher.mean`` / ``teacher.std`` say otherwise.
"""

from __future__ import annotations

import re

import torch

from .classifiers import ARCHITECTURES

LAYOUT = "dfkd-community"  # meta["layout"] of a checkpoint loaded through a map below

# NORMALIZE_DICT of zju-vipa/CMI and zju-vipa/Fast-Datafree registry.py (identical in both), by
# the dataset names their get_dataset() uses: cifar10, cifar100, tiny_imagenet.
COMMUNITY_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_WRN_BLOCK = re.compile(r"block([123])\.layer\.(\d+)\.(.+)")
_VGG_BLOCK = re.compile(r"block(\d)\.(\d+)\.(.+)")


def _wrn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if not any(k.startswith("block1.layer.0.") for k in state) or "fc.weight" not in state or "bn1.weight" not in state:
        return None
    per_block = len({m.group(2) for k in state if (m := _WRN_BLOCK.fullmatch(k)) and m.group(1) == "1"})
    out = {}
    for k, v in state.items():
        if m := _WRN_BLOCK.fullmatch(k):
            b, i, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            out[f"blocks.{(b - 1) * per_block + i}.{rest.replace('convShortcut.', 'shortcut.')}"] = v
        elif k.startswith("bn1."):
            out[f"bn.{k.removeprefix('bn1.')}"] = v
        else:
            out[k] = v  # conv1.*, fc.*
    return out


def _resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if "linear.weight" not in state or not any(k.startswith("layer1.0.conv1.") for k in state):
        return None
    return {(f"fc.{k.removeprefix('linear.')}" if k.startswith("linear.") else k): v for k, v in state.items()}


def _vgg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if "classifier.weight" not in state or "block0.0.weight" not in state:
        return None
    out = {}
    for k, v in state.items():
        if m := _VGG_BLOCK.fullmatch(k):
            out[f"stages.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = v
        elif k.startswith("classifier."):
            out[f"fc.{k.removeprefix('classifier.')}"] = v
        else:
            out[k] = v
    return out


_MAPS = {"wrn": _wrn, "resnet": _resnet, "vgg": _vgg}


def family(arch: str) -> str | None:
    """The community layout family of a registry architecture (None: no map, or not a registry name)."""
    if arch not in ARCHITECTURES:
        return None
    return next((f for f in _MAPS if arch.startswith(f)), None)


def to_registry_layout(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``state`` renamed to the registry's keys when it is in the community layout of ``arch``'s family, else None."""
    fam = family(arch)
    return _MAPS[fam](state) if fam is not None else None


__all__ = ["COMMUNITY_NORMALIZATION", "LAYOUT", "family", "to_registry_layout"]
