"""Consistency training (Song et al. 2023; iCT, Song & Dhariwal 2023; ECT, Geng et al. 2024) and its multistep sampler.

In k-diffusion coordinates x = x0 + s eps (s = sigma / alpha) the consistency function is
f(x, s) = c_skip(s) x + c_out(s) F(c_in x, c_noise) with the boundary condition f(x, s_min) = x:
c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(s^2 + sd^2) (iCT, sec. 3; c_in and
c_noise = ln(s) / 4 as EDM, so a net trained with formulation=edm is a start for ECT).
Training pairs two noise levels s' < s on ONE noise direction: the loss is d(f(x0 + s eps, s), sg(f(x0 + s' eps,
s'))) with the stop-gradient target from the same net (no EMA teacher, iCT sec. 3.2):
- iCT: s', s adjacent on a Karras grid of N(k) points, N doubling over the run (the curriculum, iCT eq. 8), the
  pair's index drawn from the discretised log-normal (iCT eq. 10), weight 1 / (s - s'), pseudo-Huber distance
  sqrt(|x - y|^2 + c^2) - c with c = 0.00054 sqrt(dim) (iCT sec. 3.3).
- ECT: s ~ log-normal, s' = s (1 - q^-(stage + 1) (1 + k sigmoid(-b s))) clamped at 0 (target x0 there), stage
  growing over the run, weight (s^2 + sd^2) / (s sd)^2, the same pseudo-Huber distance (locuslab/ect ``ECMLoss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .grids import Grid, karras, register_grid
from .guidance import Denoiser
from .objectives import EDM, LossInputs, Scalar, _sqrt, register_objective
from .processes import Process
from .samplers import register_sampler
from .utils import append_dims

SCHEDULES = ("ict", "ect")


def consistency_scalings(s: Tensor, *, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a consistency model at k-diffusion sigma s (iCT sec. 3): f(x, s_min) = x."""
    sd2 = sigma_data**2
    c_skip = sd2 / ((s - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (s - sigma_min) / (s * s + sd2) ** 0.5
    return c_skip, c_out


def ict_discretisation(step: int, total_steps: int, *, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)) (eq. 8)."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def karras_sigmas(n: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n Karras sigmas, ascending: (s_min^(1/rho) + i / (n - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def lognormal_pair_probs(sigmas: Tensor, *, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """p(i) of the pair (sigma_i, sigma_i+1) of ascending ``sigmas``: the log-normal mass between them,
    erf((ln s_i+1 - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std)), normalised (iCT eq. 10)."""
    cdf = torch.special.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def ect_ratio(s: Tensor, *, stage: int, q: float = 4.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's s' / s = 1 - q^-(stage + 1) (1 + k sigmoid(-b s)), clamped at 0 (``ECMLoss.t_to_r_sigmoid``)."""
    return (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * s))).clamp(min=0)


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(|x - y|^2 + c^2) - c over all but the batch dim, float32 (iCT sec. 3.3); c = 0: |x - y|."""
    sq = (x.float() - y.float()).pow(2).flatten(1).sum(dim=1)
    return (sq + c * c).sqrt() - c


@register_objective("consistency")
@dataclass(frozen=True, kw_only=True)
class Consistency(EDM):
    """Consistency model F (iCT / ECT, see the module docstring): EDM's c_in, c_noise with c_skip / c_out
    vanishing at ``sigma_min``. ``schedule`` 'ict' (Karras pairs, curriculum s0 -> s1 over the run) or 'ect'
    (continuous s' = ratio(s) s, the stage growing every ``stage_steps`` steps as ECT's --double, ratio from q, k,
    b); ``total_steps`` is iCT's K (the curriculum's length; set it to the run's steps); ``huber_c`` null:
    0.00054 sqrt(dim).
    """

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    schedule: str = "ict"
    s0: int = 10
    s1: int = 1280
    total_steps: int = 10000
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None
    stage_steps: int = 2500
    q: float = 4.0
    k: float = 8.0
    b: float = 1.0
    few_step: ClassVar[bool] = True  # trained by its own ``training_loss`` (two evaluations of the net)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"consistency schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.total_steps < 1 or self.stage_steps < 1:
            raise ValueError(
                f"consistency total_steps (iCT's K) and stage_steps must be >= 1, got {self.total_steps} and "
                f"{self.stage_steps}: a time-limited run (trainer.max_steps=-1) sets model.objective_opts.total_steps"
            )
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")

    def scalings(self, alpha: Scalar, sigma: Scalar) -> tuple[Scalar, Scalar]:
        """(c_skip / alpha, c_out) at the process's (alpha, sigma), written with d = sigma - s_min alpha so that
        they stay finite where alpha = 0: c_skip / alpha = sd^2 alpha / (d^2 + sd^2 alpha^2),
        c_out = sd d / sqrt(sigma^2 + sd^2 alpha^2); x0_hat = c_skip x_t / alpha + c_out F."""
        sd2 = self.sigma_data**2
        d = sigma - self.sigma_min * alpha
        return sd2 * alpha / (d * d + sd2 * alpha * alpha), self.sigma_data * d / _sqrt(
            sigma * sigma + sd2 * alpha * alpha
        )

    def denoised(self, out, x_t, alpha, sigma):
        skip, c_out = self.scalings(alpha, sigma)
        x0 = skip * x_t + c_out * out
        return x0, (x_t - alpha * x0) / sigma

    def target(self, x0, eps, alpha, sigma):  # (x0 - c_skip x / alpha) / c_out; free (0) where c_out = 0
        skip, c_out = self.scalings(alpha, sigma)
        residual = x0 - skip * (alpha * x0 + sigma * eps)
        if isinstance(c_out, Tensor):
            return torch.where(
                c_out == 0, torch.zeros_like(residual), residual / c_out.where(c_out != 0, 1.0)
            )
        return residual / c_out if c_out != 0 else torch.zeros_like(residual)

    def x0_error_scale(self, snr):  # c_out^2
        s = snr.double().clamp(min=1e-30).rsqrt()
        return consistency_scalings(s, sigma_data=self.sigma_data, sigma_min=self.sigma_min)[1].pow(2).float()

    # ------------------------------------------------------------------ training
    def pair(
        self, n: int, *, step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(s, s', weight) for n samples at optimizer step ``step`` (k-diffusion sigmas, float64)."""
        where = generator.device if generator is not None else None
        if self.schedule == "ict":
            steps = ict_discretisation(step, self.total_steps, s0=self.s0, s1=self.s1)
            sigmas = karras_sigmas(steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)
            probs = lognormal_pair_probs(sigmas, p_mean=self.p_mean, p_std=self.p_std)
            i = torch.multinomial(probs.float().to(where), n, replacement=True, generator=generator).cpu()
            s, s_prev = sigmas[i + 1], sigmas[i]
            return s, s_prev, 1 / (s - s_prev)
        s = (
            torch.randn(n, generator=generator, device=where).cpu().double() * self.p_std + self.p_mean
        ).exp()
        stage = step // self.stage_steps
        s_prev = s * ect_ratio(s, stage=stage, q=self.q, k=self.k, b=self.b)
        return s, s_prev, (s * s + self.sigma_data**2) / (s * self.sigma_data) ** 2

    def consistency_fn(
        self, net: Callable[..., Tensor], x: Tensor, s: Tensor, process: Process, cond: dict, **kw
    ) -> Tensor:
        """f(x, s) for k-diffusion samples x = x0 + s eps (B, ...) at sigmas s (B,), on any process."""
        alpha, sigma = (append_dims(v.to(x.device), x.ndim) for v in process.from_ksigma(s))
        x_t = (alpha * x).float()
        t = process.t_from_ksigma(s).float().to(x.device)
        x_in, level = self.net_input(x_t, t, alpha.float(), sigma.float(), process)
        out = net(x_in.contiguous(**kw), level, **cond)
        skip, c_out = (v.float() for v in self.scalings(alpha, sigma))  # float64 -> float32
        return skip * x_t + c_out * out.float()

    def pair_loss(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        eps: Tensor,
        s: Tensor,
        s_prev: Tensor,
        weight: Tensor,
        *,
        process: Process,
        cond: dict[str, Tensor] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        """mean over the batch of weight * pseudo_huber(f(x0 + s eps, s), sg f(x0 + s' eps, s')), f(., 0) = x0;
        s, s_prev, weight (B,) k-diffusion sigmas and weights, eps the shared noise direction."""
        cond, kw = cond or {}, {"memory_format": memory_format}
        x_s = x0 + append_dims(s.float().to(x0.device), x0.ndim) * eps
        online = self.consistency_fn(net, x_s, s, process, cond, **kw)
        target = x0.float()
        if (s_prev > 0).any():
            with torch.no_grad():  # the same net, stop-gradient (iCT: no EMA teacher)
                x_prev = x0 + append_dims(s_prev.float().to(x0.device), x0.ndim) * eps
                f_prev = self.consistency_fn(
                    net, x_prev, s_prev.clamp(min=self.sigma_min), process, cond, **kw
                )
            keep = append_dims((s_prev > 0).to(x0.device), x0.ndim)
            target = torch.where(keep, torch.nan_to_num(f_prev), target)
        c = 0.00054 * math.sqrt(x0[0].numel()) if self.huber_c is None else self.huber_c
        return (weight.float().to(x0.device) * pseudo_huber(online, target, c)).mean()

    def training_loss(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        *,
        process: Process,
        cond: dict[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        step: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        """Consistency training loss at optimizer ``step``: a pair (s, s') per sample (``pair``), one noise
        direction eps, then ``pair_loss``."""
        s, s_prev, weight = self.pair(len(x0), step=step, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.pair_loss(
            net, x0, eps, s, s_prev, weight, process=process, cond=cond, memory_format=memory_format
        )

    def loss(self, inputs: LossInputs) -> Tensor:
        """The few-step seam: consistency training on the batch (the net is its own stop-gradient teacher)."""
        return self.training_loss(
            inputs.net,
            inputs.x0,
            process=inputs.process,
            cond=inputs.cond,
            generator=inputs.generator,
            step=inputs.step,
            memory_format=inputs.memory_format,
        )


@register_grid("consistency", start="sigma")
def consistency_levels(process: Process, steps: int, *, rho: float = 7.0) -> tuple[Tensor, Tensor]:
    """The Karras grid of steps + 1 points without its last (s_min): where multistep consistency sampling
    re-noises (one step: s_max alone; two: s_max and the rho = 7 midpoint)."""
    t, ksigma = karras(process, steps + 1, rho=rho)
    return t[:-1], ksigma[:-1]


@register_sampler("consistency", grid="consistency", formulation="consistency")
def consistency(denoise: Denoiser, x: Tensor, grid: Grid, *, s_noise: float = 1.0) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x, s_0), then for each next s_n
    x = x0 + sqrt(s_n^2 - s_min^2) z and x0 = f(x, s_n); one step is one evaluation."""
    if denoise.objective.name != "consistency":
        raise ValueError(
            "the consistency sampler samples nets trained with objective=consistency (formulation=consistency), "
            f"got objective {denoise.objective.name}"
        )
    ks, s_min = grid.ksigma, denoise.objective.sigma_min
    x = grid.start(x, "k")
    for i in denoise.progress(grid.steps):
        x0 = denoise.at_ksigma(x, ks[i], grid.t[i])
        x = x0
        if i + 1 < grid.steps:  # noise re-injection down to the next level
            x = x0 + s_noise * max(ks[i + 1] ** 2 - s_min**2, 0.0) ** 0.5 * denoise.noise_like(x0)
        denoise.report(i, x * grid.alpha_k[i + 1], x0)
    return x
