"""Tests for the backbones (dreamood.models): shapes, stems, torchvision equivalence, seeding, the classifier split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from dreamood.models import Classifier, ResNetFeatures, SmallConvNet, resnet18, resnet34, resnet50


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("factory", "tv_factory", "feature_dim"),
    [
        (resnet18, torchvision.models.resnet18, 512),
        (resnet34, torchvision.models.resnet34, 512),
        (resnet50, torchvision.models.resnet50, 2048),
    ],
)
def test_parameter_counts_match_torchvision(factory: Callable[..., Any], tv_factory: Any, feature_dim: int) -> None:
    reference = tv_factory(num_classes=10)
    features = factory()
    classifier = factory(num_classes=10)
    small = factory(small_input=True)
    assert isinstance(features, ResNetFeatures) and features.feature_dim == feature_dim
    assert isinstance(classifier, Classifier) and classifier.feature_dim == feature_dim
    assert count(classifier) == count(reference)
    assert count(features) == count(reference) - count(reference.fc)
    assert count(features) - count(small) == 64 * 3 * (7 * 7 - 3 * 3)  # only the stem differs


def test_feature_extractor_reproduces_torchvision_penultimate_features() -> None:
    reference = torchvision.models.resnet18().eval()
    features = resnet18().eval()
    missing, unexpected = features.load_state_dict(reference.state_dict(), strict=False)
    assert missing == [] and unexpected == ["fc.weight", "fc.bias"]
    reference.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(features(images), reference(images), atol=1e-5)


def test_stems() -> None:
    small = resnet18(small_input=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    standard = resnet18()
    assert standard.conv1.kernel_size == (7, 7) and standard.conv1.stride == (2, 2)
    assert isinstance(standard.maxpool, nn.MaxPool2d)
    grey = resnet18(in_channels=1)
    assert grey.conv1.in_channels == 1 and grey.conv1.kernel_size == (7, 7)
    # The small stem keeps the resolution: 32x32 reaches layer4 at 4x4, the standard stem at 1x1.
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        small_map = small.layer1(small.maxpool(small.relu(small.bn1(small.conv1(images)))))
        standard_map = standard.layer1(standard.maxpool(standard.relu(standard.bn1(standard.conv1(images)))))
    assert small_map.shape[-2:] == (32, 32) and standard_map.shape[-2:] == (8, 8)


@pytest.mark.parametrize("factory", [resnet18, resnet34])
def test_small_input_shapes(factory: Callable[..., Any]) -> None:
    model = factory(num_classes=5, small_input=True, seed=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = model.forward_with_features(images)
    assert logits.shape == (2, 5) and features.shape == (2, 512)


def test_classifier_splits_features_and_head() -> None:
    model = resnet18(num_classes=7, small_input=True, seed=0).eval()
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.features(images)
        logits = model(images)
        assert torch.equal(features, model.backbone(images))
        assert torch.allclose(logits, features @ model.head.weight.T + model.head.bias, atol=1e-6)
        both = model.forward_with_features(images)
    assert torch.equal(both[0], logits) and torch.equal(both[1], features)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7 and model.num_classes == 7


def test_seeded_initialisation_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    first, again, other = resnet18(3, seed=1), resnet18(3, seed=1), resnet18(3, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.head.weight, other.head.weight)
    assert torch.equal(SmallConvNet(seed=4).body[0][0].weight, SmallConvNet(seed=4).body[0][0].weight)


def test_small_convnet_on_digits_sized_images() -> None:
    net = SmallConvNet(in_channels=1, feature_dim=24, width=8, seed=0)
    features = net(torch.randn(5, 1, 8, 8))
    assert features.shape == (5, 24) and net.feature_dim == 24
    features.sum().backward()
    first_conv = net.body[0][0]
    assert first_conv.weight.grad is not None and bool(first_conv.weight.grad.abs().sum() > 0)
    assert SmallConvNet(3, 16, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_small_convnet_classifier_learns() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 2
    images = torch.randn(32, 1, 8, 8, generator=generator) * 0.3
    images[labels == 1, :, :4] += 1.0  # class 1 has a bright top half
    model = Classifier(SmallConvNet(1, 16, width=8, seed=0), num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert float((model(images).argmax(1) == labels).float().mean()) == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetFeatures(101)
    with pytest.raises(ValueError, match="num_classes must be > 0, got 0"):
        resnet18(0)
    with pytest.raises(ValueError, match="feature_dim is needed"):
        Classifier(nn.Linear(3, 4), 2)
    with pytest.raises(ValueError, match="in_channels must be > 0"):
        SmallConvNet(in_channels=0)
    model = Classifier(nn.Linear(3, 4), 2, feature_dim=5)
    with pytest.raises(ValueError, match=r"features of shape \(N, 5\), got \(2, 4\)"):
        model(torch.randn(2, 3))
