"""Model registry: classifiers by name or import path, plus DFKD's generator and heads."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..config.sections import is_import_path
from .classifiers import ARCHITECTURES, Classifier, ModelOutput
from .generator import Generator
from .heads import AlignHead, MLPHead, RotationHead, rotate_batch

__all__ = [
    "ARCHITECTURES",
    "AlignHead",
    "Classifier",
    "Generator",
    "ImportedClassifier",
    "MLPHead",
    "ModelOutput",
    "RotationHead",
    "build_model",
    "is_import_path",
    "rotate_batch",
]


class ImportedClassifier(Classifier):
    """Wraps any ``nn.Module`` classifier whose last layer is an ``nn.Linear``.

    The embedding is the input of that final linear layer (captured by a hook); with no
    spatial map available the feature map is the embedding viewed as (N, C, 1, 1).

    Weights: the wrapper's own state dict is the module's under ``module.``; ``fc`` is only a
    reference to the module's last linear layer, not a second registered copy of it. Loading
    accepts the module's plain ``state_dict()`` (what ``torch.save(model.state_dict())`` of the
    user's own model writes) as well as the wrapped layout, including the one of older
    checkpoints that also held that layer under ``fc.``.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"imported model {type(module).__name__} has no nn.Linear classifier layer")
        self.module = module
        object.__setattr__(self, "fc", linears[-1])  # not a submodule: its weights are already under module.
        self._captured: torch.Tensor | None = None
        self.fc.register_forward_hook(self._capture)
        self._register_load_state_dict_pre_hook(self._accept_plain_layout)

    def _capture(self, _mod, inputs, _out):
        self._captured = inputs[0]

    def _accept_plain_layout(self, state_dict, prefix, *_args) -> None:
        """Rename a plain module state dict (``conv.weight``) to the wrapped one (``module.conv.weight``),
        and drop the duplicate ``fc.*`` copy of the last linear layer older wrapped checkpoints carry."""
        inner = set(self.module.state_dict())
        local = [k for k in state_dict if k.startswith(prefix)]
        wrapped = {f"module.{k}" for k in inner}
        duplicates = {"fc.weight", "fc.bias"}
        if any(k[len(prefix) :] in wrapped for k in local):  # the wrapped layout
            for k in local:
                if k[len(prefix) :] in duplicates:
                    del state_dict[k]
            return
        for k in local:
            name = k[len(prefix) :]
            value = state_dict.pop(k)
            if name in duplicates and name not in inner:
                continue  # a wrapped checkpoint whose module. prefix was stripped (DataParallel-style loading)
            state_dict[f"{prefix}module.{name}"] = value

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = self.module(x)
        if not return_features:
            return logits
        emb = torch.flatten(self._captured, 1)
        return ModelOutput(logits, emb[:, :, None, None], emb)


def _import_factory(path: str):
    mod_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(mod_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model factory {path!r}: {e}") from e


def build_model(arch: str, num_classes: int) -> Classifier:
    """Build a classifier by registry name (``wrn16_2``) or import path (``pkg.mod:factory``)."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](num_classes)
    if is_import_path(arch):
        factory = _import_factory(arch)
        model = factory(num_classes=num_classes)
        return model if isinstance(model, Classifier) else ImportedClassifier(model)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))} or 'package.module:factory'")
