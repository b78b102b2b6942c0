"""One UNet: unconditional, class-conditional (embedding added to time) and text (cross-attention)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.nets.base import ConditionedNet, condition_layers, second_level_layer
from diffusion_lab.nets.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, zero_init


class UNetBlock(nn.Module):
    """A ResBlock optionally followed by an attention block (self, plus cross when there is a context)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb, context=None, context_mask=None):
        x = self.res(x, emb)
        return self.attn(x, context, context_mask) if self.attn is not None else x


@dataclass(frozen=True)
class _Blocks:
    """Builds a UNet's blocks with its shared settings: a ResBlock, with attention where the levels ask for it."""

    res_kw: dict  # ResBlock's emb_dim, dropout, scale_shift, norm_groups
    num_heads: int
    attention_levels: tuple[int, ...]
    cross_levels: tuple[int, ...]
    context_dim: int | None

    def __call__(self, cin: int, cout: int, level: int | None = None, *, attention: bool = True) -> UNetBlock:
        """A block cin -> cout at ``level`` (None: the middle, which always has attention unless told not)."""
        res = ResBlock(cin, cout, **self.res_kw)
        self_attn = level is None or level in self.attention_levels
        cross = self.context_dim is not None and (level is None or level in self.cross_levels)
        if not attention or not (self_attn or cross):
            return UNetBlock(res)
        context_dim, groups = (self.context_dim if cross else None), self.res_kw["norm_groups"]
        kw = dict(
            num_heads=self.num_heads, context_dim=context_dim, norm_groups=groups, self_attention=self_attn
        )
        return UNetBlock(res, AttentionBlock(cout, **kw))


def _check_levels(channel_mult: tuple[int, ...], **levels: tuple[int, ...]) -> None:
    for name, values in levels.items():
        bad = [lvl for lvl in values if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(f"{name} {bad} out of range for {len(channel_mult)} levels")


class UNet(ConditionedNet):
    """DDPM / ADM-style UNet, a `DenoisingNet`: `net(x, noise_level, *, class_labels=?, context=?, context_mask=?)`.

    `num_classes` adds a class embedding to the time embedding; id `num_classes` is the null
    class for classifier-free guidance. `attention_levels` lists the levels with self-attention
    (0 = full resolution; the middle always has it). `context_dim` adds cross-attention from image
    tokens to text tokens (Rombach et al. 2022) at `cross_attention_levels` (default: the
    `attention_levels`) and in the middle; `context_mask` (B, L) marks the real tokens.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        cross_attention_levels: Sequence[int] | None = None,
        scale_shift: bool = True,
        norm_groups: int = 32,
        two_time: bool = False,
    ) -> None:
        super().__init__()
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        cross_levels = attention_levels if cross_attention_levels is None else tuple(cross_attention_levels)
        _check_levels(channel_mult, attention_levels=attention_levels, cross_attention_levels=cross_levels)
        self.init_kwargs = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_levels=list(attention_levels),
            num_heads=num_heads,
            dropout=dropout,
            num_classes=num_classes,
            context_dim=context_dim,
            cross_attention_levels=None if cross_attention_levels is None else list(cross_levels),
            scale_shift=scale_shift,
            norm_groups=norm_groups,
            **({"two_time": True} if two_time else {}),  # one-time nets keep their old kwargs
        )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.base_channels = base_channels
        self.input_multiple = 2 ** (len(channel_mult) - 1)  # H, W are halved once per level below the first
        emb_dim = 4 * base_channels
        res_kw = dict(emb_dim=emb_dim, dropout=dropout, scale_shift=scale_shift, norm_groups=norm_groups)
        block = _Blocks(res_kw, num_heads, attention_levels, cross_levels, context_dim)
        self.time_mlp, self.class_emb = condition_layers(base_channels, emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skip_channels = self._build_down(block, channel_mult, num_res_blocks)
        ch = skip_channels[-1]
        self.mid = nn.ModuleList([block(ch, ch), block(ch, ch, attention=False)])
        self.up = self._build_up(block, channel_mult, num_res_blocks, skip_channels)
        self.norm_out = group_norm(base_channels * channel_mult[0], norm_groups)
        self.conv_out = nn.Conv2d(base_channels * channel_mult[0], self.out_channels, 3, padding=1)
        self.init_weights()
        # last, so a one-time net's parameters (names, order, random init) are exactly as before
        self.accepts_second_level = two_time
        self.second_level_mlp = second_level_layer(base_channels, emb_dim, enabled=two_time)

    def _build_down(
        self, block: _Blocks, channel_mult: tuple[int, ...], num_res_blocks: int
    ) -> tuple[nn.ModuleList, list[int]]:
        """The encoder (blocks, a Downsample between levels) and the channels of each skip connection."""
        down, ch = nn.ModuleList(), self.base_channels
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                down.append(block(ch, self.base_channels * mult, level))
                ch = self.base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down.append(Downsample(ch))
                skip_channels.append(ch)
        return down, skip_channels

    def _build_up(
        self, block: _Blocks, channel_mult: tuple[int, ...], num_res_blocks: int, skip_channels: list[int]
    ) -> nn.ModuleList:
        """The decoder: num_res_blocks + 1 blocks per level, each taking a skip connection; Upsample between."""
        up, skip_channels, ch = nn.ModuleList(), list(skip_channels), skip_channels[-1]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                up.append(block(ch + skip_channels.pop(), self.base_channels * mult, level))
                ch = self.base_channels * mult
            if level != 0:
                up.append(Upsample(ch))
        return up

    def init_weights(self) -> None:
        """Zero the output conv (the net starts by predicting 0); small normal class embeddings."""
        zero_init(self.conv_out)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)

    @property
    def frequency_dim(self) -> int:
        """Width of the sinusoidal noise-level embedding: base_channels."""
        return self.base_channels

    def body(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        """x (B, C, H, W) under the condition embedding emb (B, E) -> (B, C_out, H, W)."""
        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, context, context_mask)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, context, context_mask)  # (B, C_mid, H / 2^(L-1), W / 2^(L-1))
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
