"""Per-sample diffusion loss weightings (uniform, min-SNR-gamma), registered by name, and the loss itself."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .parameterization import check_prediction_type
from .registry import Registry
from .utils import append_dims, check_options

LOSS_WEIGHTINGS = Registry("loss weighting")

Weighting = Callable[..., Tensor]


@LOSS_WEIGHTINGS.register("uniform")
def uniform(snr: Tensor, *, prediction_type: str) -> Tensor:
    """Every timestep weighs 1: the 'simple' loss (Ho et al. 2020, eq. 14) in the chosen parameterization."""
    check_prediction_type(prediction_type)
    return torch.ones_like(snr, dtype=torch.float32)


@LOSS_WEIGHTINGS.register("min_snr")
def min_snr(snr: Tensor, *, prediction_type: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023): x0-loss weight min(snr, gamma), expressed for the prediction type.

    eps: min(snr, g) / snr; v: min(snr, g) / (snr + 1); x0: min(snr, g). At snr = 0 (zero terminal SNR)
    the eps weight takes its limit 1.
    """
    check_prediction_type(prediction_type)
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    snr = snr.float()
    clipped = snr.clamp(max=gamma)
    if prediction_type == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(snr, g) / snr, and 1 at snr = 0
    if prediction_type == "v":
        return clipped / (snr + 1)
    return clipped


def get_loss_weighting(name: str, **opts: float) -> Weighting:
    """The registered weighting ``name`` with its options bound: call it as ``w(snr, prediction_type=...)``."""
    fn = LOSS_WEIGHTINGS.get(name)
    check_options(fn, opts, what=f"loss weighting {name!r}", skip=("prediction_type",))
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
