"""Discrete VP noise processes from beta schedules (linear, scaled_linear, cosine, sigmoid), registered as processes."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .grids import SPACINGS
from .processes import ALPHA_FLOOR, PROCESSES, Process
from .registry import Registry
from .utils import append_dims, check_options

BETA_SCHEDULES = Registry("beta schedule")

# alpha-bar used in sigma space where the true alpha-bar is 0 (zero terminal SNR), as diffusers does.
ZERO_SNR_ALPHA_BAR = ALPHA_FLOOR**2


def register_betas(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a beta schedule ``fn(num_timesteps, *, <options>) -> betas`` and the process ``name`` built from it."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        BETA_SCHEDULES.register(name)(fn)

        def build(**opts: Any) -> DiscreteProcess:
            return discrete_process(name, **opts)

        kw = inspect.Parameter.KEYWORD_ONLY
        own = [
            inspect.Parameter(k, kw, default=v)
            for k, v in (("num_timesteps", 1000), ("rescale_zero_terminal_snr", False))
        ]
        betas = [p for p in inspect.signature(fn).parameters.values() if p.kind is kw]
        build.__signature__ = inspect.Signature([*betas, *own])  # the options get_process checks
        build.__doc__ = fn.__doc__
        PROCESSES.register(name)(build)
        return fn

    return deco


@register_betas("linear")
def linear(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas (Ho et al. 2020, DDPM)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


@register_betas("scaled_linear")
def scaled_linear(num_timesteps: int, *, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Betas linear in sqrt space (Rombach et al. 2022, Stable Diffusion; diffusers 'scaled_linear')."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


@register_betas("cosine")
def cosine(num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine alpha-bar (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta (diffusers 'squaredcos_cap_v2')."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@register_betas("sigmoid")
def sigmoid(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Sigmoid betas over [-6, 6] (Xu et al. 2022, GeoDiff; diffusers 'sigmoid')."""
    x = torch.linspace(-6, 6, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def rescale_to_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the terminal SNR is exactly zero (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    sqrt_ab_0, sqrt_ab_T = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - sqrt_ab_T) * sqrt_ab_0 / (sqrt_ab_0 - sqrt_ab_T)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class DiscreteProcess(Process):
    """A discrete VP noise process: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), t = 0..T-1.

    Tables are float64 on the CPU; ``table(...)`` casts and moves them on demand (cached per device/dtype).
    Training and ``add_noise`` take integer t; samplers may visit fractional t, where the k-diffusion sigma is
    interpolated linearly in t (``sigma_at``, as diffusers' Euler schedulers) and alpha^2 + sigma^2 = 1.
    """

    discrete = True
    default_grid = None  # each sampler's diffusers timestep spacing (see samplers.py)

    def __init__(self, *, name: str, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min():.3g} and max {betas.max():.3g}")
        self.name = name
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ab_t, (T,)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()  # alpha_t
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()  # sigma_t
        self.snrs = self.alphas_cumprod / (1 - self.alphas_cumprod)  # alpha_t^2 / sigma_t^2
        # k-diffusion sigma = sigma_t / alpha_t; finite at zero terminal SNR (ab clamped like diffusers).
        ab = torch.where(self.alphas_cumprod > 0, self.alphas_cumprod, ZERO_SNR_ALPHA_BAR)
        self.sigmas = ((1 - ab) / ab).sqrt()
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self.t_min, self.t_max = 0, self.num_timesteps - 1

    def __repr__(self) -> str:
        ab = self.alphas_cumprod
        return f"DiscreteProcess(name={self.name!r}, num_timesteps={self.num_timesteps}, ab=[{ab[0]:.4g} .. {ab[-1]:.4g}])"

    def table(self, name: str, *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """The attribute ``name`` (e.g. 'sqrt_alphas_cumprod') cast to ``dtype`` on ``device``, cached."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(dtype).to(device)  # cast on CPU: MPS has no float64
        return self._cache[key]

    def _gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must hold integer timesteps (LongTensor), got dtype {t.dtype}")
        dtype = torch.promote_types(like.dtype, torch.float32)
        values = self.table(name, device=like.device, dtype=dtype)[t.to(like.device)]
        return append_dims(values.reshape(len(t)), like.ndim)

    def alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) = (sqrt(ab_t), sqrt(1 - ab_t)) at integer t, shaped (B, 1, ...) like ``x``.

        ``add_noise`` (inherited: x_t = alpha_t x0 + sigma_t noise, Ho et al. 2020, eq. 4) goes through here,
        so it too takes integer timesteps only."""
        return self._gather("sqrt_alphas_cumprod", t, x), self._gather("sqrt_one_minus_alphas_cumprod", t, x)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) at integer timesteps, float32 of shape (B,) on t's device."""
        if t.is_floating_point():
            raise TypeError(f"t must hold integer timesteps (LongTensor), got dtype {t.dtype}")
        return self.table("snrs", device=t.device, dtype=torch.float32)[t]

    # ------------------------------------------------------------------ the Process contract
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) in float64: table entries at integer t, from the interpolated ksigma between them."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1)
        idx = t.round().long().clamp(0, self.num_timesteps - 1)
        on_table = t == idx
        alpha, sigma = self.from_ksigma(self.sigma_at(t))
        alpha = torch.where(on_table, self.sqrt_alphas_cumprod[idx], alpha)
        sigma = torch.where(on_table, self.sqrt_one_minus_alphas_cumprod[idx], sigma)
        return alpha, sigma

    def ksigma(self, t: Tensor) -> Tensor:
        return self.sigma_at(torch.as_tensor(t, dtype=torch.float64).reshape(-1))

    def from_ksigma(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.float64)
        alpha = (1 + s**2).rsqrt()
        return alpha, s * alpha

    def t_from_ksigma(self, s: Tensor) -> Tensor:
        """The inverse of ``sigma_at``: piecewise-linear in t, clamped to [0, T - 1]."""
        s = torch.as_tensor(s, dtype=torch.float64).cpu()
        t = np.interp(s.numpy(), self.sigmas.numpy(), np.arange(self.num_timesteps, dtype=np.float64))
        return torch.from_numpy(np.asarray(t, dtype=np.float64)).reshape(s.shape)

    def sigma_at(self, t: Tensor) -> Tensor:
        """k-diffusion sigma at (possibly fractional) timesteps, linear interpolation as numpy.interp (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_timesteps - 1)
        w = t - low
        return (1 - w) * self.sigmas[low] + w * self.sigmas[high]

    def inference_timesteps(self, steps: int, spacing: str = "leading", *, rounded: bool = True) -> Tensor:
        """Descending sampling timesteps as diffusers' ``set_timesteps`` (steps_offset=0).

        leading: [0, r, 2r, ..] with r = T // steps; trailing: round(T - i T / steps) - 1; linspace:
        round(linspace(0, T-1, steps)). ``rounded=False`` keeps the unrounded linspace values (float64),
        as diffusers' Euler / Heun schedulers do; with rounded=True the result is a LongTensor.
        """
        T = self.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1..{T} (num_timesteps), got {steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid choices: {', '.join(SPACINGS)}")
        if spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps))[::-1].astype(np.float64)
        elif spacing == "trailing":
            # exact rationals (round half to even, as numpy): diffusers' float arange can yield steps+1 values
            ts = np.array(
                [round(Fraction(T * (steps - i), steps)) - 1 for i in range(steps)], dtype=np.float64
            )
        elif rounded:
            ts = np.linspace(0, T - 1, steps).round()[::-1]
        else:
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
        ts = torch.from_numpy(ts.copy())
        return ts.long() if rounded else ts


def discrete_process(
    name: str, *, num_timesteps: int = 1000, rescale_zero_terminal_snr: bool = False, **opts: float
) -> DiscreteProcess:
    """The discrete VP process of beta schedule ``name`` with ``num_timesteps`` steps (``get_process`` calls it).

    rescale_zero_terminal_snr: rescale to zero terminal SNR (Lin et al. 2023); use v or x0 prediction with it.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    fn = BETA_SCHEDULES.get(name)
    check_options(fn, opts, what=f"beta schedule {name!r}")
    betas = fn(num_timesteps, **opts)
    if rescale_zero_terminal_snr:
        if num_timesteps < 2:
            raise ValueError("rescale_zero_terminal_snr needs num_timesteps >= 2")
        betas = rescale_to_zero_terminal_snr(betas)
    return DiscreteProcess(name=name, betas=betas)
