"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): one net for 1, 2, 4, ... steps.

On the rectified-flow path x_t = (1 - t) x0 + t eps (t = 1: noise) the net u(x_t, t, d) is the velocity of a
step of size d: x_{t - d} = x_t - d u. It is trained on two targets (the paper's ``targets_shortcut.py`` in this
framework's direction of time, t falling to the data):
- flow matching at d = 0 on most of the batch: u(x_t, t, 0) -> eps - x0;
- self-consistency on a share of it: u(x_t, t, 2d) -> (u1 + u2) / 2 with u1 = u(x_t, t, d),
  u2 = u(x_t - d u1, t - d, d) (stop-gradient, the net's own or the EMA's), 2d on the dyadic grid 1, 1/2, ...,
  2 / M in equal shares, t on the multiples of 2d; the finest query d = 1 / M is the flow velocity (d = 0),
  as the paper's flow targets sit at its finest level. Intermediate points and targets are clipped to [-4, 4].
CFG as the paper: at the finest level the bootstrap velocities are guided (``cfg_scale``), so larger steps
inherit guidance; sampling may guide too. The net sees second_level = process.noise_level(d) (1000 d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .grids import Grid
from .guidance import Denoiser
from .losses import diffusion_loss
from .meanflow import second_level
from .objectives import Flow, LossInputs, register_objective
from .processes import Process
from .samplers import register_sampler
from .utils import append_dims

FORMULATION = "shortcut"

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # u(x_t, t, d) with t, d (B,)


def shortcut_target(
    velocity: Velocity, x_t: Tensor, t: Tensor, d: Tensor, *, clip: float | None = 4.0
) -> Tensor:
    """The self-consistency target of a step of size 2d at (x_t, t): the mean velocity of two d-steps,
    (u(x_t, t, d) + u(x_t - d u1, t - d, d)) / 2 (Frans et al. 2024, eq. 5); ``clip`` bounds the midpoint and the
    target as the paper (None: no clipping)."""
    u1 = velocity(x_t, t, d)
    x_mid = x_t - append_dims(d.to(x_t), x_t.ndim) * u1
    if clip is not None:
        x_mid = x_mid.clamp(-clip, clip)
    target = (u1 + velocity(x_mid, t - d, d)) / 2
    return target if clip is None else target.clamp(-clip, clip)


def dyadic_bootstrap_steps(n: int, min_step: float) -> Tensor:
    """Step sizes 2d of n bootstrap samples: the dyadic levels 1, 1/2, ..., 2 min_step in equal shares (the
    paper's ``dt_base`` with bootstrap_dt_bias 0: the remainder at the coarsest level), float64 (n,)."""
    levels = round(math.log2(1 / min_step))
    k = torch.arange(n) % levels if levels > 0 else torch.zeros(n, dtype=torch.long)
    return 2.0 ** -k.double()


def check_shortcut(process: Process, net: object, what: str) -> None:
    """ValueError (one line) unless on the rectified_flow process with a two-time net (formulation=shortcut)."""
    if process.name != "rectified_flow":
        raise ValueError(
            f"{what} runs on the rectified_flow process (formulation={FORMULATION}), got {process.name}"
        )
    if not getattr(net, "accepts_second_level", False):
        raise ValueError(
            f"{what} needs a two-time net (model.net.two_time: true, set by formulation={FORMULATION})"
        )


@register_objective("shortcut")
@dataclass(frozen=True, kw_only=True)
class Shortcut(Flow):
    """The shortcut model's velocity u(x_t, t, d) (module docstring): flow's u = eps - x0 at d = 0.
    ``min_step``: 1 / M, the finest step (a power of 1/2); ``bootstrap_share``: the batch's share of
    self-consistency targets (the paper: 1 / 4); ``cfg_scale``: guidance folded into the finest bootstrap targets
    (1: none); ``ema_targets``: the targets from the system's target net (the EMA), else from the net itself."""

    min_step: float = 1 / 128
    bootstrap_share: float = 0.25
    cfg_scale: float = 1.0
    ema_targets: bool = False
    few_step: ClassVar[bool] = True

    def __post_init__(self) -> None:
        levels = math.log2(1 / self.min_step) if self.min_step > 0 else 0.5
        if not (0 < self.min_step <= 1 and levels == round(levels)):
            raise ValueError(f"min_step must be 1 / 2^k (k >= 0), got {self.min_step}")
        if not 0 <= self.bootstrap_share < 1:
            raise ValueError(f"bootstrap_share must be in [0, 1), got {self.bootstrap_share}")

    def step_level(self, d: Tensor, process: Process) -> Tensor:
        """The net's second level for step sizes d (B,): process.noise_level(d), 0 (the flow) at d <= min_step."""
        d = torch.where(d <= self.min_step * (1 + 1e-9), torch.zeros_like(d), d)
        return process.noise_level(d)

    def loss(self, inputs: LossInputs) -> Tensor:
        """Flow matching at d = 0 on 1 - bootstrap_share of the batch, self-consistency on the rest; one MSE."""
        process, x0, g = inputs.process, inputs.x0, inputs.generator
        net, n = inputs.net, len(x0)
        check_shortcut(process, net, "objective 'shortcut'")
        teacher = net
        if self.ema_targets:
            if inputs.target_net is None:
                raise ValueError(
                    "shortcut ema_targets=true needs the system's target net (the EMA); none was given"
                )
            teacher = inputs.target_net
        nb = min(round(n * self.bootstrap_share), n - 1)
        cond = inputs.cond
        kw = {"memory_format": inputs.memory_format}
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=g)
        where = g.device if g is not None else x0.device

        # flow matching at d = 0: t from the formulation's noise levels
        t = inputs.noise_levels(process, n - nb, generator=g, device=x0.device)  # (n - nb,)
        x_t = process.add_noise(x0[nb:], eps[nb:], t)
        flow_cond = {k: v[nb:] for k, v in cond.items()}
        level = process.noise_level(t)
        out = [net(x_t.contiguous(**kw), level, second_level=torch.zeros_like(level), **flow_cond)]
        targets = [eps[nb:] - x0[nb:]]

        if (
            nb > 0
        ):  # self-consistency: 2d dyadic, t on its multiples (t - 2d >= 0), two d-steps of the teacher
            two_d = dyadic_bootstrap_steps(nb, self.min_step)
            j = (
                torch.floor(torch.rand(nb, generator=g, device=where).cpu().double() / two_d) + 1
            )  # 1 .. 1 / 2d
            t_b, d = (j * two_d).clamp(max=1.0), two_d / 2
            boot_cond = {k: v[:nb] for k, v in cond.items()}
            x_b = process.add_noise(x0[:nb], eps[:nb], t_b.float().to(x0.device))
            with torch.no_grad():
                target = shortcut_target(self._velocity(teacher, process, boot_cond, inputs), x_b, t_b, d)
            level_b = process.noise_level(t_b.float().to(x0.device))
            step_b = self.step_level(two_d, process).to(x0.device)
            out.insert(0, net(x_b.contiguous(**kw), level_b, second_level=step_b, **boot_cond))
            targets.insert(0, target)
        return diffusion_loss(torch.cat(out), torch.cat(targets))

    def _velocity(
        self, teacher: Callable[..., Tensor], process: Process, cond: dict, inputs: LossInputs
    ) -> Velocity:
        """u(x, t, d) of the teacher under ``cond``; guided (cfg_scale) where d is the finest step, as the paper."""

        def velocity(x: Tensor, t: Tensor, d: Tensor) -> Tensor:
            level = process.noise_level(t.float().to(x.device))
            step = self.step_level(d, process).to(x.device)
            u = teacher(x, level, second_level=step, **cond).float()
            finest = d <= self.min_step * (1 + 1e-9)
            if self.cfg_scale == 1.0 or inputs.null_condition is None or not finest.any():
                return u
            u_null = teacher(x, level, second_level=step, **inputs.null_condition(len(x))).float()
            guided = u_null + self.cfg_scale * (u - u_null)
            return torch.where(append_dims(finest.to(x.device), x.ndim), guided, u)

        return velocity


@register_sampler(FORMULATION, grid="even", formulation=FORMULATION)
def shortcut(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """Shortcut sampling (Frans et al. 2024): k steps of size d = 1 / k, x_{t - d} = x_t - d u(x_t, t, d), on
    the grid 'even'; through the Denoiser (x0_hat = x_t - t u, eps_hat = x0_hat + u) it is
    x_{t - d} = (1 - (t - d)) x0_hat + (t - d) eps_hat, with guidance, clipping and callbacks as every sampler."""
    objective = denoise.objective
    if objective.name != FORMULATION:
        raise ValueError(
            f"the shortcut sampler samples nets trained with objective={FORMULATION} (formulation={FORMULATION}), "
            f"got objective {objective.name}"
        )
    check_shortcut(denoise.process, denoise.model, "the shortcut sampler")
    x = grid.start(x)
    for i in denoise.progress(grid.steps):
        d = torch.tensor([grid.t[i] - grid.t[i + 1]], dtype=torch.float64)
        level = objective.step_level(d, denoise.process)[0]  # 0-d: broadcasts over a CFG batch
        with second_level(denoise, level.to(x.device)):
            x0, eps = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        x = grid.alpha[i + 1] * x0 + grid.sigma[i + 1] * eps
        denoise.report(i, x, x0)
    return x
