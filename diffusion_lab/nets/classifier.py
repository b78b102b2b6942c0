"""Small conv image encoders: a classifier with a feature layer (FID features, accuracy judge), CLIP's image tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.nets.layers import group_norm


class ConvBlock(nn.Module):
    """conv3x3-GroupNorm-SiLU twice; the first conv strides by 2 when `downsample`."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2 if downsample else 1, padding=1)
        self.norm1 = group_norm(out_channels, 8)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))  # (B, C_out, H', W')
        return F.silu(self.norm2(self.conv2(h)))


class ConvClassifier(nn.Module):
    """Conv stages (stride-2 between them) -> global average pool -> `feature_dim` features -> class logits.

    `features(x)` is the penultimate layer (after its SiLU), the embedding used for FID / KID / precision-
    recall; `forward(x)` returns the logits. Any input size works (global pooling); images are in [-1, 1].
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        feature_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if feature_dim < 1 or base_channels < 1 or not channel_mult:
            raise ValueError("feature_dim and base_channels must be >= 1 and channel_mult non-empty")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        chans = [base_channels * m for m in channel_mult]
        stages, ch = [], in_channels
        for i, c in enumerate(chans):
            stages.append(ConvBlock(ch, c, downsample=i > 0))
            ch = c
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(ch, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convs, zero biases, a small head (uniform predictions at the start)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.stages(x)  # (B, C_last, H / 2^k, W / 2^k)
        h = h.mean(dim=(2, 3))  # (B, C_last)
        return F.silu(self.proj(h))  # (B, feature_dim)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) -> class logits (B, num_classes)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))  # (B, num_classes)


class ConvImageEncoder(nn.Module):
    """Small CNN image tower: stride-2 conv stages, then a linear map of the flattened (position-aware) features."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 4),
        out_dim: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 3, padding=1)]
        ch = base_channels
        for mult in channel_mult:
            cout = base_channels * mult
            layers += [group_norm(ch, 8), nn.SiLU(), nn.Conv2d(ch, cout, 3, stride=2, padding=1)]
            layers += [group_norm(cout, 8), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1)]
            ch = cout
        self.features = nn.Sequential(*layers)
        size = image_size // 2 ** len(channel_mult)
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(channel_mult)} stride-2 stages")
        self.head = nn.Sequential(nn.SiLU(), nn.Flatten(), nn.Linear(ch * size * size, out_dim))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, C, H / 2^S, W / 2^S)
        return self.head(h)  # (B, out_dim)
