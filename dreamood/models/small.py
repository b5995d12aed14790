"""A small convolutional backbone for tiny images (8x8 digits, tests, offline demos)."""

from __future__ import annotations

from torch import Tensor, nn

from dreamood._validation import check_positive_int
from dreamood.models._seed import seeded


class SmallConvNet(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks, one 2x2 max-pool and global average pooling: images -> ``(N, feature_dim)``.

    Works for any input of at least 2x2 pixels; sized for 8x8 digits and 32x32 smoke tests.

    Args:
        in_channels: Number of input channels (1 for grey-scale digits).
        feature_dim: Number of output features (channels of the last block).
        width: Channels of the first block (the second has ``2 * width``).
        seed: Seed of the weight initialisation (``None``: the global torch RNG).

    Attributes:
        feature_dim: Number of output features.
        in_channels: Number of input channels.
        width: Channels of the first block.
    """

    def __init__(self, in_channels: int = 1, feature_dim: int = 64, *, width: int = 32, seed: int | None = None):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(feature_dim, "feature_dim")
        check_positive_int(width, "width")
        with seeded(seed):
            self.body = nn.Sequential(
                _block(in_channels, width),
                _block(width, 2 * width),
                nn.MaxPool2d(2),
                _block(2 * width, feature_dim),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        self.feature_dim = feature_dim
        self.in_channels = in_channels
        self.width = width

    def forward(self, images: Tensor) -> Tensor:
        """Features of ``images`` ``(N, C, H, W)``, shape ``(N, feature_dim)``."""
        features: Tensor = self.body(images)
        return features


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
