"""Tiny model factories for ``build_model("module:factory")`` tests."""

from __future__ import annotations

from torch import nn

from dda_ray.models.classifiers import WideResNet

TOY_WIDTH = 8


def toy(num_classes: int = 10) -> nn.Module:
    """A plain nn.Module classifier (not a dda_ray Classifier): conv -> pool -> linear."""
    return nn.Sequential(
        nn.Conv2d(3, TOY_WIDTH, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(TOY_WIDTH, num_classes),
    )


def no_linear(num_classes: int = 10) -> nn.Module:
    """A module without any nn.Linear: cannot be wrapped as a classifier."""
    return nn.Sequential(nn.Conv2d(3, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def native(num_classes: int = 10) -> nn.Module:
    """Already a dda_ray Classifier: must be returned as is, not wrapped."""
    return WideResNet(16, 1, num_classes)
