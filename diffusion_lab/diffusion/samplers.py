"""Samplers (DDPM, DDIM, Euler, Heun, DPM-Solver++, UniPC, ...), one registered function each.

Public use: ``sampler = get_sampler(name, steps=20, **opts)``, then
``x0 = sampler(model, x_T, schedule, prediction_type="eps", cond=..., uncond=..., guidance_scale=...,
generator=..., callback=..., progress=...)``; x_T ~ N(0, I), the result is float32.
Each registered function is ``fn(denoise, x, schedule, steps, *, <its options>)``: the ``Denoiser`` wraps
the net (classifier-free guidance, then (x0_hat, eps_hat)) and the run's generator, progress bar and callback. Sigma-space samplers keep the k-diffusion sample x = x_t / alpha_t and
call the net at x_t = x / sqrt(1 + sigma^2) (diffusers' ``scale_model_input``). Adding a sampler is one
decorated function here; its keyword-only arguments become its options.

Each sampler matches the diffusers scheduler named in its docstring to ~1e-5 (tests/test_samplers.py), except:
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import Model, classifier_free_guidance
from .parameterization import check_prediction_type, to_x0_eps
from .registry import Registry
from .schedules import NoiseSchedule, check_spacing
from .utils import keyword_options, randn_like

SAMPLERS = Registry("sampler")
Callback = Callable[[int, Tensor, Tensor], None]
_SHARED_OPTIONS = ("clip_x0",)  # options every sampler takes (handled by the Denoiser)


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]


def register_sampler(
    name: str, *, nfe: Callable[[int], int] = lambda steps: steps
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a sampler function under ``name``; ``nfe(steps)`` is its number of network evaluations."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        SAMPLERS.register(name)(_Spec(fn=fn, nfe=nfe))
        return fn

    return deco


class Denoiser:
    """What every sampler gets: the net as (x0_hat, eps_hat) (classifier-free guidance, then
    parameterization.py, in this one place), plus the run's noise source, progress bar and callback."""

    def __init__(
        self,
        model: Model,
        *,
        prediction_type: str = "eps",
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
        clip_x0: bool = False,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        name: str = "sampling",
    ) -> None:
        check_prediction_type(prediction_type)
        self.model, self.prediction_type, self.clip_x0 = model, prediction_type, clip_x0
        self.cond, self.uncond, self.guidance_scale = cond, uncond, guidance_scale
        self.generator, self.callback, self.show_progress, self.name = generator, callback, progress, name

    def __call__(self, x: Tensor, t: int | float, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at x_t = x with x_t = alpha x0 + sigma eps; t is int (LongTensor) or float."""
        dtype = torch.long if isinstance(t, int) else torch.float32
        t_batch = torch.full((len(x),), t, dtype=dtype, device=x.device)  # (B,)
        out = classifier_free_guidance(
            self.model, x, t_batch, cond=self.cond, uncond=self.uncond, guidance_scale=self.guidance_scale
        )
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        x0, eps = to_x0_eps(self.prediction_type, out.float(), x, alpha, sigma)
        if self.clip_x0:
            # eps_hat is recomputed from the clipped x0_hat so the pair stays consistent (guided-diffusion's
            # ddim_sample; diffusers' DDIM with use_clipped_model_output=True). Leaving eps as predicted
            # (diffusers' default) breaks DDIM under strong guidance: x0 and eps then disagree.
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - alpha * x0) / sigma
        return x0, eps

    def at_sigma(self, x: Tensor, sigma: float, t: float) -> Tensor:
        """x0_hat for the k-diffusion sample x = x_t / alpha_t at noise level sigma (Karras et al. 2022)."""
        alpha = _alpha(sigma)
        return self(x * alpha, t, alpha, sigma * alpha)[0]

    def noise_like(self, x: Tensor) -> Tensor:
        """Fresh N(0, I) noise from the run's generator (float32, drawn on the generator's device)."""
        return randn_like(x, self.generator)

    def progress(self, steps: int) -> Iterable[int]:
        """range(steps), under a tqdm bar when progress=True."""
        return tqdm(range(steps), desc=self.name, disable=not self.show_progress, leave=False)

    def report(self, i: int, x: Tensor, x0: Tensor) -> None:
        """Hand step i's sample x_t (VP scale) and its x0_hat to the user's callback, if any."""
        if self.callback is not None:
            self.callback(i, x, x0)


def _alpha(sigma: float) -> float:
    """VP alpha_t = 1 / sqrt(1 + sigma^2) for the k-diffusion sigma (sigma_t = sigma * alpha_t)."""
    return (1.0 + sigma**2) ** -0.5


def _sigma_grid(schedule: NoiseSchedule, steps: int, spacing: str) -> tuple[list[float], list[float]]:
    """Timesteps and sigmas (with a final 0) as diffusers' Euler / Heun ``set_timesteps``."""
    ts = schedule.inference_timesteps(steps, spacing, rounded=False)
    return ts.tolist(), schedule.sigma_at(ts).tolist() + [0.0]


def _init_sigma(sigma_max: float, spacing: str) -> float:
    """diffusers' ``init_noise_sigma`` for sigma-space schedulers (sqrt(sigma^2 + 1) for leading)."""
    return (sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max


def _solver_timesteps(schedule: NoiseSchedule, steps: int, spacing: str) -> list[int]:
    """Timesteps as diffusers' multistep solvers (DPM-Solver, UniPC): a grid of steps + 1 points, t = 0 dropped."""
    T = schedule.num_timesteps
    check_spacing(spacing)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1)))[::-1][:-1]
    else:
        ts = schedule.inference_timesteps(steps, "trailing").numpy()
    ts = [int(t) for t in ts]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(
            f"spacing {spacing!r} with steps={steps} repeats timesteps; use fewer steps or another spacing"
        )
    return ts


# ----------------------------------------------------------------------------------------------------------
# Samplers in VP space on integer timesteps


@register_sampler("ddpm")
def ddpm(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "leading"
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), posterior variance beta-tilde, skipped steps as diffusers."""
    ts, ab = schedule.inference_timesteps(steps, spacing).tolist(), schedule.alphas_cumprod.tolist()
    for i in denoise.progress(steps):
        ab_t, ab_prev = ab[ts[i]], (ab[ts[i + 1]] if i + 1 < steps else 1.0)
        beta_t = 1 - ab_t / ab_prev  # beta of the (possibly skipped) step t -> prev
        x0, _ = denoise(x, ts[i], ab_t**0.5, (1 - ab_t) ** 0.5)
        x = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        if i + 1 < steps:  # extra noise after every step except the last
            beta_tilde = max((1 - ab_prev) / (1 - ab_t) * beta_t, 1e-20)
            x = x + beta_tilde**0.5 * denoise.noise_like(x)
        denoise.report(i, x, x0)
    return x


@register_sampler("ddim")
def ddim(
    denoise: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    eta: float = 0.0,
    spacing: str = "leading",
    set_alpha_to_one: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 deterministic, eta = 1 ancestral; previous step = next listed one."""
    ts, ab = schedule.inference_timesteps(steps, spacing).tolist(), schedule.alphas_cumprod.tolist()
    final_ab = 1.0 if set_alpha_to_one else ab[0]
    for i in denoise.progress(steps):
        ab_t, ab_prev = ab[ts[i]], (ab[ts[i + 1]] if i + 1 < steps else final_ab)
        x0, eps = denoise(x, ts[i], ab_t**0.5, (1 - ab_t) ** 0.5)
        std = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5  # sigma_t(eta), eq. 16
        x = ab_prev**0.5 * x0 + max(1 - ab_prev - std**2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + std * denoise.noise_like(x)
        denoise.report(i, x, x0)
    return x


# ----------------------------------------------------------------------------------------------------------
# Samplers in k-diffusion sigma space (Karras et al. 2022), on possibly fractional timesteps


@register_sampler("euler")
def euler(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, Alg. 1, no churn)."""
    ts, sigmas = _sigma_grid(schedule, steps, spacing)
    x = x * _init_sigma(sigmas[0], spacing)
    for i in denoise.progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise.at_sigma(x, sigma, ts[i])
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        denoise.report(i, x * _alpha(sigma_next), x0)
    return x


@register_sampler("euler_ancestral")
def euler_ancestral(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1): Euler to sigma_down, then noise sigma_up."""
    ts, sigmas = _sigma_grid(schedule, steps, spacing)
    x = x * _init_sigma(sigmas[0], spacing)
    for i in denoise.progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x0 = denoise.at_sigma(x, sigma, ts[i])
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        x = x + sigma_up * denoise.noise_like(x)  # drawn every step (0 on the last), as diffusers
        denoise.report(i, x * _alpha(sigma_next), x0)
    return x


@register_sampler("heun", nfe=lambda steps: 2 * steps - 1)
def heun(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, no churn); Euler on the last step to sigma = 0."""
    ts, sigmas = _sigma_grid(schedule, steps, spacing)
    x = x * _init_sigma(sigmas[0], spacing)
    for i in denoise.progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise.at_sigma(x, sigma, ts[i])
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise.at_sigma(x_euler, sigma_next, ts[i + 1])) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        denoise.report(i, x * _alpha(sigma_next), x0)
    return x


# ----------------------------------------------------------------------------------------------------------
# Multistep exponential-integrator solvers in log-SNR time: lambda = log(alpha_t / sigma_t) = -log(sigma)


def _dpmpp_2m_data(x0: Tensor, x0_prev: Tensor | None, sigmas: list[float], i: int) -> Tensor:
    """DPM-Solver++(2M) data term D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (first order if no history)."""
    if x0_prev is None:
        return x0
    h = math.log(sigmas[i] / sigmas[i + 1])
    r = math.log(sigmas[i - 1] / sigmas[i]) / h
    return x0 + (x0 - x0_prev) / (2 * r)


@register_sampler("dpmpp_2m")
def dpmpp_2m(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; midpoint), first order on the first and the final step."""
    ts = _solver_timesteps(schedule, steps, spacing)
    sigmas = schedule.sigmas[ts].tolist() + [0.0]
    x0_prev = None
    for i in denoise.progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0, _ = denoise(x, ts[i], _alpha(sigma), sigma * _alpha(sigma))
        if sigma_next == 0:  # h = inf: the first-order step lands exactly on x0_hat
            x = x0
        else:
            h = math.log(sigma / sigma_next)  # lambda_next - lambda
            alpha_next = _alpha(sigma_next)
            ratio = sigma_next * alpha_next / (sigma * _alpha(sigma))  # sigma_t(next) / sigma_t
            x = ratio * x - alpha_next * math.expm1(-h) * _dpmpp_2m_data(x0, x0_prev, sigmas, i)
        x0_prev = x0
        denoise.report(i, x, x0)
    return x


@register_sampler("dpmpp_2m_sde")
def dpmpp_2m_sde(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers algorithm_type='sde-dpmsolver++', midpoint)."""
    ts = _solver_timesteps(schedule, steps, spacing)
    sigmas = schedule.sigmas[ts].tolist() + [0.0]
    x0_prev = None
    for i in denoise.progress(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0, _ = denoise(x, ts[i], _alpha(sigma), sigma * _alpha(sigma))
        noise = denoise.noise_like(x)  # drawn every step (unused on the last), as diffusers
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            alpha_next = _alpha(sigma_next)
            ratio = sigma_next * alpha_next / (sigma * _alpha(sigma))
            x = (
                ratio * math.exp(-h) * x
                - alpha_next * math.expm1(-2 * h) * _dpmpp_2m_data(x0, x0_prev, sigmas, i)
                + sigma_next * alpha_next * (-math.expm1(-2 * h)) ** 0.5 * noise
            )
        x0_prev = x0
        denoise.report(i, x, x0)
    return x


def _unipc_update(
    x: Tensor, m0: Tensor, m1: Tensor | None, m_next: Tensor | None, sigmas: list[float], j: int
) -> Tensor:
    """One UniPC-bh2 update from sigmas[j] to sigmas[j + 1] in data prediction (Zhao et al. 2023, Alg. 1-2).

    m0, m1: x0_hat at steps j and j - 1 (m1 None: order 1). m_next None: predictor UniP; else corrector UniC
    with m_next = x0_hat at the predicted sample. Coefficients rho solve the order conditions with B(h) = e^h - 1.
    """
    sigma, sigma_next = sigmas[j], sigmas[j + 1]
    if sigma_next == 0:  # h = inf: exact landing on x0_hat
        return m0
    alpha_next = _alpha(sigma_next)
    h = math.log(sigma / sigma_next)
    hh = -h
    h_phi_1 = math.expm1(hh)  # = B(h) for bh2
    x_next = (sigma_next * alpha_next) / (sigma * _alpha(sigma)) * x - alpha_next * h_phi_1 * m0
    if m1 is not None:
        r = math.log(sigma / sigmas[j - 1]) / h  # (lambda_{j-1} - lambda_j) / h < 0
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


@register_sampler("unipc")
def unipc(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int, *, spacing: str = "linspace"
) -> Tensor:
    """UniPC-2 (Zhao et al. 2023): UniP-2 predictor + UniC corrector (bh2), as diffusers UniPCMultistepScheduler."""
    ts = _solver_timesteps(schedule, steps, spacing)
    sigmas = schedule.sigmas[ts].tolist() + [0.0]
    history: list[Tensor] = []  # x0_hat at previous steps, newest last
    x_last, order_last = x, 1
    for i in denoise.progress(steps):
        sigma = sigmas[i]
        x0, _ = denoise(x, ts[i], _alpha(sigma), sigma * _alpha(sigma))
        if i > 0:  # UniC: correct the previous step with the fresh model output (no extra evaluation)
            m1 = history[-2] if order_last == 2 else None
            x = _unipc_update(x_last, history[-1], m1, x0, sigmas, i - 1)
        history = [*history[-1:], x0]
        order = min(2, steps - i, i + 1)  # warm-up and lower order at the final step
        x_last, order_last = x, order
        x = _unipc_update(x, x0, history[-2] if order == 2 else None, None, sigmas, i)
        denoise.report(i, x, x0)
    return x


# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A registered sampler bound to its step count and options; call it as ``sampler(model, x_T, schedule)``."""

    name: str
    steps: int
    opts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        valid = sampler_options(self.name)  # also rejects unknown names, listing the choices
        unknown = sorted(set(self.opts) - set(valid))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)} for sampler {self.name!r}; valid options: {', '.join(valid)}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if "spacing" in self.opts:
            check_spacing(self.opts["spacing"])
        if "eta" in self.opts and not self.opts["eta"] >= 0:
            raise ValueError(f"eta must be >= 0, got {self.opts['eta']}")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (a CFG evaluation is one batched forward, so it counts once)."""
        return SAMPLERS.get(self.name).nfe(self.steps)

    def __call__(
        self,
        model: Model,
        x_T: Tensor,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "eps",
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Denoise x_T ~ N(0, I) into x0 (float32). ``callback(i, x_t, x0_hat)`` runs after each step."""
        if self.steps > schedule.num_timesteps:
            raise ValueError(
                f"steps={self.steps} exceeds the schedule's num_timesteps={schedule.num_timesteps}"
            )
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise TypeError("x_T must be a floating-point tensor of shape (B, ...)")
        opts = dict(self.opts)
        denoise = Denoiser(
            model,
            prediction_type=prediction_type,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            clip_x0=opts.pop("clip_x0", False),
            generator=generator,
            callback=callback,
            progress=progress,
            name=self.name,
        )
        with torch.no_grad():
            x = SAMPLERS.get(self.name).fn(denoise, x_T.float(), schedule, self.steps, **opts)
        return x.float()


def sampler_options(name: str) -> list[str]:
    """The option names ``get_sampler(name, ...)`` accepts besides ``steps``."""
    return keyword_options(SAMPLERS.get(name).fn) + list(_SHARED_OPTIONS)


def get_sampler(name: str, *, steps: int = 50, **opts: Any) -> Sampler:
    """The registered sampler ``name`` with ``steps`` steps; unknown names or options fail listing the choices."""
    return Sampler(name=name, steps=steps, opts=opts)
