"""Objectives (eps, v, x0, flow velocity, EDM's F): what a net's raw output F means and how it is trained, by name.

Notation: x_t = alpha_t x0 + sigma_t eps for any process (alpha_t, sigma_t floats or tensors broadcastable
against x, e.g. from ``Process.alpha_sigma``), r = sqrt(alpha^2 + sigma^2) (1 for VP processes).
- eps, x0: the noise or the clean sample (Ho et al. 2020).
- v = (alpha eps - sigma x0) / r: the velocity of Salimans & Ho 2022 (sec. 4) in the normalised coordinates
  x_t / r, so it is the familiar alpha eps - sigma x0 on every VP process and defined on every other one.
- flow: u = eps - x0, the flow-matching velocity (Lipman et al. 2023; dx_t/dt for alpha = 1 - t, sigma = t).
- edm: F of EDM's preconditioning (Karras et al. 2022, Table 1) in k-diffusion sigma s = sigma / alpha:
  x0_hat = c_skip x_t / alpha + c_out F, c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), written
  with alpha and sigma so that it stays finite where alpha = 0. Its net sees c_in x_t and c_noise = ln(s) / 4
  (NVlabs/edm ``EDMPrecond``); the others see x_t and the process's own noise level (integer index, 1000 t, ...).
Each objective is one registered class: ``denoised`` (F -> (x0_hat, eps_hat)), ``target`` ((x0, eps) -> F) and
``x0_error_scale``. ``Objective.loss(LossInputs)`` is the one training step every diffusion system calls: the
generic ``training_loss`` for these, the objective's own for the few-step ones (meanflow, shortcut, consistency),
which need the net itself (a jvp, two evaluations, a target net).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .losses import diffusion_loss
from .processes import ALPHA_FLOOR, Process
from .registry import Registry
from .utils import check_options

Scalar = Tensor | float
OBJECTIVES = Registry("objective")


@dataclass(frozen=True, kw_only=True)
class LossInputs:
    """What one training step hands its objective's ``loss``: the net, a batch x0 (B, C, H, W) in diffusion space
    and its condition (after CFG's condition dropout), the process, the training noise-level distribution and
    loss weighting, and for few-step objectives ``null_condition(batch_size)`` (CFG's null condition; None for an
    unconditional model), the optimizer ``step`` (curricula) and a ``target_net`` (e.g. the EMA weights; None:
    the net itself)."""

    net: Callable[..., Tensor]
    x0: Tensor
    process: Process
    noise_levels: Callable[..., Tensor]
    weighting: Callable[..., Tensor]
    cond: dict[str, Tensor] = field(default_factory=dict)
    null_condition: Callable[[int], dict[str, Tensor]] | None = None
    generator: torch.Generator | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    step: int = 0
    target_net: Callable[..., Tensor] | None = None


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else x**0.5


@dataclass(frozen=True)
class Objective:
    """What the net's raw output F means: subclasses define ``denoised``, ``target`` and ``x0_error_scale``."""

    name: ClassVar[str]
    preconditioned: ClassVar[bool] = False  # the net sees EDM's c_in x_t and c_noise

    def denoised(self, out: Tensor, x_t: Tensor, alpha: Scalar, sigma: Scalar) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the net's raw output at x_t (DDIM eq. 9; v: Salimans & Ho eq. 9)."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
        """What the raw output regresses to at x_t = alpha x0 + sigma eps."""
        raise NotImplementedError

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """(d x0_hat / d F)^2 at snr = alpha^2 / sigma^2: a squared error in F times this is the squared error of
        x0_hat, so loss weightings defined on x0 (min-SNR) weigh every objective alike."""
        raise NotImplementedError

    def net_input(
        self, x_t: Tensor, t: Tensor, alpha: Scalar, sigma: Scalar, process: Process
    ) -> tuple[Tensor, Tensor]:
        """(x_in, noise_level) to call the net with at x_t, noise levels t (B,) and coefficients (alpha, sigma)."""
        return x_t, process.noise_level(t)

    def loss(self, inputs: LossInputs) -> Tensor:
        """The training loss of one batch (the seam every system calls): the generic ``training_loss`` here; a
        few-step objective overrides it with its own (it gets the net, so it may take a jvp or call it twice)."""
        return training_loss(
            inputs.net,
            inputs.x0,
            process=inputs.process,
            objective=self,
            noise_levels=inputs.noise_levels,
            weighting=inputs.weighting,
            cond=inputs.cond,
            generator=inputs.generator,
            memory_format=inputs.memory_format,
        )


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Register an ``Objective`` subclass under ``name`` (its ``name`` attribute is set to it)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        return OBJECTIVES.register(name)(cls)

    return deco


@register_objective("eps")
class Eps(Objective):
    """eps prediction (Ho et al. 2020): the net predicts the noise; x0 error scale 1 / snr."""

    def denoised(self, out, x_t, alpha, sigma):
        return (x_t - sigma * out) / alpha, out

    def target(self, x0, eps, alpha, sigma):
        return eps

    def x0_error_scale(self, snr):
        return 1 / snr.float()


@register_objective("x0")
class X0(Objective):
    """x0 prediction: the net predicts the clean sample; x0 error scale 1."""

    def denoised(self, out, x_t, alpha, sigma):
        return out, (x_t - alpha * out) / sigma

    def target(self, x0, eps, alpha, sigma):
        return x0

    def x0_error_scale(self, snr):
        return torch.ones_like(snr.float())


@register_objective("v")
class V(Objective):
    """v prediction (Salimans & Ho 2022): v = (alpha eps - sigma x0) / r; x0 error scale 1 / (1 + snr)."""

    def denoised(self, out, x_t, alpha, sigma):
        r2 = alpha * alpha + sigma * sigma
        r = _sqrt(r2)
        return alpha / r2 * x_t - sigma / r * out, sigma / r2 * x_t + alpha / r * out

    def target(self, x0, eps, alpha, sigma):
        return (alpha * eps - sigma * x0) / _sqrt(alpha * alpha + sigma * sigma)

    def x0_error_scale(self, snr):
        return 1 / (1 + snr.float())


@register_objective("flow")
class Flow(Objective):
    """Flow-matching velocity (Lipman et al. 2023): u = eps - x0; x0 error scale 1 / (1 + sqrt(snr))^2."""

    def denoised(self, out, x_t, alpha, sigma):
        x0 = (x_t - sigma * out) / (alpha + sigma)
        return x0, x0 + out

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def x0_error_scale(self, snr):
        return 1 / (1 + snr.float().sqrt()) ** 2


@register_objective("edm")
@dataclass(frozen=True, kw_only=True)
class EDM(Objective):
    """EDM's preconditioned F (Karras et al. 2022, Table 1); ``sigma_data`` is the data's standard deviation.

    q = sigma^2 + alpha^2 sd^2 = alpha^2 (s^2 + sd^2) writes c_skip, c_out, c_in in (alpha, sigma) form."""

    sigma_data: float = 0.5
    preconditioned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    def _q(self, alpha: Scalar, sigma: Scalar) -> Scalar:
        return sigma * sigma + alpha * alpha * self.sigma_data**2

    def denoised(self, out, x_t, alpha, sigma):
        sd, q = self.sigma_data, self._q(alpha, sigma)
        x0 = (sd**2 * alpha) / q * x_t + sigma * sd / _sqrt(q) * out
        return x0, (x_t - alpha * x0) / sigma

    def target(self, x0, eps, alpha, sigma):  # (x0 - c_skip x_t / alpha) / c_out
        sd = self.sigma_data
        return (sigma * x0 - alpha * sd**2 * eps) / (sd * _sqrt(self._q(alpha, sigma)))

    def x0_error_scale(self, snr):  # c_out^2
        return self.sigma_data**2 / (1 + self.sigma_data**2 * snr.float())

    def net_input(self, x_t, t, alpha, sigma, process):
        q = self._q(alpha, sigma)  # alpha^2 (s^2 + sd^2)
        c_in_x = x_t * (q.rsqrt() if isinstance(q, Tensor) else 1 / math.sqrt(q))  # c_in * x_t / alpha
        return c_in_x, self.c_noise(alpha, sigma, len(x_t), x_t.device)

    @staticmethod
    def c_noise(alpha: Scalar, sigma: Scalar, batch: int, device: torch.device) -> Tensor:
        """EDM's c_noise = ln(s) / 4 with s = sigma / alpha (alpha floored at 2^-12), shape (B,) float32."""
        if isinstance(alpha, Tensor):
            s = sigma.reshape(-1).double() / alpha.reshape(-1).double().clamp(min=ALPHA_FLOOR)
            return (s.log() / 4).float().to(device).expand(batch)
        return torch.full((batch,), math.log(sigma / max(alpha, ALPHA_FLOOR)) / 4, device=device)


def get_objective(name: str | Objective = "eps", **opts: Any) -> Objective:
    """The registered objective ``name`` with its options (``sigma_data`` for edm); an ``Objective`` as is."""
    if isinstance(name, Objective):
        return name
    cls = OBJECTIVES.get(name)
    check_options(cls, opts, what=f"objective {name!r}")
    return cls(**opts)


def convert(
    model_output: Tensor, x_t: Tensor, alpha_t: Scalar, sigma_t: Scalar, *, source: str, target: str
) -> Tensor:
    """Re-express a raw output of objective ``source`` as one of objective ``target`` (e.g. v -> eps)."""
    x0, eps = get_objective(source).denoised(model_output, x_t, alpha_t, sigma_t)
    return get_objective(target).target(x0, eps, alpha_t, sigma_t)


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
    return diffusion_loss(out, target, weighting(process.snr(t), objective=objective))
