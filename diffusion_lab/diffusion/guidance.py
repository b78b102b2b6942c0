"""Classifier-free guidance (Ho & Salimans 2022) around a denoising net, in one batched forward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Model = Callable[..., Tensor]


def classifier_free_guidance(
    model: Model,
    x: Tensor,
    t: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Guided model output ``uncond + s * (cond - uncond)`` (Ho & Salimans 2022, eq. 6).

    Guidance combines the RAW model outputs (eps, v or x0 alike; for eps and v this equals guiding the
    implied eps / x0, since the conversions are affine in the output). With ``guidance_scale == 1`` or no
    ``uncond`` it is one plain call ``model(x, t, **cond)``; otherwise ONE batched call on [uncond; cond]:
    x and t are doubled and every tensor in cond/uncond is concatenated along dim 0.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    cond = cond or {}
    if uncond is None or guidance_scale == 1.0:
        return model(x, t, **cond)
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Tensor):
            both[key] = torch.cat([uncond[key], value])  # (2B, ...)
        elif value is uncond[key] or value == uncond[key]:
            both[key] = value
        else:
            raise ValueError(f"cond[{key!r}] is not a tensor, so it must equal uncond[{key!r}]")
    out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)
