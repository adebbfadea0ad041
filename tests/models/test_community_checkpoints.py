"""Teachers from the DFKD community codebases (zju-vipa/CMI, zju-vipa/Fast-Datafree, SLGSP/DDA).

The reference networks below are written for this test from those codebases' CIFAR classifiers
(``datafree/models/classifiers/wresnet.py``, ``resnet.py``, ``vgg.py``): the same module names, so
the same state-dict keys and shapes, and the same forward computation. A state dict of a reference
network, saved as those codebases save it, must load into the registry architecture of the same
name and give the reference's logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dda_ray.config import load_config
from dda_ray.data.datasets import NORMALIZATION
from dda_ray.models import build_model
from dda_ray.models.checkpoint import CheckpointError, load_classifier, load_teacher
from dda_ray.models.community import COMMUNITY_NORMALIZATION, LAYOUT, family, to_registry_layout


# ------------------------------------------------------------------ reference networks
class RefWideBlock(nn.Module):
    """Pre-activation block; when the width changes, the 1x1 ``convShortcut`` sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same = cin == cout
        self.convShortcut = None if self.same else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return (x if self.same else self.convShortcut(act)) + out


class RefWideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[RefWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = RefWideStage(n, w[0], w[1], 1)
        self.block2 = RefWideStage(n, w[1], w[2], 2)
        self.block3 = RefWideStage(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))


class RefBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RefResNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (width, n) in enumerate(zip([64, 128, 256, 512], blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(RefBasicBlock(cin, width, (1 if i == 0 else 2) if j == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class RefVGG(nn.Module):
    """vgg11_bn: five conv-BN(-ReLU) blocks whose trailing ReLU is applied in forward; 2x2 max-pools after
    blocks 0-2, after block 3 only for 64-px inputs; global average pool; ``classifier``."""

    def __init__(self, widths: list[list[int]], num_classes: int):
        super().__init__()
        cin = 3
        for b, stage in enumerate(widths):
            layers: list[nn.Module] = []
            for w in stage:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if h == 64:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


REFERENCE = {
    "wrn16_1": lambda nc: RefWideResNet(16, 1, nc),
    "wrn16_2": lambda nc: RefWideResNet(16, 2, nc),
    "wrn40_1": lambda nc: RefWideResNet(40, 1, nc),
    "wrn40_2": lambda nc: RefWideResNet(40, 2, nc),
    "resnet18": lambda nc: RefResNet([2, 2, 2, 2], nc),
    "resnet34": lambda nc: RefResNet([3, 4, 6, 3], nc),
    "vgg11": lambda nc: RefVGG([[64], [128], [256, 256], [512, 512], [512, 512]], nc),
}


def reference(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A reference network with random weights AND BatchNorm statistics (a fresh build cannot pass for it)."""
    torch.manual_seed(seed)
    model = REFERENCE[arch](num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.normal_(0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


def same_logits(ours: nn.Module, ref: nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.eval()(x)
        got = ours.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ tests
def test_every_map_covers_a_registry_family():
    assert {family(a) for a in REFERENCE} == {"wrn", "resnet", "vgg"}
    assert family("mobilenetv2") is None
    assert family("resnet_pkg.models:net") is None  # import paths are never renamed


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_community_state_dict_loads_by_name_and_gives_the_references_logits(tmp_path, arch, num_classes):
    ref = reference(arch, num_classes)
    path = tmp_path / f"cifar_{arch}.pth"
    torch.save({"state_dict": ref.state_dict(), "acc": 0.9, "epoch": 200}, path)  # as their train_scratch.py saves it
    model, meta = load_classifier(path, arch, num_classes)
    assert meta == {"layout": LAYOUT}
    same_logits(model, ref)


@pytest.mark.parametrize("arch", ["wrn16_1", "resnet18", "vgg11"])
def test_community_file_saved_from_data_parallel_loads(tmp_path, arch):
    ref = reference(arch, 10, seed=1)
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    model, _ = load_classifier(path, arch, 10)
    same_logits(model, ref)


def test_vgg11_pools_before_its_last_stage_only_at_64_px(tmp_path):
    ref = reference("vgg11", 200, seed=2)
    path = tmp_path / "tiny_vgg11.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    model, _ = load_classifier(path, "vgg11", 200)
    same_logits(model, ref, size=64)
    same_logits(model, ref, size=32)


def test_every_key_of_a_reference_network_is_renamed_onto_the_registry_network():
    for arch in REFERENCE:
        ref_state = REFERENCE[arch](10).state_dict()
        ours = build_model(arch, 10).state_dict()
        mapped = to_registry_layout(arch, ref_state)
        assert mapped is not None, arch
        assert set(mapped) == set(ours), arch
        assert all(mapped[k].shape == ours[k].shape for k in ours), arch


def test_registry_layout_files_are_not_renamed(tmp_path):
    """A .pth in this project's own layout (and its meta-less load) is left as is."""
    for arch in REFERENCE:
        assert to_registry_layout(arch, build_model(arch, 10).state_dict()) is None, arch
    model = build_model("wrn16_1", 10)
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    _, meta = load_classifier(tmp_path / "ours.pth", "wrn16_1", 10)
    assert meta == {}


def test_a_community_file_of_another_family_or_depth_is_refused(tmp_path):
    path = tmp_path / "wrn40_2.pth"
    torch.save({"state_dict": reference("wrn40_2", 10).state_dict()}, path)
    for arch in ("wrn16_2", "resnet18"):
        with pytest.raises(CheckpointError, match=f"does not fit a {arch} with 10 classes"):
            load_classifier(path, arch, 10)
    with pytest.raises(CheckpointError, match="does not fit a wrn40_2 with 100 classes"):
        load_classifier(path, "wrn40_2", 100)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tiny_imagenet"])
def test_a_community_teacher_is_normalised_as_its_codebase_trained_it(tmp_path, dataset):
    num_classes = {"cifar10": 10, "cifar100": 100, "tiny_imagenet": 200}[dataset]
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": reference("wrn16_1", num_classes).state_dict()}, path)
    base = [f"data.dataset={dataset}", f"data.num_classes={num_classes}", "teacher.arch=wrn16_1", f"teacher.checkpoint={path}"]
    _, norm, meta = load_teacher(load_config(None, base))
    assert meta["layout"] == LAYOUT
    mean, std = COMMUNITY_NORMALIZATION[dataset]
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(norm.std.flatten(), torch.tensor(std))
    assert COMMUNITY_NORMALIZATION[dataset] != NORMALIZATION[dataset]  # the override matters
    # teacher.mean / teacher.std still win
    _, override, _ = load_teacher(load_config(None, [*base, "teacher.mean=[0.5, 0.5, 0.5]", "teacher.std=[0.25, 0.25, 0.25]"]))
    torch.testing.assert_close(override.std.flatten(), torch.tensor([0.25] * 3))


def test_the_recorded_normalisation_is_the_codebases():
    """The values of NORMALIZE_DICT in zju-vipa/CMI's and zju-vipa/Fast-Datafree's registry.py."""
    assert COMMUNITY_NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert COMMUNITY_NORMALIZATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert COMMUNITY_NORMALIZATION["tiny_imagenet"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_our_layout_pth_keeps_the_datasets_normalisation(tmp_path):
    path = tmp_path / "ours.pth"
    torch.save(build_model("wrn16_1", 10).state_dict(), path)
    _, norm, _ = load_teacher(load_config(None, ["data.dataset=cifar10", "teacher.arch=wrn16_1", f"teacher.checkpoint={path}"]))
    torch.testing.assert_close(norm.std.flatten(), torch.tensor(NORMALIZATION["cifar10"][1]))
