"""The denoising-net contract every backbone honours (UNet, DiT): its call and the attributes systems read."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

NET_ATTRIBUTES = ("in_channels", "out_channels", "num_classes", "context_dim", "input_multiple")


@runtime_checkable
class DenoisingNet(Protocol):
    """A denoising net: `net(x, noise_level, *, class_labels=None, context=None, context_mask=None) -> out`.

    `x` (B, in_channels, H, W) is the net input (x_t, or EDM's c_in x_t); `noise_level` (B,) or () is what the
    objective feeds it: an integer DDPM index, 1000 t for flow, EDM's c_noise = ln(sigma) / 4 (any float);
    the output has `out_channels` channels and x's H, W. `num_classes` (None: unconditional) adds a class
    embedding whose id `num_classes` is the null class of classifier-free guidance; `context_dim` (None: no
    text) is the width of the text tokens `context` (B, L, context_dim) the net cross-attends to, `context_mask`
    (B, L) marking the real ones. H and W must be multiples of `input_multiple` (a UNet's 2^(levels - 1), a
    DiT's patch size).
    """

    in_channels: int
    out_channels: int
    num_classes: int | None
    context_dim: int | None
    input_multiple: int

    def __call__(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


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
