"""Teachers a user brings: their own module by import path, its own state_dict(), their normalisation.

The models below are defined in this file and named by import path (``tests.test_teacher_loading:user_net``),
as a user names a model of their own package.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dda_ray.config import Config, ConfigError, load_config
from dda_ray.data.datasets import NORMALIZATION
from dda_ray.models import ImportedClassifier, build_model
from dda_ray.models.checkpoint import CheckpointError, load_classifier, load_teacher, resolved_teacher_arch, save_classifier

USER_NET = f"{__name__}:user_net"
FC_NET = f"{__name__}:fc_net"
NUM_CLASSES = 10


class UserNet(nn.Module):
    """A user's classifier: conv + BN trunk, a hidden linear layer and a last linear layer named ``head``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(32, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.trunk(x))))


class FcNet(nn.Module):
    """Like torchvision's ResNets: the model's own last layer is called ``fc``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def user_net(num_classes: int = 10) -> nn.Module:
    return UserNet(num_classes)


def fc_net(num_classes: int = 10) -> nn.Module:
    return FcNet(num_classes)


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BatchNorm buffers that differ from a fresh build (a fresh build cannot pass for a loaded one)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


def teacher_cfg(*overrides: str) -> Config:
    return load_config(None, ["data.dataset=cifar10", *overrides])


def old_wrapped_layout(model: nn.Module, last_linear: str) -> dict[str, torch.Tensor]:
    """What the import-path wrapper's state_dict() held before: the module under ``module.`` plus a copy of the last linear as ``fc.``."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] = model.state_dict()[f"{last_linear}.weight"].clone()
    state["fc.bias"] = model.state_dict()[f"{last_linear}.bias"].clone()
    return state


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict-key"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="data-parallel"),
    ],
)
@pytest.mark.parametrize("arch", [USER_NET, FC_NET])
def test_plain_state_dict_of_the_users_module_loads_via_import_path(tmp_path, wrap, arch):
    model = trained(build_model(arch, NUM_CLASSES).module)  # the user's own nn.Module, not the wrapper
    path = tmp_path / "mine.pth"
    torch.save(wrap(model.state_dict()), path)

    teacher, _, meta = load_teacher(teacher_cfg(f"teacher.arch={arch}", f"teacher.checkpoint={path}"))
    assert meta == {}
    assert isinstance(teacher, ImportedClassifier)
    assert torch.equal(logits(teacher), logits(model))
    for k, v in model.state_dict().items():
        assert torch.equal(teacher.module.state_dict()[k], v), k


def test_plain_safetensors_file_loads_via_import_path(tmp_path):
    model = trained(UserNet())
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded, _ = load_classifier(path, USER_NET, NUM_CLASSES)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("arch, last", [(USER_NET, "head"), (FC_NET, "fc")])
def test_the_older_wrapped_layout_still_loads(tmp_path, arch, last):
    """Checkpoints written before: ``module.*`` plus the duplicate ``fc.*``, as a .pth (with and without
    DataParallel's prefix) and as a project checkpoint."""
    model = trained(build_model(arch, NUM_CLASSES).module, seed=1)
    old = old_wrapped_layout(model, last)
    for name, state in {"old.pth": old, "old_dp.pth": {f"module.{k}": v for k, v in old.items()}}.items():
        torch.save({"state_dict": state}, tmp_path / name)
        loaded, _ = load_classifier(tmp_path / name, arch, NUM_CLASSES)
        assert torch.equal(logits(loaded), logits(model)), name

    project = save_classifier(
        build_model(arch, NUM_CLASSES), tmp_path / "project", arch=arch, num_classes=NUM_CLASSES, mean=[0.5] * 3, std=[0.25] * 3
    )
    save_file(old, project / "model.safetensors")  # the weights as the older wrapper saved them
    loaded, meta = load_classifier(project, arch, NUM_CLASSES)
    assert meta["arch"] == arch
    assert torch.equal(logits(loaded), logits(model))


def test_the_wrapper_saves_its_module_once_and_round_trips(tmp_path):
    wrapper = build_model(USER_NET, NUM_CLASSES)
    trained(wrapper.module, seed=2)
    keys = set(wrapper.state_dict())
    assert keys == {f"module.{k}" for k in wrapper.module.state_dict()}, "the last linear layer is saved twice"
    assert wrapper.fc is wrapper.module.head and wrapper.feature_dim == 16

    ckpt = save_classifier(wrapper, tmp_path / "student", arch=USER_NET, num_classes=NUM_CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    loaded, _ = load_classifier(ckpt, USER_NET, NUM_CLASSES)
    assert torch.equal(logits(loaded), logits(wrapper))
    # the embedding hook still follows the module's last linear layer after loading
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = loaded(x, return_features=True)
    torch.testing.assert_close(loaded.fc(out.embedding), out.logits)


def test_a_state_dict_of_another_model_is_still_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(trained(FcNet()).state_dict(), path)
    with pytest.raises(CheckpointError, match=f"does not fit a {USER_NET}"):
        load_classifier(path, USER_NET, NUM_CLASSES)


# ------------------------------------------------------------ architecture
def test_arch_may_be_omitted_when_meta_json_names_it(tmp_path):
    for arch in ("wrn16_1", USER_NET):
        model = build_model(arch, NUM_CLASSES)
        trained(model if arch == "wrn16_1" else model.module, seed=3)
        ckpt = save_classifier(model, tmp_path / arch.replace(":", "_"), arch=arch, num_classes=NUM_CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
        cfg = teacher_cfg(f"teacher.checkpoint={ckpt}")
        assert cfg.teacher.arch is None
        assert resolved_teacher_arch(cfg) == arch
        teacher, _, meta = load_teacher(cfg)
        assert meta["arch"] == arch
        assert torch.equal(logits(teacher), logits(model))


def test_omitted_arch_without_meta_json_is_a_clear_config_error(tmp_path):
    path = tmp_path / "community.pth"
    torch.save({"state_dict": trained(UserNet()).state_dict()}, path)
    cfg = teacher_cfg(f"teacher.checkpoint={path}")
    with pytest.raises(ConfigError) as exc:
        load_teacher(cfg)
    msg = str(exc.value)
    assert "teacher.arch is not set" in msg and str(path) in msg and "meta.json" in msg and "package.module:factory" in msg
    assert "\n" not in msg
    assert resolved_teacher_arch(cfg) is None


def test_the_default_teacher_is_the_shipped_checkpoint_named_by_its_meta_json():
    cfg = Config()
    assert cfg.teacher.arch is None
    assert resolved_teacher_arch(cfg) == "wrn16_2"


def test_training_a_teacher_needs_its_arch():
    from dda_ray.models.teacher import train_teacher

    with pytest.raises(ConfigError, match="teacher.arch is not set"):
        train_teacher(teacher_cfg("teacher.checkpoint=null"), progress=False)


# ----------------------------------------------------------- normalisation
def _x() -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def community_pth(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(trained(UserNet()).state_dict(), path)
    return path


def test_community_file_defaults_to_the_datasets_normalisation(community_pth):
    _, norm, _ = load_teacher(teacher_cfg(f"teacher.arch={USER_NET}", f"teacher.checkpoint={community_pth}"))
    mean, std = NORMALIZATION["cifar10"]
    torch.testing.assert_close(norm(_x()), (_x() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def test_mean_and_std_override_the_normalisation(community_pth):
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    cfg = teacher_cfg(f"teacher.arch={USER_NET}", f"teacher.checkpoint={community_pth}", f"teacher.mean={mean}", f"teacher.std={std}")
    _, norm, _ = load_teacher(cfg)
    expected = (_x() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(_x()), expected)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(norm.std.flatten(), torch.tensor(std))


def test_mean_and_std_override_a_project_checkpoints_meta(tmp_path):
    model = trained(build_model("wrn16_1", NUM_CLASSES))
    ckpt = save_classifier(model, tmp_path / "t", arch="wrn16_1", num_classes=NUM_CLASSES, mean=[0.4] * 3, std=[0.2] * 3)
    _, from_meta, _ = load_teacher(teacher_cfg(f"teacher.checkpoint={ckpt}"))
    torch.testing.assert_close(from_meta(_x()), (_x() - 0.4) / 0.2)
    _, only_std, _ = load_teacher(teacher_cfg(f"teacher.checkpoint={ckpt}", "teacher.std=[0.5, 0.5, 0.5]"))
    torch.testing.assert_close(only_std(_x()), (_x() - 0.4) / 0.5)  # mean still meta.json's


def test_input_scale_255_feeds_raw_pixels(community_pth):
    _, norm, _ = load_teacher(teacher_cfg(f"teacher.arch={USER_NET}", f"teacher.checkpoint={community_pth}", "teacher.input_scale=255"))
    torch.testing.assert_close(norm(_x()), _x() * 255)
    assert norm.scale == 255.0


def pixel_units_cfg(checkpoint, mean, std):
    """The user net from ``checkpoint``, fed raw 0-255 pixels, normalised by ``mean`` / ``std`` in those units."""
    return teacher_cfg(f"teacher.arch={USER_NET}", f"teacher.checkpoint={checkpoint}", "teacher.input_scale=255", f"teacher.mean={mean}", f"teacher.std={std}")


def test_input_scale_with_mean_and_std_in_pixel_units(community_pth):
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    cfg = pixel_units_cfg(community_pth, mean, std)
    _, norm, _ = load_teacher(cfg)
    expected = (_x() * 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(_x()), expected)
    # folded to [0, 1] units: what the student's transform and its checkpoint's meta.json read
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor(mean) / 255)
    torch.testing.assert_close(norm.std.flatten(), torch.tensor(std) / 255)


def test_the_teacher_sees_the_overridden_input(community_pth):
    """End to end: the teacher's logits on the normalised batch are the user model's on (x * scale - mean) / std."""
    model = trained(UserNet())
    torch.save(model.state_dict(), community_pth)
    mean, std = [10.0, 20.0, 30.0], [50.0, 60.0, 70.0]
    cfg = pixel_units_cfg(community_pth, mean, std)
    teacher, norm, _ = load_teacher(cfg)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model((x * 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        torch.testing.assert_close(teacher(norm(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override, field",
    [
        ("teacher.mean=[0.5, 0.5]", "teacher.mean"),
        ("teacher.std=[0.5, 0.0, 0.5]", "teacher.std"),
        ("teacher.std=0.5", "teacher.std"),
        ("teacher.input_scale=0", "teacher.input_scale"),
        ("student.mean=[0.5, 0.5, 0.5]", "student.mean"),
    ],
)
def test_bad_normalisation_fields_are_refused(override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert field in str(exc.value)
