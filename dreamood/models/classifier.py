"""A classifier split into a feature extractor and a linear head, so both parts are plain callables."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dreamood._validation import check_positive_int
from dreamood.hub import DreamoodHubMixin, backbone_config


def resolve_feature_dim(backbone: nn.Module, feature_dim: int | None) -> int:
    """``feature_dim`` when given, else the backbone's integer ``feature_dim`` attribute.

    Raises:
        ValueError: ``feature_dim`` is ``None`` and the backbone has no integer ``feature_dim``.
    """
    if feature_dim is None:
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int):
            raise ValueError(
                f"feature_dim is needed: backbone {type(backbone).__name__} has no integer feature_dim attribute"
            )
    return feature_dim


def backbone_features(backbone: nn.Module, images: Tensor, feature_dim: int) -> Tensor:
    """Run ``backbone`` on ``images`` and check the result has shape ``(N, feature_dim)``.

    Raises:
        ValueError: The backbone's output does not have shape ``(N, feature_dim)``.
    """
    features: Tensor = backbone(images)
    if features.dim() != 2 or features.shape[1] != feature_dim:
        raise ValueError(f"the backbone must return features of shape (N, {feature_dim}), got {tuple(features.shape)}")
    return features


class Classifier(nn.Module, DreamoodHubMixin):
    """``head(features(x))``: a backbone mapping images to ``(N, feature_dim)`` features and a linear head.

    Post-hoc detectors and the VOS/NPOS training baselines need the penultimate features; here they are
    ``model.features`` (a plain callable) and the last layer is ``model.head`` (an ``nn.Linear``).

    Save and load it the Hugging Face way (``config.json`` + ``model.safetensors``, see :mod:`dreamood.hub`)::

        model.save_pretrained("runs/x/classifier")
        model = Classifier.from_pretrained("runs/x/classifier")  # backbone rebuilt from config.json
        model.push_to_hub("owner/name")  # needs a Hugging Face login

    The library's backbones (ResNets, ``SmallConvNet``) are rebuilt from the config; for any other backbone pass
    it again: ``Classifier.from_pretrained(folder, backbone=my_backbone)``.

    Args:
        backbone: Any module mapping a batch of images to features of shape ``(N, feature_dim)``.
        num_classes: Number of output classes.
        feature_dim: Dimension of the backbone's features; defaults to ``backbone.feature_dim``.

    Raises:
        ValueError: ``num_classes`` or ``feature_dim`` is not a positive integer, or ``feature_dim`` is
            missing and the backbone has no ``feature_dim`` attribute.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        feature_dim = resolve_feature_dim(backbone, feature_dim)
        check_positive_int(num_classes, "num_classes")
        check_positive_int(feature_dim, "feature_dim")
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def _dreamood_config(self) -> dict[str, Any]:
        return {
            "backbone": backbone_config(self.backbone),
            "backbone_class": type(self.backbone).__name__,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
        }

    @classmethod
    def _from_dreamood_config(cls, config: dict[str, Any], backbone: nn.Module) -> Classifier:
        return cls(backbone, int(config["num_classes"]), int(config["feature_dim"]))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features of ``images``, shape ``(N, feature_dim)``.

        Raises:
            ValueError: The backbone's output does not have shape ``(N, feature_dim)``.
        """
        return backbone_features(self.backbone, images, self.feature_dim)

    def forward_with_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(N, num_classes)`` and penultimate features ``(N, feature_dim)`` in one pass."""
        features = self.features(images)
        logits: Tensor = self.head(features)
        return logits, features

    def forward(self, images: Tensor) -> Tensor:
        """Logits of ``images``, shape ``(N, num_classes)``."""
        return self.forward_with_features(images)[0]
