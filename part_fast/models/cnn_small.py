"""A small CNN that trains in minutes on a CPU: three conv blocks, global average pooling, a linear head.

It keeps the structure PART relies on (a spatial feature map, `features`, read by the CAM, then
global-average-pool + linear), so GradCAM on it behaves as on a ResNet, only cheaper."""
from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + ([nn.MaxPool2d(2)] if pool else [])


class CNNSmall(nn.Module):
    """conv(3->w)-pool, conv(w->2w)-pool, conv(2w->4w), conv(4w->4w) -> `features` (H/4 x W/4, 8x8 at 32x32)
    -> global average pool -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, width, pool=True),
            *_block(width, 2 * width, pool=True),
            *_block(2 * width, 4 * width, pool=False),
            *_block(4 * width, 4 * width, pool=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.linear(self.pool(self.features(x)).flatten(1))


def cnn_small(num_classes: int = 10) -> CNNSmall:
    return CNNSmall(num_classes=num_classes)
