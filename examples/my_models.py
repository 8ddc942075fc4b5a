"""A model of your own for ``edgesplit --model examples/my_models.py:build``.

A stem convolution, one residual block and a linear head over images of one channel (the
digits' 8×8, given flat as 64 features, or any square). ``edgesplit cuts`` lists where it can be
cut: after ``stem`` or ``block1`` (not inside ``block1``: the skip connection would have to
travel too).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgesplit.errors import ConfigError


class Block(nn.Module):
    """``relu(x + conv(x))``: a cut inside it is refused (the skip crosses it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


class Net(nn.Module):
    """Stem, residual block, global average pool, linear head."""

    def __init__(self, side: int, num_classes: int, channels: int = 8) -> None:
        super().__init__()
        self.side = side
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block1 = Block(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.block1(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The factory edgesplit calls with one sample's shape and the number of classes."""
    features = math.prod(input_shape)
    side = math.isqrt(features)
    if side * side != features:
        # ConfigError: edgesplit prints it as one line instead of a traceback
        raise ConfigError(
            f"my_models.Net needs square one-channel images (e.g. 8x8 digits as 64 features), "
            f"got samples of shape {tuple(input_shape)}"
        )
    return Net(side, num_classes)
