"""DiT (Peebles & Xie 2023): a transformer on image patches with adaLN-Zero conditioning, plus cross-attention to text."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from diffusion_lab.nets.base import ConditionedNet, condition_layers, second_level_layer
from diffusion_lab.nets.layers import Attention, zero_init


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (H W, dim) of a height x width grid, row-major: per token
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_i = 10000^(-i / (dim / 4)), x the column and y the row
    (MAE's and DiT's `get_2d_sincos_pos_embed` layout). Computed in float64 on the CPU."""
    if dim % 4:
        raise ValueError(f"the 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim / 4,)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (x.reshape(-1), y.reshape(-1)):
        angle = pos[:, None] * omega[None]  # (H W, dim / 4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)  # (H W, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: tokens (B, N, D) scaled by 1 + scale and shifted by shift, both (B, D) from the condition."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without its own affine parameters (adaLN supplies scale and shift), eps 1e-6 as in DiT."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each on adaLN-modulated tokens and gated (adaLN-Zero: gates start at 0, so the
    block starts as the identity); with `context_dim`, cross-attention to text tokens between them (PixArt-alpha,
    Chen et al. 2023: pre-LayerNorm, ungated, its output projection zero at init)."""

    def __init__(
        self, hidden_size: int, *, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, bias=True)
        self.norm_cross = nn.LayerNorm(hidden_size) if context_dim is not None else None
        self.cross_attn = (
            Attention(hidden_size, num_heads=num_heads, context_dim=context_dim, bias=True)
            if context_dim is not None
            else None
        )
        self.norm2 = layer_norm(hidden_size)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, N, D) tokens; c: (B, D) condition; context: (B, L, D_ctx); context_mask: (B, L)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)  # (B, N, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch of output pixels."""

    def __init__(self, hidden_size: int, *, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p p C_out)


class DiT(ConditionedNet):
    """Diffusion transformer (Peebles & Xie 2023), a `DenoisingNet`:
    `net(x, noise_level, *, class_labels=?, context=?, context_mask=?)`.

    x (B, C, H, W) is cut into `patch_size` x `patch_size` patches (H, W multiples of it; any size, since the
    2-D sine-cosine positions are fixed, not learned), embedded to `hidden_size` tokens and run through `depth`
    adaLN-Zero blocks conditioned on c = MLP(sinusoidal(noise_level)) + class embedding. The noise level may
    be any float (an integer DDPM index, 1000 t for flow, EDM's c_noise). `num_classes` adds the class
    embedding (id `num_classes` = the null class of classifier-free guidance); `context_dim` adds
    cross-attention to text tokens (B, L, context_dim) in every block, `context_mask` (B, L) marking the real
    ones. The output has `out_channels` (default: in_channels) channels: no learned variance.
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        frequency_dim: int = 256,
        two_time: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4:
            raise ValueError(
                f"hidden_size must be divisible by 4 (2-D sine-cosine positions), got {hidden_size}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.patch_size = patch_size
        self.input_multiple = patch_size
        self.hidden_size = hidden_size
        self.frequency_dim = frequency_dim
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_mlp, self.class_emb = condition_layers(frequency_dim, hidden_size, num_classes)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, context_dim=context_dim)
            for _ in range(depth)
        )
        self.final = FinalLayer(hidden_size, patch_size=patch_size, out_channels=self.out_channels)
        self.init_weights()
        # last, so a one-time net's parameters (names, order, random init) are exactly as before
        self.accepts_second_level = two_time
        self.second_level_mlp = second_level_layer(frequency_dim, hidden_size, enabled=two_time)

    def init_weights(self) -> None:
        """DiT's `initialize_weights`: Xavier-uniform linear layers (and patch embedding) with zero biases, N(0,
        0.02) time MLP and class table; adaLN-Zero: every modulation and the output layer zero, so each block
        starts as the identity and the net predicts 0; cross-attention's output projection zero too."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for block in self.blocks:
            zero_init(block.modulation[-1])
            if block.cross_attn is not None:
                zero_init(block.cross_attn.proj)
        zero_init(self.final.modulation[-1])
        zero_init(self.final.linear)

    def body(self, x: Tensor, c: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        """x (B, C, H, W) under the condition embedding c (B, D) -> (B, C_out, H, W)."""
        p = self.patch_size
        _, _, height, width = x.shape  # (B, C, H, W)
        if height % p or width % p:
            raise ValueError(f"DiT with patch_size {p} needs H and W multiples of {p}, got {height}x{width}")
        h, w = height // p, width // p
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")  # (B, N, D), N = h w
        tokens = tokens + sincos_2d(h, w, self.hidden_size).to(device=x.device, dtype=tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c, context, context_mask)  # (B, N, D)
        out = self.final(tokens, c)  # (B, N, p p C_out)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # (B, C_out, H, W)
