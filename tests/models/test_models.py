"""Classifier registry: shapes, feature outputs and imported factories."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dda_ray.models import ARCHITECTURES, Classifier, ImportedClassifier, ModelOutput, build_model, is_import_path

EXPECTED_ARCHS = {"resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg11", "mobilenetv2"}


def test_registry_lists_the_documented_architectures():
    from dda_ray.config import ARCHITECTURE_NAMES

    assert set(ARCHITECTURES) == EXPECTED_ARCHS
    assert sorted(ARCHITECTURE_NAMES) == sorted(ARCHITECTURES)  # the config accepts exactly the registered names


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHS))
def test_logits_and_features(arch, num_classes):
    torch.manual_seed(0)
    model = build_model(arch, num_classes).eval()
    assert isinstance(model, Classifier)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        out = model(x, return_features=True)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    assert isinstance(out, ModelOutput)
    fmap, emb = out.feature_map, out.embedding
    assert fmap.dim() == 4 and fmap.shape[0] == 2
    assert fmap.shape[1] == model.feature_dim
    assert emb.shape == (2, model.feature_dim)
    final = model.features(x)  # the activated map fc pools; the aligned map is the reference's features[-2]
    if arch.startswith("wrn"):  # raw block-3 output, before the final BN/ReLU (DDA's WRN f3)
        with torch.no_grad():
            torch.testing.assert_close(fmap, model.blocks(model.conv1(x)))
            torch.testing.assert_close(final, F.relu(model.bn(fmap)))
        assert (fmap < 0).any()  # not an activation's output
    else:
        torch.testing.assert_close(fmap, final)
    torch.testing.assert_close(emb, final.mean(dim=(2, 3)))
    torch.testing.assert_close(emb, F.adaptive_avg_pool2d(final, 1).flatten(1))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.logits, model.fc(emb))


def test_import_path_wraps_a_plain_module(tests_on_path):
    from _toy_models import TOY_WIDTH

    assert is_import_path("_toy_models:toy") and not is_import_path("wrn16_1")
    model = build_model("_toy_models:toy", 7).eval()
    assert isinstance(model, ImportedClassifier)
    assert model.feature_dim == TOY_WIDTH
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        out = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert isinstance(out, ModelOutput)
    assert out.feature_map.shape == (2, TOY_WIDTH, 1, 1)
    assert out.embedding.shape == (2, TOY_WIDTH)
    torch.testing.assert_close(out.logits, logits)
    # the embedding is exactly the input of the final linear layer
    torch.testing.assert_close(model.fc(out.embedding), logits)
    expected_emb = model.module[:4](x)
    torch.testing.assert_close(out.embedding, expected_emb)
    torch.testing.assert_close(out.feature_map.flatten(1), out.embedding)


def test_import_path_returning_a_classifier_is_not_wrapped(tests_on_path):
    model = build_model("_toy_models:native", 5)
    assert not isinstance(model, ImportedClassifier)
    assert type(model).__name__ == "WideResNet"
    assert model.fc.out_features == 5


def test_import_path_without_linear_layer_is_refused(tests_on_path):
    with pytest.raises(ValueError, match="no nn.Linear"):
        build_model("_toy_models:no_linear", 10)


@pytest.mark.parametrize("path", ["no_such_module_dda_xyz:factory", "_toy_models:missing_factory"])
def test_unimportable_factory_raises(tests_on_path, path):
    with pytest.raises(ValueError, match="cannot import model factory") as exc:
        build_model(path, 10)
    assert path in str(exc.value)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError) as exc:
        build_model("resnet999", 10)
    msg = str(exc.value)
    assert "resnet999" in msg
    for arch in EXPECTED_ARCHS:
        assert arch in msg
