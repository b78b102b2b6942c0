"""The denoising-net contract every backbone honours (UNet, DiT): its call and the attributes systems read."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffusion_lab.nets.layers import timestep_embedding

NET_ATTRIBUTES = ("in_channels", "out_channels", "num_classes", "context_dim", "input_multiple")


@runtime_checkable
class DenoisingNet(Protocol):
    """A denoising net: `net(x, noise_level, *, class_labels=None, context=None, context_mask=None,
    second_level=None) -> out`.

    `x` (B, in_channels, H, W) is the net input (x_t, or EDM's c_in x_t); `noise_level` (B,) or () is what the
    objective feeds it: an integer DDPM index, 1000 t for flow, EDM's c_noise = ln(sigma) / 4 (any float);
    the output has `out_channels` channels and x's H, W. `num_classes` (None: unconditional) adds a class
    embedding whose id `num_classes` is the null class of classifier-free guidance; `context_dim` (None: no
    text) is the width of the text tokens `context` (B, L, context_dim) the net cross-attends to, `context_mask`
    (B, L) marking the real ones. H and W must be multiples of `input_multiple` (a UNet's 2^(levels - 1), a
    DiT's patch size). `second_level` (B,) or () is an optional second time, accepted only by a net built with
    `two_time=True` (`accepts_second_level`): MeanFlow's interval t - r or the shortcut step size d, in the
    noise level's own scale (1000 d for 1000 t), default 0 (the instantaneous velocity); it is embedded like the
    noise level by its own MLP, zero at its output, and added to the time embedding, so such a net starts equal
    to the one-time net.
    """

    in_channels: int
    out_channels: int
    num_classes: int | None
    context_dim: int | None
    input_multiple: int

    def __call__(self, x: Tensor, noise_level: Tensor, **condition: Tensor | None) -> Tensor:
        """`condition`: the keywords class_labels, context, context_mask, second_level (`ConditionedNet.forward`)."""


def check_denoising_net(net: object) -> DenoisingNet:
    """`net` itself when it has the contract's attributes; TypeError naming what it lacks otherwise."""
    missing = [name for name in NET_ATTRIBUTES if not hasattr(net, name)]
    if missing or not callable(net):
        raise TypeError(
            f"{type(net).__name__} is not a denoising net: it lacks {', '.join(missing) or '__call__'} "
            f"(diffusion_lab.nets.base.DenoisingNet: {', '.join(NET_ATTRIBUTES)} and "
            "net(x, noise_level, *, class_labels=None, context=None, context_mask=None))"
        )
    return net  # type: ignore[return-value]


def class_ids(
    net: DenoisingNet, class_labels: torch.Tensor | None, context: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor | None:
    """The class ids a net embeds: `class_labels`, or the null class `num_classes` for each sample when a
    class-conditional net is called without; None for an unconditional net. ValueError for labels given to an
    unconditional net, or a context to one without cross-attention."""
    name = type(net).__name__
    if context is not None and net.context_dim is None:
        raise ValueError(f"context given to a {name} built without context_dim (no cross-attention)")
    if net.num_classes is None:
        if class_labels is not None:
            raise ValueError(f"class_labels given to a {name} built without num_classes")
        return None
    if class_labels is None:  # unconditional call of a class-conditional net: the null class
        return torch.full((x.shape[0],), net.num_classes, device=x.device, dtype=torch.long)
    return class_labels


def condition_layers(
    frequency_dim: int, dim: int, num_classes: int | None
) -> tuple[nn.Module, nn.Module | None]:
    """(time_mlp, class_emb): the MLP of the sinusoidal noise-level embedding (frequency_dim -> dim) and the class
    table with the null class (None for an unconditional net)."""
    time_mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    return time_mlp, (nn.Embedding(num_classes + 1, dim) if num_classes is not None else None)


def second_level_layer(frequency_dim: int, dim: int, *, enabled: bool) -> nn.Module | None:
    """The MLP of a two-time net's second level (frequency_dim -> dim), its output layer zero so the net starts
    equal to the one-time net; None (no parameters, the one-time net's state dict) when not `enabled`."""
    if not enabled:
        return None
    mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def embed_condition(
    net: nn.Module,
    x: torch.Tensor,
    noise_level: torch.Tensor,
    class_labels: torch.Tensor | None,
    context: torch.Tensor | None,
    *,
    frequency_dim: int,
    second_level: torch.Tensor | None = None,
) -> torch.Tensor:
    """The conditioning prologue of UNet and DiT: net.time_mlp(sinusoidal(noise_level)) plus net.class_emb of the
    class ids (``class_ids``: the null class when none is given), plus net.second_level_mlp(sinusoidal(
    second_level)) when given, (B, dim); 0-d levels are broadcast. ValueError for a second level given to a net
    built without `two_time=True`; a two-time net called without one takes 0 (r = t, d = 0: the
    instantaneous velocity, so every multi-step sampler runs it)."""
    if noise_level.ndim == 0:
        noise_level = noise_level.expand(x.shape[0])
    emb = net.time_mlp(timestep_embedding(noise_level, frequency_dim).to(x.dtype))  # (B, dim)
    if second_level is not None and net.second_level_mlp is None:
        raise ValueError(
            f"second_level given to a {type(net).__name__} built without two_time=True "
            "(model.net.two_time: true makes a two-time net)"
        )
    if (
        net.second_level_mlp is not None
    ):  # None: 0, the instantaneous velocity (MeanFlow r = t, shortcut d = 0)
        second_level = torch.zeros_like(noise_level) if second_level is None else second_level
        if second_level.ndim == 0:
            second_level = second_level.expand(x.shape[0])
        emb = emb + net.second_level_mlp(timestep_embedding(second_level, frequency_dim).to(x.dtype))
    labels = class_ids(net, class_labels, context, x)  # (B,) or None
    return emb if labels is None else emb + net.class_emb(labels)


class ConditionedNet(nn.Module):
    """Base of UNet and DiT: `forward` is the `DenoisingNet` call; it embeds the condition (`embed_condition`, with
    the net's `frequency_dim`) and hands the embedding c (B, dim) to the net's `body`."""

    frequency_dim: int

    def forward(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        second_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = embed_condition(
            self,
            x,
            noise_level,
            class_labels,
            context,
            frequency_dim=self.frequency_dim,
            second_level=second_level,
        )
        return self.body(x, c, context, context_mask)

    def body(self, x: Tensor, c: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        """The net's output for input x (B, C, H, W) under the condition embedding c (B, dim)."""
        raise NotImplementedError
