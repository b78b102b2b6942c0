"""Samplers (DDPM, DDIM, Euler, Heun, EDM, DPM-Solver++, UniPC, flow Euler / Heun): pure functions over a grid.

Public use: ``sampler = get_sampler(name, steps=20, grid=None, **opts)``, then
``x0 = sampler(model, x_T, process, objective=..., cond=..., uncond=..., guidance=Guidance(...), clip_x0=...,
generator=..., callback=..., progress=...)``; x_T ~ N(0, I), the result is float32. ``process`` is any noise
process (a discrete VP schedule, ve, rectified_flow) and ``objective`` an objective name or an ``Objective``.

Each registered function is ``fn(denoise, x_T, grid, *, <its options>) -> x``: it starts from
``grid.start(x_T, space)`` and returns the process-scale x at the grid's end (x0 for the clean end); ``denoise``
(guidance.py) gives (x0_hat, eps_hat). Every sampler runs on every process and grid, in one of three coordinate systems:
- process space x_t with the grid's (alpha, sigma): ddpm, ddim (exact where alpha = 0);
- k-diffusion space x / alpha at ksigma = sigma / alpha (Karras et al. 2022): euler, euler_ancestral, heun, edm,
  and the exponential integrators dpmpp_2m, dpmpp_2m_sde, unipc in log-SNR time lambda = -log ksigma;
- flow space y = x / (alpha + sigma) at tau = sigma / (alpha + sigma), where every process is the rectified
  flow y = (1 - tau) x0 + tau eps: flow_euler, flow_heun (exact where alpha = 0, e.g. flow's t = 1).
Adding a sampler is one decorated function here (its keyword-only arguments are its options) and one YAML.

The grid: ``grid=`` names one (``grids.py``: karras, uniform, exponential, leading, trailing, linspace) with its
options as a dict (``grid={"name": "karras", "rho": 7}``); by default the process's own (edm: karras, flow:
uniform) or, on the discrete VP schedules, the sampler's diffusers spacing (leading / trailing / linspace) in the
flavour of the diffusers scheduler it matches; where a grid starts is the grid's (``grids.py``), not the sampler's.
Each sampler matches the diffusers scheduler named in its docstring to ~1e-5 (tests/test_samplers.py,
tests/test_formulations.py; started where the grid starts), and euler / heun / dpmpp_2m on the Karras grid match
k-diffusion to ~1e-6 (tests/test_k_diffusion.py), except:
- ddim steps to the next listed timestep; diffusers uses t - T // steps, which differs for trailing / linspace
  spacing when steps does not divide T (there diffusers' last step does not land on x0_hat).
- trailing timesteps are computed exactly; diffusers' float arange can emit steps + 1 of them, ending at -1.
- schedule tables are float64 (diffusers: float32), so cosine / zero-terminal-SNR runs agree to ~2e-5.
- clip_x0 is off by default (diffusers' DDPM / DDIM default clip_sample=True); with it, eps_hat is recomputed from
  the clipped x0_hat (diffusers' DDIM use_clipped_model_output=True). x0 prediction also works with
  euler_ancestral; the multistep solvers raise on repeated timesteps instead of dividing by zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grids import GRIDS, Grid, make_grid
from .guidance import Denoiser, Model
from .processes import Process
from .registry import Registry
from .utils import check_options, keyword_options

SAMPLERS = Registry("sampler")
_SHARED_OPTIONS = ("grid",)  # options every sampler takes
_GONE = {  # former options, and what to use now
    "spacing": "the grid option, e.g. grid='trailing'",
    "clip_x0": "a call argument, sampler(..., clip_x0=True), that systems set from their data space",
}


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    discrete_grid: str  # its grid on discrete processes: a diffusers spacing (grids.SPACINGS)
    flavour: str  # how diffusers' scheduler it matches lays out that spacing (grids.FLAVOURS)
    grid: str | None  # a grid of its own (edm: karras) instead of the process's default
    grid_options: tuple[str, ...]  # flat options that shape the grid (set_alpha_to_one)
    formulation: str | None = None  # a few-step sampler's formulation: it samples only its nets


def register_sampler(
    name: str,
    *,
    nfe: Callable[[int], int] = lambda steps: steps,
    discrete_grid: str = "linspace",
    flavour: str = "euler",
    grid: str | None = None,
    grid_options: Sequence[str] = (),
    formulation: str | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a sampler function under ``name``; ``nfe(steps)`` is its number of network evaluations;
    ``formulation``: the few-step formulation whose nets it alone samples (None: any denoiser)."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        spec = _Spec(fn, nfe, discrete_grid, flavour, grid, tuple(grid_options), formulation)
        SAMPLERS.register(name)(spec)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------------
# Process space: the DDIM family, exact where alpha = 0 (zero terminal SNR)


def _ddim_step(x0: Tensor, eps: Tensor, grid: Grid, i: int, eta: float) -> tuple[Tensor, float]:
    """DDIM's x_{t'} mean and noise std for any process (Song et al. 2021, eq. 12 and 16 with (alpha, sigma)):
    mean = alpha' x0 + sqrt(sigma'^2 - s^2) eps, s = eta sigma' sqrt(1 - (sigma' alpha / (alpha' sigma))^2)."""
    alpha, sigma, alpha_next, sigma_next = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
    ratio = sigma_next * alpha / (alpha_next * sigma)
    std = eta * sigma_next * max(1 - ratio**2, 0.0) ** 0.5
    return alpha_next * x0 + max(sigma_next**2 - std**2, 0.0) ** 0.5 * eps, std


@register_sampler("ddpm", discrete_grid="leading", flavour="ddim")
def ddpm(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): the posterior q(x_t' | x_t, x0_hat) with variance
    beta-tilde (= DDIM with eta = 1), skipped steps as diffusers' DDPMScheduler, no noise on the last step."""
    x = grid.start(x)
    for i in denoise.progress(grid.steps):
        x0, eps = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        x, std = _ddim_step(x0, eps, grid, i, eta=1.0)
        if i + 1 < grid.steps:  # extra noise after every step except the last
            x = x + max(std, 1e-10) * denoise.noise_like(x)
        denoise.report(i, x, x0)
    return x


@register_sampler("ddim", discrete_grid="leading", flavour="ddim", grid_options=("set_alpha_to_one",))
def ddim(denoise: Denoiser, x: Tensor, grid: Grid, *, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 deterministic, eta = 1 ancestral; as diffusers' DDIMScheduler."""
    x = grid.start(x)
    for i in denoise.progress(grid.steps):
        x0, eps = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        x, std = _ddim_step(x0, eps, grid, i, eta)
        if eta > 0:
            x = x + std * denoise.noise_like(x)
        denoise.report(i, x, x0)
    return x


# ----------------------------------------------------------------------------------------------------------
# k-diffusion space (Karras et al. 2022): x / alpha at k-diffusion sigma


@register_sampler("euler")
def euler(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, Alg. 1, no churn);
    as diffusers' EulerDiscreteScheduler (and EDMEulerScheduler on edm)."""
    ks = grid.ksigma
    x = grid.start(x, "k")
    for i in denoise.progress(grid.steps):
        x0 = denoise.at_ksigma(x, ks[i], grid.t[i])
        x = x + (x - x0) / ks[i] * (ks[i + 1] - ks[i])
        denoise.report(i, x * grid.alpha_k[i + 1], x0)
    return x * grid.alpha_k[-1]


@register_sampler("euler_ancestral")
def euler_ancestral(denoise: Denoiser, x: Tensor, grid: Grid, *, eta: float = 1.0) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral): Euler to sigma_down, then fresh noise of std
    sigma_up; as diffusers' EulerAncestralDiscreteScheduler at eta = 1."""
    ks = grid.ksigma
    x = grid.start(x, "k")
    for i in denoise.progress(grid.steps):
        sigma, sigma_next = ks[i], ks[i + 1]
        sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x0 = denoise.at_ksigma(x, sigma, grid.t[i])
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        x = x + sigma_up * denoise.noise_like(x)  # drawn every step (0 on the last), as diffusers
        denoise.report(i, x * grid.alpha_k[i + 1], x0)
    return x * grid.alpha_k[-1]


@register_sampler("edm", nfe=lambda steps: 2 * steps - 1, grid="karras")
def edm(
    denoise: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2; NVlabs/edm ``edm_sampler``), by default on the rho = 7
    grid: raise sigma by gamma with fresh noise (churn: S_churn, S_tmin, S_tmax, S_noise), then a Heun step; Euler
    on the last step to sigma = 0. No churn: Alg. 1. 18 steps = 35 NFE is the paper's CIFAR-10 setting."""
    ks = grid.ksigma
    x = grid.start(x, "k")
    for i in denoise.progress(grid.steps):
        sigma, sigma_next = ks[i], ks[i + 1]
        gamma = min(s_churn / grid.steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat, t_hat = sigma * (1 + gamma), (grid.t[i] if gamma == 0 else None)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigma**2) ** 0.5 * s_noise * denoise.noise_like(x)
        x0 = denoise.at_ksigma(x, sigma_hat, t_hat)
        d = (x - x0) / sigma_hat
        x_next = x + d * (sigma_next - sigma_hat)
        if sigma_next > 0:  # 2nd order correction
            d_next = (x_next - denoise.at_ksigma(x_next, sigma_next, grid.t[i + 1])) / sigma_next
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
        x = x_next
        denoise.report(i, x * grid.alpha_k[i + 1], x0)
    return x * grid.alpha_k[-1]


@register_sampler("heun", nfe=lambda steps: 2 * steps - 1)
def heun(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); as diffusers' HeunDiscreteScheduler."""
    return edm(denoise, x, grid)


# ----------------------------------------------------------------------------------------------------------
# Multistep exponential integrators in log-SNR time lambda = -log ksigma, on the process's (alpha_k, sigma_k)


def _dpmpp_2m_data(x0: Tensor, x0_prev: Tensor | None, ks: Sequence[float], i: int) -> Tensor:
    """DPM-Solver++(2M) data term D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (first order if no history)."""
    if x0_prev is None:
        return x0
    h = math.log(ks[i] / ks[i + 1])
    r = math.log(ks[i - 1] / ks[i]) / h
    return x0 + (x0 - x0_prev) / (2 * r)


def _k_denoise(denoise: Denoiser, x: Tensor, grid: Grid, i: int) -> Tensor:
    """x0_hat at grid point i for x in the process's scale, read with (alpha_k, sigma_k)."""
    return denoise(x, grid.t[i], grid.alpha_k[i], grid.sigma_k[i])[0]


@register_sampler("dpmpp_2m", flavour="multistep")
def dpmpp_2m(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; midpoint), first order on the first and the final step; as
    diffusers' DPMSolverMultistepScheduler (EDMDPMSolverMultistepScheduler on edm)."""
    ks, a_k, s_k = grid.ksigma, grid.alpha_k, grid.sigma_k
    x, x0_prev = grid.start(x), None
    for i in denoise.progress(grid.steps):
        x0 = _k_denoise(denoise, x, grid, i)
        if ks[i + 1] == 0:  # h = inf: the first-order step lands exactly on x0_hat
            x = x0
        else:
            h = math.log(ks[i] / ks[i + 1])  # lambda_next - lambda
            x = s_k[i + 1] / s_k[i] * x - a_k[i + 1] * math.expm1(-h) * _dpmpp_2m_data(x0, x0_prev, ks, i)
        x0_prev = x0
        denoise.report(i, x, x0)
    return x


@register_sampler("dpmpp_2m_sde", flavour="multistep")
def dpmpp_2m_sde(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers algorithm_type='sde-dpmsolver++', midpoint)."""
    ks, a_k, s_k = grid.ksigma, grid.alpha_k, grid.sigma_k
    x, x0_prev = grid.start(x), None
    for i in denoise.progress(grid.steps):
        x0 = _k_denoise(denoise, x, grid, i)
        noise = denoise.noise_like(x)  # drawn every step (unused on the last), as diffusers
        if ks[i + 1] == 0:
            x = x0
        else:
            h = math.log(ks[i] / ks[i + 1])
            x = (
                s_k[i + 1] / s_k[i] * math.exp(-h) * x
                - a_k[i + 1] * math.expm1(-2 * h) * _dpmpp_2m_data(x0, x0_prev, ks, i)
                + s_k[i + 1] * (-math.expm1(-2 * h)) ** 0.5 * noise
            )
        x0_prev = x0
        denoise.report(i, x, x0)
    return x


def _unipc_update(
    x: Tensor, m0: Tensor, m1: Tensor | None, m_next: Tensor | None, grid: Grid, j: int
) -> Tensor:
    """One UniPC-bh2 update from grid point j to j + 1 in data prediction (Zhao et al. 2023, Alg. 1-2).

    m0, m1: x0_hat at steps j and j - 1 (m1 None: order 1). m_next None: predictor UniP; else corrector UniC
    with m_next = x0_hat at the predicted sample. Coefficients rho solve the order conditions with B(h) = e^h - 1.
    """
    ks = grid.ksigma
    if ks[j + 1] == 0:  # h = inf: exact landing on x0_hat
        return m0
    alpha_next = grid.alpha_k[j + 1]
    h = math.log(ks[j] / ks[j + 1])
    hh = -h
    h_phi_1 = math.expm1(hh)  # = B(h) for bh2
    x_next = grid.sigma_k[j + 1] / grid.sigma_k[j] * x - alpha_next * h_phi_1 * m0
    if m1 is not None:
        r = math.log(ks[j] / ks[j - 1]) / h  # (lambda_{j-1} - lambda_j) / h < 0
        d1 = (m1 - m0) / r
    if m_next is None:  # predictor: rho_p = 1/2 for order 2
        return x_next if m1 is None else x_next - alpha_next * h_phi_1 * 0.5 * d1
    if m1 is None:  # corrector of order 1: rho_c = 1/2
        return x_next - alpha_next * h_phi_1 * 0.5 * (m_next - m0)
    b1 = (h_phi_1 / hh - 1) / h_phi_1
    b2 = ((h_phi_1 / hh - 1) / hh - 0.5) * 2 / h_phi_1
    rho_0 = (b1 - b2) / (1 - r)  # solve [[1, 1], [r, 1]] rho = [b1, b2]
    rho_1 = b1 - rho_0
    return x_next - alpha_next * h_phi_1 * (rho_0 * d1 + rho_1 * (m_next - m0))


@register_sampler("unipc", flavour="multistep")
def unipc(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """UniPC-2 (Zhao et al. 2023): UniP-2 predictor + UniC corrector (bh2), as diffusers UniPCMultistepScheduler."""
    history: list[Tensor] = []  # x0_hat at previous steps, newest last
    x = grid.start(x)
    x_last, order_last = x, 1
    for i in denoise.progress(grid.steps):
        x0 = _k_denoise(denoise, x, grid, i)
        if i > 0:  # UniC: correct the previous step with the fresh model output (no extra evaluation)
            m1 = history[-2] if order_last == 2 else None
            x = _unipc_update(x_last, history[-1], m1, x0, grid, i - 1)
        history = [*history[-1:], x0]
        order = min(2, grid.steps - i, i + 1)  # warm-up and lower order at the final step
        x_last, order_last = x, order
        x = _unipc_update(x, x0, history[-2] if order == 2 else None, None, grid, i)
        denoise.report(i, x, x0)
    return x


# ----------------------------------------------------------------------------------------------------------
# Flow space: y = x / (alpha + sigma) at tau = sigma / (alpha + sigma), the rectified flow of every process


def _flow_velocity(denoise: Denoiser, y: Tensor, grid: Grid, i: int) -> tuple[Tensor, Tensor]:
    """(u, x0_hat) at grid point i: u = (y - x0_hat) / tau = eps_hat - x0_hat, the flow-matching velocity."""
    a, s = grid.alpha[i], grid.sigma[i]
    x0 = denoise(y * (a + s), grid.t[i], a, s)[0]
    return (y - x0) / (s / (a + s)), x0


def _tau(grid: Grid, i: int) -> float:
    return grid.sigma[i] / (grid.alpha[i] + grid.sigma[i])


@register_sampler("flow_euler", discrete_grid="trailing", flavour="ddim")
def flow_euler(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """Euler on the flow ODE dy/dtau = u (Liu et al. 2023; Lipman et al. 2023); as diffusers'
    FlowMatchEulerDiscreteScheduler on the flow process."""
    y = grid.start(x, "flow")
    for i in denoise.progress(grid.steps):
        u, x0 = _flow_velocity(denoise, y, grid, i)
        y = y + (_tau(grid, i + 1) - _tau(grid, i)) * u
        denoise.report(i, y * (grid.alpha[i + 1] + grid.sigma[i + 1]), x0)
    return y * (grid.alpha[-1] + grid.sigma[-1])


@register_sampler("flow_heun", nfe=lambda steps: 2 * steps - 1, discrete_grid="trailing", flavour="ddim")
def flow_heun(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """Heun on the flow ODE dy/dtau = u, Euler on the last step to tau = 0 (SiT, Ma et al. 2024); as diffusers'
    FlowMatchHeunDiscreteScheduler on the flow process."""
    y = grid.start(x, "flow")
    for i in denoise.progress(grid.steps):
        u, x0 = _flow_velocity(denoise, y, grid, i)
        dt = _tau(grid, i + 1) - _tau(grid, i)
        y_next = y + dt * u
        if grid.sigma[i + 1] > 0:
            u_next, _ = _flow_velocity(denoise, y_next, grid, i + 1)
            y_next = y + dt * (u + u_next) / 2
        y = y_next
        denoise.report(i, y * (grid.alpha[i + 1] + grid.sigma[i + 1]), x0)
    return y * (grid.alpha[-1] + grid.sigma[-1])


# ----------------------------------------------------------------------------------------------------------


def _grid_spec(grid: str | dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """(name, options) of a ``grid`` option: None, a name, or a dict {name: ..., <options>}."""
    if grid is None or isinstance(grid, str):
        return grid, {}
    opts = dict(grid)
    name = opts.pop("name", None)
    return name, opts


@dataclass(frozen=True)
class Sampler:
    """A registered sampler bound to its step count and options; call it as ``sampler(model, x_T, process)``."""

    name: str
    steps: int
    opts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in set(_GONE) & set(self.opts):
            raise TypeError(f"{key} is no longer a sampler option: it is {_GONE[key]}")
        valid = sampler_options(self.name)  # also rejects unknown names, listing the choices
        unknown = sorted(set(self.opts) - set(valid))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)} for sampler {self.name!r}; valid options: {', '.join(valid)}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if "eta" in self.opts and not self.opts["eta"] >= 0:
            raise ValueError(f"eta must be >= 0, got {self.opts['eta']}")
        name, grid_opts = _grid_spec(self.opts.get("grid"))
        if name is not None:
            check_options(GRIDS.get(name), grid_opts, what=f"grid {name!r}", skip=("flavour",))

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (a CFG evaluation is one batched forward, so it counts once)."""
        return SAMPLERS.get(self.name).nfe(self.steps)

    def grid(self, process: Process) -> Grid:
        """The noise levels this sampler visits on ``process``: the ``grid`` option, else the sampler's own (edm:
        karras), else the process's default (discrete processes: the sampler's diffusers spacing)."""
        spec = SAMPLERS.get(self.name)
        name, grid_opts = _grid_spec(self.opts.get("grid"))
        name = name or spec.grid or process.default_grid or spec.discrete_grid
        end = "clean" if self.opts.get("set_alpha_to_one", True) else "t_min"
        return make_grid(process, self.steps, name, flavour=spec.flavour, end=end, **grid_opts)

    def __call__(self, model: Model, x_T: Tensor, process: Process, **denoiser: Any) -> Tensor:
        """Denoise x_T ~ N(0, I) into x0 (float32). ``denoiser``: the Denoiser's keyword arguments: ``objective``,
        ``cond``, ``uncond``, ``guidance``, ``clip_x0`` (clip x0_hat to [-1, 1]: pixel data), ``generator``,
        ``callback`` (``callback(i, x_t, x0_hat)`` runs after each step) and ``progress``."""
        if process.discrete and self.steps > process.num_timesteps:
            raise ValueError(
                f"steps={self.steps} exceeds the schedule's num_timesteps={process.num_timesteps}"
            )
        if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise TypeError("x_T must be a floating-point tensor of shape (B, ...)")
        opts = {k: v for k, v in self.opts.items() if k not in (*_SHARED_OPTIONS, *self._grid_options)}
        denoise = Denoiser(model, process=process, name=self.name, **denoiser)
        grid = self.grid(process)
        with torch.no_grad():
            x = SAMPLERS.get(self.name).fn(denoise, x_T.float(), grid, **opts)
        return x.float()

    @property
    def _grid_options(self) -> tuple[str, ...]:
        return SAMPLERS.get(self.name).grid_options


def denoiser_samplers() -> list[str]:
    """The samplers that run any denoiser on any process (every one but the few-step formulations' own)."""
    return [name for name in SAMPLERS if SAMPLERS.get(name).formulation is None]


def sampler_options(name: str) -> list[str]:
    """The option names ``get_sampler(name, ...)`` accepts besides ``steps``."""
    spec = SAMPLERS.get(name)
    return keyword_options(spec.fn) + list(spec.grid_options) + list(_SHARED_OPTIONS)


def get_sampler(name: str, *, steps: int = 50, **opts: Any) -> Sampler:
    """The registered sampler ``name`` with ``steps`` steps; unknown names or options fail listing the choices.

    ``grid``: a grid name or {name: ..., <options>} (``grids.py``; on discrete processes e.g. 'trailing')."""
    return Sampler(name=name, steps=steps, opts=opts)
