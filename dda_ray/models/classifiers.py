"""CIFAR-style classifiers used as teachers and students.

Every classifier takes a normalised NCHW float batch and returns logits, or, with
``return_features=True``, a :class:`ModelOutput` carrying what DFKD needs: the feature map the
feature-alignment loss compares (the DFKD codebases' ``features[-2]``) and the pooled embedding
(rotation head, cosine filter, bank). Architectures follow the CIFAR variants used across the
DFKD literature (3x3 stems, no max-pool): the WRNs, ResNets and VGG compute what the DFKD
codebases' networks compute, so their checkpoints load by name once their keys are renamed
(:mod:`.community`). MobileNetV2 is a CIFAR variant (stride-1 stem) of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    # (N, C, H, W): the map DDA's feature term aligns, the reference networks' ``features[-2]``: the last
    # conv stage's output; for the pre-activation WRNs that is the raw block-3 output, *before* the final
    # BatchNorm/ReLU (ResNet, VGG, MobileNetV2: after their activation, as they compute it)
    feature_map: torch.Tensor
    embedding: torch.Tensor  # (N, C): global-average-pooled final (activated) map, what ``fc`` sees


class Classifier(nn.Module):
    """Base class: subclasses implement ``features`` (-> map) and own ``fc``; a network whose
    aligned map is not its final one overrides ``feature_maps``."""

    fc: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the map the feature term aligns, the final map ``fc`` pools)."""
        fmap = self.features(x)
        return fmap, fmap

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def forward(self, x: torch.Tensor, return_features: bool = False):
        aligned, fmap = self.feature_maps(x)
        emb = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        logits = self.fc(emb)
        if return_features:
            return ModelOutput(logits, aligned, emb)
        return logits


# ---------------------------------------------------------------- ResNet (CIFAR)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    def __init__(self, num_blocks: list[int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# ---------------------------------------------------------- Wide ResNet (CIFAR)
class WideBlock(nn.Module):
    """Pre-activation wide-resnet block (BN-ReLU-conv twice, projection when shapes change)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(Classifier):
    def __init__(self, depth: int, widen: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide-resnet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        in_planes = widths[0]
        for w, stride in zip(widths[1:], [1, 2, 2], strict=True):
            for i in range(n):
                blocks.append(WideBlock(in_planes, w, stride if i == 0 else 1))
                in_planes = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x):
        return self.feature_maps(x)[1]

    def feature_maps(self, x):
        raw = self.blocks(self.conv1(x))  # the reference WRN's f3 = features[-2]
        return raw, F.relu(self.bn(raw))


# ------------------------------------------------------------------ VGG (CIFAR)
_VGG11 = [[64], [128], [256, 256], [512, 512], [512, 512]]  # 3x3 conv widths per stage


class VGG(Classifier):
    """VGG with BatchNorm: five stages of conv-BN-ReLU, max-pooled in between, globally pooled at the end.

    Laid out as the CIFAR VGGs of the DFKD codebases (CMI, Fast-Datafree, DDA), so their
    teachers load (``checkpoint.py`` maps their key names): stages 0-2 are each followed by a
    2x2 max-pool; the pool after stage 3 is only applied to 64-px inputs (Tiny-ImageNet), so on
    32-px inputs the last two stages both run at 4x4.
    """

    def __init__(self, stages: list[list[int]], num_classes: int = 10):
        super().__init__()
        blocks: list[nn.Module] = []
        c = 3
        for widths in stages:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            blocks.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, num_classes)

    def features(self, x):
        pool_before_last = x.shape[-2] == 64
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if 0 < i < last or (i == last and pool_before_last):
                x = F.max_pool2d(x, 2)
            x = stage(x)
        return x


# ------------------------------------------------------------ MobileNetV2 (CIFAR)
class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, expansion: int, stride: int):
        super().__init__()
        hidden = inp * expansion
        self.use_res = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(Classifier):
    # (expansion, out channels, repeats, stride); stride 1 in the first two stages for 32x32 inputs
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)]
        for t, ch, n, s in self.SETTINGS:
            out = int(ch * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, t, s if i == 0 else 1))
                c = out
        last = 1280
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def features(self, x):
        return self.body(x)


ARCHITECTURES = {
    "resnet18": lambda num_classes: ResNet([2, 2, 2, 2], num_classes),
    "resnet34": lambda num_classes: ResNet([3, 4, 6, 3], num_classes),
    "wrn16_1": lambda num_classes: WideResNet(16, 1, num_classes),
    "wrn16_2": lambda num_classes: WideResNet(16, 2, num_classes),
    "wrn40_1": lambda num_classes: WideResNet(40, 1, num_classes),
    "wrn40_2": lambda num_classes: WideResNet(40, 2, num_classes),
    "vgg11": lambda num_classes: VGG(_VGG11, num_classes),
    "mobilenetv2": lambda num_classes: MobileNetV2(num_classes),
}
