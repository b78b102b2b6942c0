"""KL autoencoder (latent diffusion's stage 1): conv Encoder / Decoder and the diagonal Gaussian posterior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.nets.layers import AttentionBlock, Downsample, Upsample, group_norm, zero_init


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) over latents (B, C, h, w) (Kingma & Welling; latent diffusion)."""

    def __init__(
        self, mean: torch.Tensor, logvar: torch.Tensor, *, logvar_range: tuple[float, float] = (-30.0, 20.0)
    ):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar shapes differ: {tuple(mean.shape)} vs {tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(*logvar_range)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split (B, 2C, h, w) encoder output into mean and log-variance along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps, eps ~ N(0, I)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual connection (no time embedding)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.skip(x) + h


class MidBlock(nn.Module):
    """ResnetBlock -> self-attention (optional) -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, *, attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn = (
            AttentionBlock(channels, num_heads=1, norm_groups=norm_groups) if attention else nn.Identity()
        )
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn(self.block_1(x)))  # (B, C, h, w)


class Levels(NamedTuple):
    """What the Encoder and Decoder share: AutoencoderKL's settings but the image channels."""

    base_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_channels: int
    attention_levels: Sequence[int]
    mid_attention: bool
    dropout: float
    norm_groups: int

    def stage(self, ch: int, level: int, blocks: int) -> tuple[nn.Module, int]:
        """(one level: `blocks` ResnetBlocks from ch to the level's width, each followed by attention at the
        `attention_levels`, its output channels)."""
        out, attention = self.base_channels * self.channel_mult[level], level in self.attention_levels
        stage = nn.Module()
        stage.blocks = nn.ModuleList()
        stage.attn = nn.ModuleList()
        for _ in range(blocks):
            stage.blocks.append(ResnetBlock(ch, out, dropout=self.dropout, norm_groups=self.norm_groups))
            stage.attn.append(
                AttentionBlock(out, num_heads=1, norm_groups=self.norm_groups) if attention else nn.Identity()
            )
            ch = out
        return stage, ch

    def mid(self, ch: int) -> MidBlock:
        return MidBlock(ch, attention=self.mid_attention, dropout=self.dropout, norm_groups=self.norm_groups)


class Encoder(nn.Module):
    """Image (B, C, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f), f = 2^(levels - 1)."""

    def __init__(self, in_channels: int, levels: Levels) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, levels.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch, last = levels.base_channels, len(levels.channel_mult) - 1
        for level in range(last + 1):
            stage, ch = levels.stage(ch, level, levels.num_res_blocks)
            stage.downsample = Downsample(ch) if level < last else nn.Identity()
            self.down.append(stage)
        self.mid = levels.mid(ch)
        self.norm_out = group_norm(ch, levels.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * levels.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attn):
                h = attn(block(h))  # (B, C_level, H_level, W_level)
            h = stage.downsample(h)  # (B, C_level, H_level / 2, W_level / 2) except at the last level
        h = self.mid(h)  # (B, C_last, H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent_channels, H / f, W / f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, C, h * f, w * f); mirror of the Encoder."""

    def __init__(self, out_channels: int, levels: Levels) -> None:
        super().__init__()
        ch = levels.base_channels * levels.channel_mult[-1]
        self.conv_in = nn.Conv2d(levels.latent_channels, ch, 3, padding=1)
        self.mid = levels.mid(ch)
        self.up = nn.ModuleList()
        for level in reversed(range(len(levels.channel_mult))):
            stage, ch = levels.stage(ch, level, levels.num_res_blocks + 1)
            stage.upsample = Upsample(ch) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = group_norm(ch, levels.norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output convolution (where the adaptive GAN weight compares gradients)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attn):
                h = attn(block(h))  # (B, C_level, H_level, W_level)
            h = stage.upsample(h)  # (B, C_level, 2 H_level, 2 W_level) except at the first level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, h * f, w * f)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with LDMs").

    Downsampling factor f = 2^(len(channel_mult) - 1): channel_mult (1, 2, 2) -> f = 4, (1, 2, 4, 4) -> f = 8.
    The constructor's keyword arguments are kept in `init_kwargs` (plain Python) so a checkpoint can rebuild it.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        latent_channels: int = 4,
        attention_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        attention_levels = [int(a) for a in attention_levels]
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        if any(a < 0 or a >= len(channel_mult) for a in attention_levels):
            raise ValueError(
                f"attention_levels {attention_levels} must index channel_mult levels 0..{len(channel_mult) - 1}"
            )
        out_channels = in_channels if out_channels is None else int(out_channels)
        self.init_kwargs: dict[str, Any] = dict(
            in_channels=int(in_channels),
            out_channels=out_channels,
            base_channels=int(base_channels),
            channel_mult=channel_mult,
            num_res_blocks=int(num_res_blocks),
            latent_channels=int(latent_channels),
            attention_levels=attention_levels,
            mid_attention=bool(mid_attention),
            dropout=float(dropout),
            norm_groups=int(norm_groups),
        )
        levels = Levels(
            **{k: v for k, v in self.init_kwargs.items() if k not in ("in_channels", "out_channels")}
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, levels)
        self.decoder = Decoder(out_channels, levels)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch default conv init; zero the second conv of every residual branch (DiT-style)."""
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                zero_init(m.conv2)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of `image_size`."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self._check_size(h, w)
        return self.latent_channels, h // self.downsampling_factor, w // self.downsampling_factor

    def _check_size(self, h: int, w: int) -> None:
        f = self.downsampling_factor
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the downsampling factor {f} "
                f"(channel_mult has {f.bit_length()} levels): resize/pad the images or use fewer levels"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, C, H, W) in [-1, 1] -> posterior over latents (B, latent_channels, H / f, W / f)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[-2], x.shape[-1])
        return DiagonalGaussian.from_moments(self.encoder(x))  # moments (B, 2 C_z, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) -> image (B, C, h * f, w * f)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)  # over (B, C_z, H / f, W / f)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior  # (B, C, H, W)
