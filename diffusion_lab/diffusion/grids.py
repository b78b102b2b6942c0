"""Sampling grids: the noise levels a sampler visits, one registered function each, and the ``Grid`` they build.

A grid function is ``fn(process, steps, *, <options>) -> (t, ksigma)``: ``steps`` noise levels, descending, in
the process's units and as k-diffusion sigmas. ``make_grid`` appends the end point (clean: sigma = 0) and
records each point's (alpha, sigma). Grids:
- leading / trailing / linspace: diffusers' timestep spacings of the discrete VP schedules, in the flavour of
  the diffusers scheduler a sampler matches (``flavour``: ddim = rounded timesteps, euler = unrounded,
  multistep = DPM-Solver / UniPC's grid of steps + 1 points without t = 0).
- karras: Karras et al. 2022, eq. 5 (rho = 7) between the process's ksigma range.
- uniform: evenly spaced in the process's unit time (flow: t itself, from 1 to 1 / T), with SD3's shift.
- exponential: evenly spaced in log ksigma (k-diffusion ``get_sigmas_exponential``).
- even: ``steps`` equal steps of t from t_max to the clean end (flow: 1, 1 - 1/k, ..., 1/k, then 0): the k-step
  grid of the few-step samplers (MeanFlow, shortcut models), whose nets are trained for exactly those intervals.
Each grid has one starting convention (``register_grid(start=...)``), whatever the sampler: x_{t[0]} = x_T times
sigma(t[0]) ('sigma': k-diffusion's x_T * sigma_max in its coordinates, as EDM) on karras and exponential, times
sqrt(alpha^2 + sigma^2) ('unit': the std of x_t for unit-variance data, diffusers' DDIM) on the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .processes import Process, is_integral, shift_time
from .registry import Registry
from .utils import check_options

GRIDS = Registry("sampling grid")
SPACINGS = ("leading", "trailing", "linspace")  # the grids that are diffusers timestep spacings
STARTS = ("unit", "sigma")
_START: dict[str, str] = {}  # grid name -> its starting convention
FLAVOURS = ("ddim", "euler", "multistep")


@dataclass(frozen=True)
class Grid:
    """Noise levels t[0] > ... > t[steps] with (alpha, sigma), k-diffusion sigmas and the prior scale.

    ``alpha_k, sigma_k`` are the process's coefficients recomputed from ``ksigma`` (they differ from alpha,
    sigma only where alpha = 0, where ksigma is floored): samplers that work in k-diffusion sigma use them.
    ``prior``: sampling starts at x_{t[0]} = prior * x_T with x_T ~ N(0, I).
    """

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    ksigma: tuple[float, ...]
    alpha_k: tuple[float, ...]
    sigma_k: tuple[float, ...]
    prior: float

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def start(self, x_T: Tensor, space: str = "process") -> Tensor:
        """x at t[0] from unit noise x_T, in a sampler's coordinates: the process's x_t ('process'), the
        k-diffusion x_t / alpha ('k') or the flow y = x_t / (alpha + sigma) ('flow'); one float32 rounding."""
        scale = {
            "process": self.prior,
            "k": self.prior / self.alpha_k[0],
            "flow": self.prior / (self.alpha[0] + self.sigma[0]),
        }
        return x_T * scale[space]


def register_grid(name: str, *, start: str = "unit") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a grid function ``fn(process, steps, *, <options>) -> (t, ksigma)`` under ``name``; ``start``:
    its starting convention, 'unit' or 'sigma' (module docstring)."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    _START[name] = start
    return GRIDS.register(name)


def _discrete_only(process: Process, name: str) -> None:
    if not process.discrete:
        raise ValueError(
            f"grid {name!r} is a diffusers timestep spacing of the discrete VP schedules; process "
            f"{process.name!r} samples on karras, uniform or exponential"
        )


def _diffusers(process, steps: int, spacing: str, flavour: str) -> tuple[Tensor, Tensor]:
    _discrete_only(process, spacing)
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown diffusers flavour {flavour!r}; valid choices: {', '.join(FLAVOURS)}")
    if flavour == "multistep":
        t = _multistep_timesteps(process, steps, spacing)
    else:
        t = process.inference_timesteps(steps, spacing, rounded=flavour == "ddim").double()
    return t, process.sigma_at(t)


def _multistep_timesteps(process, steps: int, spacing: str) -> Tensor:
    """diffusers' DPM-Solver / UniPC timesteps: a grid of steps + 1 points with t = 0 dropped."""
    T = process.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T} (num_timesteps), got {steps!r}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1)))[::-1][:-1]
    else:
        ts = process.inference_timesteps(steps, "trailing").numpy()
    ts = [int(t) for t in ts]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(
            f"spacing {spacing!r} with steps={steps} repeats timesteps; use fewer steps or another spacing"
        )
    return torch.tensor(ts, dtype=torch.float64)


@register_grid("leading")
def leading(process: Process, steps: int, *, flavour: str = "ddim") -> tuple[Tensor, Tensor]:
    """diffusers' 'leading' spacing: t = [0, r, 2r, ..] with r = T // steps, descending."""
    return _diffusers(process, steps, "leading", flavour)


@register_grid("trailing")
def trailing(process: Process, steps: int, *, flavour: str = "ddim") -> tuple[Tensor, Tensor]:
    """diffusers' 'trailing' spacing (Lin et al. 2023, Table 2): t = round(T - i T / steps) - 1."""
    return _diffusers(process, steps, "trailing", flavour)


@register_grid("linspace")
def linspace(process: Process, steps: int, *, flavour: str = "ddim") -> tuple[Tensor, Tensor]:
    """diffusers' 'linspace' spacing: t = linspace(0, T - 1, steps), descending (rounded for ddim)."""
    return _diffusers(process, steps, "linspace", flavour)


def _ksigma_range(process: Process, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    lo = process.sigma_min if sigma_min is None else float(sigma_min)
    hi = process.sigma_max if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
    return lo, hi


@register_grid("karras", start="sigma")
def karras(
    process: Process,
    steps: int,
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Karras et al. 2022, eq. 5: (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    lo, hi = _ksigma_range(process, sigma_min, sigma_max)
    ramp = (
        torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    )
    ksigma = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return process.t_from_ksigma(ksigma), ksigma


@register_grid("exponential", start="sigma")
def exponential(
    process: Process, steps: int, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[Tensor, Tensor]:
    """Evenly spaced in log ksigma from sigma_max to sigma_min (k-diffusion's exponential schedule)."""
    lo, hi = _ksigma_range(process, sigma_min, sigma_max)
    ksigma = torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp()
    return process.t_from_ksigma(ksigma), ksigma


@register_grid("uniform")
def uniform(process: Process, steps: int, *, shift: float | None = None) -> tuple[Tensor, Tensor]:
    """Evenly spaced unit time from 1 to the process's t_min, shifted as SD3 (null: the process's shift, or 1),
    then ``process.from_unit``: flow t from 1 to 1 / T (diffusers' FlowMatch schedulers), VP t from T - 1 to 0."""
    u_end = float(process.to_unit(torch.tensor(float(process.t_min), dtype=torch.float64)))
    u = (
        torch.linspace(1.0, u_end, steps, dtype=torch.float64)
        if steps > 1
        else torch.ones(1, dtype=torch.float64)
    )
    u = shift_time(u, getattr(process, "shift", 1.0) if shift is None else shift)
    t = process.from_unit(u)
    return t, process.ksigma(t)


@register_grid("even")
def even(process: Process, steps: int) -> tuple[Tensor, Tensor]:
    """t_max (1 - i / steps), i = 0 .. steps - 1 (continuous processes): with the clean end, ``steps`` equal
    intervals of t, no shift."""
    if process.discrete:
        raise ValueError(f"grid 'even' is for continuous processes (rectified_flow, ve); got {process.name}")
    t = process.t_max * (1 - torch.arange(steps, dtype=torch.float64) / steps)
    return t, process.ksigma(t)


def grid_options(name: str) -> list[str]:
    """The user options of grid ``name`` (``flavour`` is set by the sampler, not the user)."""
    from .utils import keyword_options

    return keyword_options(GRIDS.get(name), skip=("flavour",))


def make_grid(
    process: Process,
    steps: int,
    name: str | None = None,
    *,
    flavour: str = "ddim",
    end: str = "clean",
    **opts: Any,
) -> Grid:
    """The ``Grid`` of ``steps`` steps on ``process``: grid ``name`` (None: the process's default; discrete
    processes have none, their samplers name a diffusers spacing). ``end``: 'clean' (sigma = 0) or 't_min'
    (diffusers' DDIM with set_alpha_to_one=False)."""
    name = name or process.default_grid
    if name is None:
        raise ValueError(f"process {process.name!r} has no default grid: name one ({', '.join(GRIDS)})")
    fn = GRIDS.get(name)
    check_options(fn, opts, what=f"grid {name!r}", skip=("flavour",))
    if name in SPACINGS:
        opts["flavour"] = flavour
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    t, ksigma = fn(process, steps, **opts)
    t, ksigma = t.double().reshape(-1).tolist(), ksigma.double().reshape(-1).tolist()
    if any(a <= b for a, b in zip(ksigma, ksigma[1:])):
        raise ValueError(f"grid {name!r} with steps={steps} does not decrease strictly: {ksigma}")
    if process.discrete:  # table entries stay integers: nets and diffusers see integer timesteps
        t = [int(v) if is_integral(v) else v for v in t]
    alpha, sigma = (v.tolist() for v in process.coefficients(torch.tensor(t, dtype=torch.float64)))
    if end == "clean":
        t_end, a_end, s_end, k_end = (-1 if process.discrete else 0.0), 1.0, 0.0, 0.0
    elif end == "t_min":
        a, s = process.coefficients(torch.tensor([process.t_min], dtype=torch.float64))
        t_end, a_end, s_end = process.t_min, float(a[0]), float(s[0])
        k_end = float(process.ksigma(torch.tensor([process.t_min], dtype=torch.float64))[0])
    else:
        raise ValueError(f"end must be 'clean' or 't_min', got {end!r}")
    ks = [*ksigma, k_end]
    a_k, s_k = process.from_ksigma(torch.tensor(ks, dtype=torch.float64))
    a_k, s_k = a_k.tolist(), s_k.tolist()
    if ks[-1] == 0:  # the clean end in k-diffusion space: alpha = 1 for every process
        a_k[-1], s_k[-1] = 1.0, 0.0
    scale = {"unit": math.hypot(alpha[0], sigma[0]), "sigma": sigma[0]}
    return Grid(
        t=(*t, t_end),
        alpha=(*alpha, a_end),
        sigma=(*sigma, s_end),
        ksigma=tuple(ks),
        alpha_k=tuple(a_k),
        sigma_k=tuple(s_k),
        prior=scale[_START[name]],
    )
