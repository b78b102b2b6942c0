"""One UNet: unconditional, class-conditional (embedding added to time) and text (cross-attention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.nets.base import class_ids
from diffusion_lab.nets.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_init,
)


class UNetBlock(nn.Module):
    """A ResBlock optionally followed by an attention block (self, plus cross when there is a context)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb, context=None, context_mask=None):
        x = self.res(x, emb)
        return self.attn(x, context, context_mask) if self.attn is not None else x


class UNet(nn.Module):
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
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        attention_levels = tuple(attention_levels)
        cross_levels = attention_levels if cross_attention_levels is None else tuple(cross_attention_levels)
        for name, levels in (
            ("attention_levels", attention_levels),
            ("cross_attention_levels", cross_levels),
        ):
            bad = [lvl for lvl in levels if not 0 <= lvl < len(channel_mult)]
            if bad:
                raise ValueError(f"{name} {bad} out of range for {len(channel_mult)} levels")
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
        )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.base_channels = base_channels
        self.input_multiple = 2 ** (len(channel_mult) - 1)  # H, W are halved once per level below the first
        emb_dim = 4 * base_channels

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(
                cin, cout, emb_dim=emb_dim, dropout=dropout, scale_shift=scale_shift, norm_groups=norm_groups
            )

        def attn(ch: int, level: int | None = None) -> AttentionBlock | None:
            """Attention at a level (None = the middle): self and/or cross as configured, or None."""
            self_attn = level is None or level in attention_levels
            cross = context_dim is not None and (level is None or level in cross_levels)
            if not (self_attn or cross):
                return None
            return AttentionBlock(
                ch,
                num_heads=num_heads,
                context_dim=context_dim if cross else None,
                norm_groups=norm_groups,
                self_attention=self_attn,
            )

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                cout = base_channels * mult
                self.down.append(UNetBlock(res(ch, cout), attn(cout, level)))
                ch = cout
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([UNetBlock(res(ch, ch), attn(ch)), UNetBlock(res(ch, ch))])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                cout = base_channels * mult
                cin = ch + skip_channels.pop()
                self.up.append(UNetBlock(res(cin, cout), attn(cout, level)))
                ch = cout
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the output conv (the net starts by predicting 0); small normal class embeddings."""
        zero_init(self.conv_out)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise_level.ndim == 0:
            noise_level = noise_level.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(noise_level, self.base_channels))  # (B, E)
        labels = class_ids(self, class_labels, context, x)  # (B,) or None; the null class when not given
        if labels is not None:
            emb = emb + self.class_emb(labels)

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
