"""Objectives: how a net's raw output F is called, read as x0_hat and trained, for every prediction type.

An ``Objective`` is a prediction type (eps, v, x0, flow velocity, or EDM's preconditioned F; the conversions
live in ``parameterization.py``) plus how the net is called: eps / v / x0 / flow nets see x_t and the
process's own noise level (integer index, 1000 t, ...), EDM's see c_in x_t and c_noise = ln(sigma) / 4 with
sigma the k-diffusion sigma (Karras et al. 2022, Table 1; NVlabs/edm ``EDMPrecond``). ``training_loss`` is the
one training step every diffusion system calls: draw t, noise, x_t; call the net; weighted MSE to the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .losses import diffusion_loss
from .parameterization import check_prediction_type, from_x0_eps, to_x0_eps, x0_error_scale
from .processes import ALPHA_FLOOR, Process

Scalar = Tensor | float


@dataclass(frozen=True)
class Objective:
    """A prediction type with its options; ``sigma_data`` is EDM's data standard deviation (edm only)."""

    prediction_type: str = "eps"
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    @property
    def preconditioned(self) -> bool:
        """Whether the net sees EDM's c_in x_t and c_noise instead of x_t and the process's noise level."""
        return self.prediction_type == "edm"

    def net_input(
        self, x_t: Tensor, t: Tensor, alpha: Scalar, sigma: Scalar, process: Process
    ) -> tuple[Tensor, Tensor]:
        """(x_in, noise_level) to call the net with at x_t, noise levels t (B,) and coefficients (alpha, sigma)."""
        if not self.preconditioned:
            return x_t, process.noise_level(t)
        q = sigma * sigma + alpha * alpha * self.sigma_data**2  # alpha^2 (s^2 + sd^2)
        c_in_x = x_t * (q.rsqrt() if isinstance(q, Tensor) else 1 / math.sqrt(q))  # c_in * x_t / alpha
        return c_in_x, self.c_noise(alpha, sigma, len(x_t), x_t.device)

    @staticmethod
    def c_noise(alpha: Scalar, sigma: Scalar, batch: int, device: torch.device) -> Tensor:
        """EDM's c_noise = ln(s) / 4 with s = sigma / alpha (alpha floored at 2^-12), shape (B,) float32."""
        if isinstance(alpha, Tensor):
            s = sigma.reshape(-1).double() / alpha.reshape(-1).double().clamp(min=ALPHA_FLOOR)
            return (s.log() / 4).float().to(device).expand(batch)
        return torch.full((batch,), math.log(sigma / max(alpha, ALPHA_FLOOR)) / 4, device=device)

    def denoised(self, out: Tensor, x_t: Tensor, alpha: Scalar, sigma: Scalar) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the net's raw output at x_t."""
        return to_x0_eps(self.prediction_type, out, x_t, alpha, sigma, sigma_data=self.sigma_data)

    def target(self, x0: Tensor, eps: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
        """What the raw output regresses to at x_t = alpha x0 + sigma eps."""
        return from_x0_eps(self.prediction_type, x0, eps, alpha, sigma, sigma_data=self.sigma_data)

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """(d x0_hat / d F)^2 at these SNRs: converts x0-space loss weights into this objective's."""
        return x0_error_scale(self.prediction_type, snr, sigma_data=self.sigma_data)


def get_objective(prediction_type: str | Objective = "eps", **opts: Any) -> Objective:
    """An ``Objective`` from a prediction type name and its options (``sigma_data`` for edm)."""
    if isinstance(prediction_type, Objective):
        return prediction_type
    unknown = sorted(set(opts) - {"sigma_data"})
    if unknown:
        raise TypeError(f"unknown objective option(s) {', '.join(unknown)}; valid options: sigma_data")
    return Objective(prediction_type=prediction_type, **opts)


def training_loss(
    net: Callable[..., Tensor],
    x0: Tensor,
    *,
    process: Process,
    objective: Objective,
    noise_levels: Callable[..., Tensor],
    weighting: Callable[..., Tensor],
    cond: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """One diffusion training loss: t ~ noise_levels, eps ~ N(0, I), x_t = alpha x0 + sigma eps, weighted MSE
    between net(x_in, noise_level) and the objective's target (Ho et al. 2020, Alg. 1; Karras et al. 2022)."""
    t = noise_levels(process, len(x0), generator=generator, device=x0.device)  # (B,)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = process.add_noise(x0, noise, t)
    alpha, sigma = process.alpha_sigma(t, x0)
    x_in, level = objective.net_input(x_t, t, alpha, sigma, process)
    out = net(x_in.contiguous(memory_format=memory_format), level, **(cond or {}))
    target = objective.target(x0, noise, alpha, sigma)
    return diffusion_loss(out, target, weighting(process.snr(t), prediction_type=objective))
