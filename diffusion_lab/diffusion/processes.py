"""Noise processes x_t = alpha(t) x0 + sigma(t) eps: the contract, EDM / VE and rectified flow, one registry.

A process maps its noise level t (integer indices for the discrete VP schedules of ``schedules.py``, floats
otherwise) to (alpha(t), sigma(t)). Every process also speaks the k-diffusion sigma ``ksigma = sigma / alpha``
(Karras et al. 2022) and its inverse, so a sampler written in one space runs on every process:
``from_ksigma(s)`` gives the process's own (alpha, sigma) at that noise level (VP: alpha^2 + sigma^2 = 1,
VE: alpha = 1, flow: alpha + sigma = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .registry import Registry
from .utils import append_dims, check_options

PROCESSES = Registry("noise process")

# alpha used in sigma space where the true alpha is 0 (zero terminal SNR, flow at t = 1): the square root of
# diffusers' 2^-24 alpha-bar, so ksigma stays finite (4096 at unit sigma).
ALPHA_FLOOR = 2.0**-12


def _float(t: Tensor) -> Tensor:
    """A tensor of noise levels in floating point (integers and Python numbers become float64)."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.double()


def shift_time(u: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift of unit time (Esser et al. 2024, eq. 23): u' = s u / (1 + (s - 1) u)."""
    if isinstance(shift, (bool, str)) or not shift > 0:
        raise ValueError(f"shift must be a number > 0, got {shift!r}")
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


class Process:
    """x_t = alpha(t) x0 + sigma(t) eps for a batch of noise levels t; subclasses define ``coefficients``.

    Attributes: ``name``; ``discrete`` (t are integer table indices); ``t_max`` (the noisiest level, where
    sampling starts) and ``t_min`` (the least noisy level training draws); ``default_grid`` (the sampling grid
    used when a sampler names none).
    """

    name: str = "process"
    discrete: bool = False
    t_min: float = 0.0
    t_max: float = 1.0
    default_grid: str = "uniform"

    # ------------------------------------------------------------------ what subclasses define
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) for a 1-D tensor of noise levels, in its float dtype (float64 for integers)."""
        raise NotImplementedError

    def from_ksigma(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The process's (alpha, sigma) at k-diffusion sigma ``s`` (float64)."""
        raise NotImplementedError

    def t_from_ksigma(self, s: Tensor) -> Tensor:
        """The noise level t whose k-diffusion sigma is ``s`` (float64; fractional for discrete processes)."""
        raise NotImplementedError

    def from_unit(self, u: Tensor) -> Tensor:
        """Noise level t for unit time u in [0, 1] (0 = clean end, 1 = t_max): training distributions use it."""
        return self.t_min + u * (self.t_max - self.t_min)

    def to_unit(self, t: Tensor) -> Tensor:
        """The inverse of ``from_unit``."""
        return (t - self.t_min) / (self.t_max - self.t_min)

    def noise_level(self, t: Tensor) -> Tensor:
        """What an eps / v / x0 / flow net is called with at noise level t (EDM preconditioning uses c_noise)."""
        return t

    # ------------------------------------------------------------------ shared, in terms of the above
    def ksigma(self, t: Tensor) -> Tensor:
        """k-diffusion sigma sigma(t) / alpha(t) (float64), finite where alpha = 0 (alpha floored at 2^-12)."""
        alpha, sigma = self.coefficients(torch.as_tensor(t, dtype=torch.float64).reshape(-1))
        return sigma / alpha.clamp(min=ALPHA_FLOOR)

    @property
    def sigma_max(self) -> float:
        """k-diffusion sigma at t_max (the start of sampling)."""
        return float(self.ksigma(torch.tensor([self.t_max], dtype=torch.float64))[0])

    @property
    def sigma_min(self) -> float:
        """k-diffusion sigma at t_min (the last noise level training draws)."""
        return float(self.ksigma(torch.tensor([self.t_min], dtype=torch.float64))[0])

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) shaped (B, 1, ...) to broadcast against ``like``, in its float dtype and device."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        alpha, sigma = self.coefficients(t.detach().to(like.device, dtype).reshape(-1))
        return append_dims(alpha, like.ndim), append_dims(sigma, like.ndim)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) in closed form: x_t = alpha_t x0 + sigma_t noise."""
        if x0.shape != noise.shape or t.ndim != 1 or len(t) != len(x0):
            raise ValueError(
                f"add_noise wants x0 and noise of one shape (B, ...) and t of shape (B,), got "
                f"{tuple(x0.shape)}, {tuple(noise.shape)}, {tuple(t.shape)}"
            )
        alpha_t, sigma_t = self.alpha_sigma(t, x0)
        return (alpha_t * x0 + sigma_t * noise.to(x0.device)).to(x0.dtype)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2, float32 of shape (B,) on t's device (inf where sigma = 0)."""
        alpha, sigma = self.coefficients(t.detach().float().reshape(-1))
        return alpha**2 / sigma**2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, ksigma=[{self.sigma_min:.4g} .. {self.sigma_max:.4g}])"


class VEProcess(Process):
    """Variance exploding, EDM's parameterisation (Karras et al. 2022): alpha = 1, sigma = t in [sigma_min, sigma_max].

    Nets see c_noise = ln(sigma) / 4 (EDM Table 1); EDM's sigma_data belongs to its preconditioning
    (``objectives.py``), not to the process.
    """

    default_grid = "karras"

    def __init__(self, *, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.name, self.t_min, self.t_max = "ve", float(sigma_min), float(sigma_max)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _float(t)
        return torch.ones_like(t), t

    def from_ksigma(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.float64)
        return torch.ones_like(s), s

    def t_from_ksigma(self, s: Tensor) -> Tensor:
        return torch.as_tensor(s, dtype=torch.float64)

    def from_unit(self, u: Tensor) -> Tensor:
        """Log-uniform in sigma: sigma_min^(1 - u) sigma_max^u (Song et al. 2021's VE SDE time)."""
        return self.t_min * (self.t_max / self.t_min) ** u

    def to_unit(self, t: Tensor) -> Tensor:
        return (t / self.t_min).log() / math.log(self.t_max / self.t_min)

    def noise_level(self, t: Tensor) -> Tensor:
        return t.double().log().float() / 4  # c_noise (EDM)


class FlowProcess(Process):
    """Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023): alpha = 1 - t, sigma = t, t in [0, 1].

    Nets see ``time_scale * t`` (1000 t, as Stable Diffusion 3 and diffusers' flow schedulers). ``shift`` is
    SD3's resolution shift (Esser et al. 2024), applied by default to the sampling grid and to the
    logit-normal training distribution; ``num_timesteps`` sets the least noisy level t_min = 1 / num_timesteps
    (diffusers' FlowMatch schedulers).
    """

    default_grid = "uniform"

    def __init__(self, *, shift: float = 1.0, num_timesteps: int = 1000, time_scale: float = 1000.0) -> None:
        shift_time(torch.zeros(1), shift)  # validates
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        self.name, self.shift, self.time_scale = "rectified_flow", float(shift), float(time_scale)
        self.num_timesteps, self.t_min, self.t_max = num_timesteps, 1.0 / num_timesteps, 1.0

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _float(t)
        return 1 - t, t

    def from_ksigma(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.float64)
        return 1 / (1 + s), s / (1 + s)

    def t_from_ksigma(self, s: Tensor) -> Tensor:
        s = torch.as_tensor(s, dtype=torch.float64)
        return s / (1 + s)

    def from_unit(self, u: Tensor) -> Tensor:
        return u  # t itself: 0 = clean, 1 = pure noise

    def to_unit(self, t: Tensor) -> Tensor:
        return t

    def noise_level(self, t: Tensor) -> Tensor:
        return t.float() * self.time_scale


def register_process(name: str) -> Callable[[Callable[..., Process]], Callable[..., Process]]:
    """Register a process builder ``fn(**opts) -> Process`` under ``name``."""
    return PROCESSES.register(name)


@register_process("ve")
def ve(*, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Process:
    """EDM / VE (Karras et al. 2022): alpha = 1, sigma = t in [0.002, 80]."""
    return VEProcess(sigma_min=sigma_min, sigma_max=sigma_max)


@register_process("rectified_flow")
def rectified_flow(*, shift: float = 1.0, num_timesteps: int = 1000, time_scale: float = 1000.0) -> Process:
    """Rectified flow (Liu et al. 2023): alpha = 1 - t, sigma = t, with SD3's shift (Esser et al. 2024)."""
    return FlowProcess(shift=shift, num_timesteps=num_timesteps, time_scale=time_scale)


def get_process(name: str, **opts: Any) -> Process:
    """Build the registered process ``name``: a discrete VP process from its beta schedule (linear, cosine, ...;
    options ``num_timesteps``, ``rescale_zero_terminal_snr`` and the betas'), ve (EDM's variance-exploding
    process) or rectified_flow."""
    fn = PROCESSES.get(name)
    check_options(fn, opts, what=f"noise process {name!r}")
    return fn(**opts)


def is_integral(t: float) -> bool:
    """Whether a noise level is a whole number (a table entry of a discrete process)."""
    return math.isfinite(t) and float(t).is_integer()
