"""Per-sample diffusion loss weightings (uniform, min-SNR-gamma), registered by name, and the loss itself.

A weighting returns the per-sample weight of the squared error in the model's own output (its objective).
Weightings defined on x0 (min-SNR) are converted with ``Objective.x0_error_scale``, so they mean
the same objective whatever the net predicts (eps, v, x0, flow velocity or EDM's F). EDM's weight
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 needs no entry: it is 'uniform' under EDM's preconditioning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .registry import Registry
from .utils import append_dims, check_options

if TYPE_CHECKING:
    from .objectives import Objective

LOSS_WEIGHTINGS = Registry("loss weighting")

Weighting = Callable[..., Tensor]


# snr floor: eps-prediction weights keep their limit at snr = 0 (zero terminal SNR), e.g. min_snr's 1
_TINY = torch.finfo(torch.float32).tiny


@LOSS_WEIGHTINGS.register("uniform")
def uniform(snr: Tensor, *, objective: Objective) -> Tensor:
    """Every timestep weighs 1: the 'simple' loss (Ho et al. 2020, eq. 14) in the chosen objective."""
    return torch.ones_like(snr, dtype=torch.float32)


@LOSS_WEIGHTINGS.register("min_snr")
def min_snr(snr: Tensor, *, objective: Objective, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023): x0-loss weight min(snr, gamma), expressed for the objective.

    eps: min(snr, g) / snr; v: min(snr, g) / (snr + 1); x0: min(snr, g); flow, edm: likewise through
    x0_error_scale. At snr = 0 (zero terminal SNR) the eps weight takes its limit 1.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    snr = snr.float().clamp(min=_TINY)
    return snr.clamp(max=gamma) * objective.x0_error_scale(snr)


def get_loss_weighting(name: str, **opts: float) -> Weighting:
    """The registered weighting ``name`` with its options bound: call it as ``w(snr, objective=...)``
    with an ``Objective``."""
    fn = LOSS_WEIGHTINGS.get(name)
    check_options(fn, opts, what=f"loss weighting {name!r}", skip=("objective",))
    return functools.partial(fn, **opts)


def diffusion_loss(model_output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted mean over the batch of the per-sample mean squared error (computed in float32)."""
    if model_output.shape != target.shape:
        raise ValueError(f"model output {tuple(model_output.shape)} and target {tuple(target.shape)} differ")
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(
            f"weight must have shape {tuple(per_sample.shape)} (one per sample), got {tuple(weight.shape)}"
        )
    return (append_dims(weight.float(), 1) * per_sample).mean()
