"""Classifier checkpoints: project format, community .pth files, and every refusal."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dda_ray.models import build_model
from dda_ray.models.checkpoint import META, WEIGHTS, CheckpointError, load_classifier, load_state_dict, read_meta, save_classifier

ARCH, NUM_CLASSES = "wrn16_1", 10
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def make_model(seed: int = 0, arch: str = ARCH, num_classes: int = NUM_CLASSES):
    """A model whose weights AND BatchNorm buffers differ from a fresh build."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        model.fc.bias.normal_()
    return model.eval()


def outputs(model, seed: int = 123):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def assert_same_outputs(a, b):
    assert torch.equal(outputs(a), outputs(b))


def save(model, path, **kw):
    kw.setdefault("accuracy", 0.5)
    return save_classifier(model, path, arch=ARCH, num_classes=NUM_CLASSES, mean=MEAN, std=STD, **kw)


def test_project_format_round_trip(tmp_path):
    model = make_model()
    ckpt = save(model, tmp_path / "ckpt", accuracy=0.875, epoch=3, dataset="cifar10")
    assert ckpt == tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([META, WEIGHTS])
    loaded, meta = load_classifier(ckpt, ARCH, NUM_CLASSES)
    assert_same_outputs(model, loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta["format"] == "dda_ray.classifier/1"
    assert meta["arch"] == ARCH and meta["num_classes"] == NUM_CLASSES
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["accuracy"] == 0.875
    assert meta["epoch"] == 3 and meta["dataset"] == "cifar10"
    assert read_meta(ckpt) == meta
    assert json.loads((ckpt / META).read_text()) == meta


def test_project_checkpoint_loads_through_its_meta_json(tmp_path):
    model = make_model()
    ckpt = save(model, tmp_path / "ckpt")
    loaded, meta = load_classifier(ckpt / META, ARCH, NUM_CLASSES)
    assert meta["arch"] == ARCH
    assert_same_outputs(model, loaded)


def test_bare_safetensors_file_loads(tmp_path):
    model = make_model()
    ckpt = save(model, tmp_path / "ckpt")
    loaded, meta = load_classifier(ckpt / WEIGHTS, ARCH, NUM_CLASSES)
    assert meta == {}
    assert_same_outputs(model, loaded)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd}, id="state_dict-key"),
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="module-prefix"),
        pytest.param(lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}, id="state_dict-module-prefix"),
    ],
)
@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_community_pth(tmp_path, wrap, suffix):
    model = make_model(seed=1)
    path = tmp_path / f"wrn16_1{suffix}"
    torch.save(wrap(model.state_dict()), path)
    assert read_meta(path) is None
    loaded, meta = load_classifier(path, ARCH, NUM_CLASSES)
    assert meta == {}
    assert_same_outputs(model, loaded)


class _Payload:
    """Pickles to a call of os.system: what a booby-trapped checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_with_code_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": make_model().state_dict(), "extra": _Payload(marker)}, path)

    with pytest.raises(CheckpointError, match="refusing or unable to load") as exc:
        load_classifier(path, ARCH, NUM_CLASSES)
    assert str(path) in str(exc.value)
    assert not marker.exists(), "the pickled payload ran"
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists(), "the pickled payload ran"

    # The payload is live: an unrestricted load does run it (so the check above means something).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pth_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1), torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_classifier(path, ARCH, NUM_CLASSES)


def test_corrupt_pth_is_refused(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_classifier(path, ARCH, NUM_CLASSES)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_safetensors_is_refused(tmp_path, damage):
    ckpt = save(make_model(), tmp_path / "ckpt")
    weights = ckpt / WEIGHTS
    if damage == "random":
        weights.write_bytes(os.urandom(2048))
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable") as exc:
        load_classifier(ckpt, ARCH, NUM_CLASSES)
    assert str(weights) in str(exc.value)

    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_state_dict(loose)


def test_unreadable_meta_json_is_refused(tmp_path):
    ckpt = save(make_model(), tmp_path / "ckpt")
    (ckpt / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata"):
        load_classifier(ckpt, ARCH, NUM_CLASSES)


def test_arch_mismatch_is_refused(tmp_path):
    ckpt = save(make_model(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as exc:
        load_classifier(ckpt, "wrn16_2", NUM_CLASSES)
    msg = str(exc.value)
    assert "'wrn16_1'" in msg and "'wrn16_2'" in msg and "teacher.arch" in msg


def test_num_classes_mismatch_is_refused(tmp_path):
    ckpt = save(make_model(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as exc:
        load_classifier(ckpt, ARCH, 100)
    msg = str(exc.value)
    assert "10 classes" in msg and "data.num_classes = 100" in msg


def test_community_pth_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": make_model(arch="wrn16_2").state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not fit a wrn16_1 with 10 classes"):
        load_classifier(path, ARCH, NUM_CLASSES)
    path100 = tmp_path / "c100.pth"
    torch.save(make_model(num_classes=100).state_dict(), path100)
    with pytest.raises(CheckpointError, match="does not fit a wrn16_1 with 10 classes"):
        load_classifier(path100, ARCH, NUM_CLASSES)


@pytest.mark.parametrize("name", ["missing_dir", "missing.pth", "missing.safetensors", "missing/meta.json"])
def test_missing_path_is_refused(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(CheckpointError) as exc:
        load_classifier(path, ARCH, NUM_CLASSES)
    assert str(path) in str(exc.value)


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    old, new = make_model(seed=1), make_model(seed=2)
    assert not torch.equal(outputs(old), outputs(new))
    save(old, tmp_path / "ckpt", accuracy=0.1)
    save(new, tmp_path / "ckpt", accuracy=0.9)
    loaded, meta = load_classifier(tmp_path / "ckpt", ARCH, NUM_CLASSES)
    assert meta["accuracy"] == 0.9
    assert_same_outputs(new, loaded)
    # no temporary or backup directories are left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([META, WEIGHTS])


def test_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp(tmp_path):
    old = make_model(seed=1)
    save(old, tmp_path / "ckpt", accuracy=0.1)
    with pytest.raises(TypeError):  # meta extras must be JSON-serialisable
        save(make_model(seed=2), tmp_path / "ckpt", accuracy=0.9, bad=object())
    loaded, meta = load_classifier(tmp_path / "ckpt", ARCH, NUM_CLASSES)
    assert meta["accuracy"] == 0.1
    assert_same_outputs(old, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_creates_missing_parents(tmp_path):
    ckpt = save(make_model(), tmp_path / "a" / "b" / "ckpt")
    assert (ckpt / WEIGHTS).is_file() and (ckpt / META).is_file()
