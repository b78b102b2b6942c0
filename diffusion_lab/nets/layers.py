"""UNet building blocks: timestep embedding, ResBlock, attention (torch SDPA), Down/Upsample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters (output layers of residual branches, DiT-style)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim) (Vaswani et al.; DDPM)."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 levels stay exact (tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added (or scale-shift, Dhariwal & Nichol) between."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        emb_dim: int,
        dropout: float = 0.0,
        scale_shift: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over image tokens, with keys/values from the image (self) or a context (cross);
    `bias`: biases on the query / key / value projections (DiT's, ViT's), none in the UNet's."""

    def __init__(
        self, channels: int, *, num_heads: int, context_dim: int | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels, bias=bias)
        self.to_kv = nn.Linear(context_dim or channels, 2 * channels, bias=bias)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, N, C) image tokens; context: (B, L, D); mask: (B, L) bool, True = attend
        q = self.to_q(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.num_heads) for a in (q, k, v))
        attn_mask = None
        if mask is not None:
            mask = mask.bool()
            # a fully masked row would give NaN: let it see its first token instead
            mask = mask | (
                ~mask.any(dim=1, keepdim=True) & (torch.arange(mask.shape[1], device=mask.device) == 0)
            )
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class AttentionBlock(nn.Module):
    """Pre-norm self-attention (unless `self_attention=False`), then cross-attention to a text context
    when `context_dim` is set."""

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 4,
        context_dim: int | None = None,
        norm_groups: int = 32,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        if not self_attention and context_dim is None:
            raise ValueError("an AttentionBlock needs self-attention or a context_dim (cross-attention)")
        self.norm = group_norm(channels, norm_groups) if self_attention else None
        self.self_attn = Attention(channels, num_heads=num_heads) if self_attention else None
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross_attn = Attention(channels, num_heads=num_heads, context_dim=context_dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        out = rearrange(x, "b c h w -> b (h w) c")  # (B, HW, C)
        if self.self_attn is not None:
            out = out + self.self_attn(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        if self.cross_attn is not None and context is not None:
            out = out + self.cross_attn(self.norm_cross(out), context, context_mask)
        return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Nearest x2 upsampling then a 3x3 convolution (padding 1) is a stride-2 transposed convolution with a
# 4x4 kernel: along each axis, output 2m gets x[m-1] k0 + x[m] (k1 + k2) and output 2m+1 gets
# x[m] (k0 + k1) + x[m+1] k2, i.e. the transposed kernel taps (k2, k1 + k2, k0 + k1, k0).
# Same function, 16 instead of 36 multiply-adds per input pixel and channel pair, and no upsampled copy.
_UPSAMPLE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv2d(interpolate(x, 2, nearest), weight, bias, padding=1)` as one transposed convolution."""
    taps = _UPSAMPLE_TAPS.to(dtype=weight.dtype, device=weight.device)
    kernel = torch.einsum("pk,oikl,ql->iopq", taps, weight, taps)  # (C_in, C_out, 4, 4)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)  # (B, C_out, 2H, 2W)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (computed by `upsample_conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv.weight, self.conv.bias)  # (B, C, 2H, 2W)
