"""ResNet backbones built on torchvision's ResNet, with a stem for 32x32 images (He et al., CVPR 2016).

``small_input=True`` swaps the 7x7 stride-2 stem and its max-pool for one 3x3 stride-1 convolution, the usual
CIFAR variant (and the one DREAM-OOD trains on CIFAR-100); ``small_input=False`` keeps the standard ImageNet
stem for 224x224 images. Either stem works at any resolution: the authors' ImageNet-100 ResNet-34 keeps the 3x3
stem without max-pool at 224 px, so their checkpoints need ``small_input=True`` there. :data:`STEMS` and
:func:`uses_small_stem` turn a configuration's ``stem`` choice into ``small_input``. Weights are randomly
initialised as torchvision does; nothing is downloaded. The feature extractor's parameter names match
torchvision's (without ``fc``), so a torchvision state dict loads into it with ``strict=False``.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor, nn

from dreamood._validation import check_positive_int
from dreamood.models._seed import seeded
from dreamood.models.classifier import Classifier

__all__ = ["STEMS", "ResNetFeatures", "resnet18", "resnet34", "resnet50", "uses_small_stem"]

#: Stem choices: ``"auto"`` (3x3 for images up to 64 px, else 7x7, dreamood's default), ``"3x3"`` (3x3 stride-1
#: convolution without max-pool, at any resolution; the authors' CIFAR-100 and ImageNet-100 networks) and
#: ``"7x7"`` (the standard ImageNet stem with max-pool).
STEMS: tuple[str, ...] = ("auto", "3x3", "7x7")

#: Largest image side for which ``stem="auto"`` picks the 3x3 stem.
AUTO_SMALL_STEM_MAX_SIZE = 64


def uses_small_stem(stem: str, image_size: int) -> bool:
    """Whether ``stem`` means the 3x3 stride-1 stem without max-pool for images of side ``image_size``.

    Args:
        stem: One of :data:`STEMS`.
        image_size: The training images' side in pixels (used by ``"auto"`` only).

    Returns:
        The ``small_input`` argument of the ResNet factories.

    Raises:
        ValueError: ``stem`` is not one of :data:`STEMS`.
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(map(repr, STEMS))}, got {stem!r}")
    if stem == "auto":
        return image_size <= AUTO_SMALL_STEM_MAX_SIZE
    return stem == "3x3"


# depth -> (bottleneck blocks?, blocks per stage)
_ARCHITECTURES: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
}


class ResNetFeatures(nn.Module):
    """A ResNet without its classification layer: images -> globally pooled features ``(N, feature_dim)``.

    Args:
        depth: 18, 34 or 50.
        small_input: Use a 3x3 stride-1 stem without max-pool (for 32x32 images) instead of the standard
            7x7 stride-2 stem with max-pool (for 224x224 images).
        in_channels: Number of input channels.
        seed: Seed of the weight initialisation (``None``: the global torch RNG).

    Attributes:
        feature_dim: 512 for ResNet-18/34, 2048 for ResNet-50.
        depth: 18, 34 or 50.
        small_input: Whether the 3x3 stride-1 stem is used.
        in_channels: Number of input channels.

    Raises:
        ValueError: ``depth`` is not 18, 34 or 50, or ``in_channels`` is not a positive integer.
    """

    def __init__(self, depth: int = 18, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None):
        super().__init__()
        if depth not in _ARCHITECTURES:
            raise ValueError(f"depth must be one of {sorted(_ARCHITECTURES)}, got {depth!r}")
        check_positive_int(in_channels, "in_channels")
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        bottleneck, layers = _ARCHITECTURES[depth]
        block = Bottleneck if bottleneck else BasicBlock
        with seeded(seed):
            net = ResNet(block, list(layers), num_classes=1)
            if small_input or in_channels != 3:
                kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
                net.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=padding, bias=False)
                nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool: nn.Module = nn.Identity() if small_input else net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.avgpool = net.avgpool
        self.depth = depth
        self.small_input = small_input
        self.in_channels = in_channels
        self.feature_dim: int = 512 * block.expansion

    def forward(self, images: Tensor) -> Tensor:
        """Features of ``images`` ``(N, C, H, W)``, shape ``(N, feature_dim)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, small_input={self.small_input}, feature_dim={self.feature_dim}"


def _build(
    depth: int, num_classes: int | None, small_input: bool, in_channels: int, seed: int | None
) -> ResNetFeatures | Classifier:
    if num_classes is not None:
        check_positive_int(num_classes, "num_classes")
    with seeded(seed):
        features = ResNetFeatures(depth, small_input=small_input, in_channels=in_channels)
        return features if num_classes is None else Classifier(features, num_classes)


@overload
def resnet18(
    num_classes: None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures: ...
@overload
def resnet18(
    num_classes: int, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> Classifier: ...
def resnet18(
    num_classes: int | None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures | Classifier:
    """ResNet-18: a :class:`ResNetFeatures` (``num_classes=None``) or a :class:`Classifier` with a linear head.

    Args:
        num_classes: Number of classes of the linear head; ``None`` returns the feature extractor alone.
        small_input: 3x3 stride-1 stem without max-pool, for 32x32 images.
        in_channels: Number of input channels.
        seed: Seed of the weight initialisation (``None``: the global torch RNG).

    Returns:
        The feature extractor (``feature_dim`` 512) or the classifier.
    """
    return _build(18, num_classes, small_input, in_channels, seed)


@overload
def resnet34(
    num_classes: None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures: ...
@overload
def resnet34(
    num_classes: int, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> Classifier: ...
def resnet34(
    num_classes: int | None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures | Classifier:
    """ResNet-34 (the paper's backbone): the feature extractor or a :class:`Classifier`.

    Args:
        num_classes: Number of classes of the linear head; ``None`` returns the feature extractor alone.
        small_input: 3x3 stride-1 stem without max-pool, for 32x32 images (the paper's CIFAR-100 setting).
        in_channels: Number of input channels.
        seed: Seed of the weight initialisation (``None``: the global torch RNG).

    Returns:
        The feature extractor (``feature_dim`` 512) or the classifier.
    """
    return _build(34, num_classes, small_input, in_channels, seed)


@overload
def resnet50(
    num_classes: None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures: ...
@overload
def resnet50(
    num_classes: int, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> Classifier: ...
def resnet50(
    num_classes: int | None = None, *, small_input: bool = False, in_channels: int = 3, seed: int | None = None
) -> ResNetFeatures | Classifier:
    """ResNet-50: the feature extractor or a :class:`Classifier`.

    Args:
        num_classes: Number of classes of the linear head; ``None`` returns the feature extractor alone.
        small_input: 3x3 stride-1 stem without max-pool, for 32x32 images.
        in_channels: Number of input channels.
        seed: Seed of the weight initialisation (``None``: the global torch RNG).

    Returns:
        The feature extractor (``feature_dim`` 2048) or the classifier.
    """
    return _build(50, num_classes, small_input, in_channels, seed)
