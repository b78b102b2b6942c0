"""MeanFlow (Geng et al. 2025): a two-time net learns the average velocity u(z_t, r, t), sampled in 1 to k steps.

On the rectified-flow path z_t = (1 - t) x0 + t eps (v = eps - x0) the average velocity over [r, t] is
u(z_t, r, t) = (z_r - z_t) / (r - t) along the ODE, and it satisfies the MeanFlow identity
u = v - (t - r) du/dt, with du/dt = v d_z u + d_t u the total derivative along the path. The loss regresses u_theta
onto the stop-gradient target v - (t - r) du_theta/dt, du/dt by ONE forward-mode ``torch.func.jvp`` with tangent
(v, 0, 1) in (z, r, t), weighted adaptively by 1 / (||err||^2 + c)^p (sg). (t, r) come from two logit-normals,
r = t on a share of the batch (plain flow matching there), as Gsunshine/py-meanflow's ``sample_two_timesteps_t_r_v1``.
The net sees noise_level(t) and, as its second level, noise_level(t) - noise_level(r): the interval, the
paper's best choice (its Table 1c). formulation=meanflow sets the process's time_scale to 1 (levels t and t - r,
as py-meanflow): at flow's usual 1000 t the net is 1000x sharper in t, and so is the du/dt in its target.
CFG is folded into the target (paper sec. 4.2, App. B.1): v is replaced by
v~ = w v + k u(z_t, t, t | c) + (1 - w - k) u(z_t, t, t | null), sg, for the samples that kept their condition.
Sampling (``meanflow`` sampler): z_r = z_t - (t - r) u(z_t, r, t) over k steps of the grid (1 step: z_0 = eps - u).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .grids import Grid
from .guidance import Denoiser, _cfg_batch
from .objectives import Flow, LossInputs, register_objective
from .processes import Process
from .samplers import register_sampler

FORMULATION = "meanflow"


def check_rectified_flow(process: Process, what: str) -> None:
    """ValueError in one line unless ``process`` is the rectified flow alpha = 1 - t, sigma = t on [0, 1]."""
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    alpha, sigma = process.coefficients(t)
    if process.discrete or not (torch.allclose(alpha, 1 - t) and torch.allclose(sigma, t)):
        raise ValueError(
            f"{what} needs the rectified-flow process (alpha = 1 - t, sigma = t): process=rectified_flow "
            f"(formulation={FORMULATION} sets it), got {process.name}"
        )


def check_two_time_net(net: Any, what: str) -> None:
    """ValueError in one line unless ``net`` takes a second level (built with two_time=True)."""
    net = getattr(net, "module", net)  # DDP / compiled wrappers
    net = getattr(net, "_orig_mod", net)
    if not getattr(net, "accepts_second_level", False):
        raise ValueError(
            f"{what} needs a two-time net (model.net.two_time: true, set by formulation={FORMULATION}); "
            f"{type(net).__name__} takes one noise level"
        )


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None, device) -> Tensor:
    """sigmoid(mean + std N(0, 1)), (n,) float32 (SD3's logit-normal; MeanFlow's time sampler)."""
    gen_device = generator.device if generator is not None else device
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=gen_device)).to(device)


def sample_two_times(
    n: int,
    *,
    t_mean: float,
    t_std: float,
    r_mean: float,
    r_std: float,
    share_equal: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(t, r), each (n,), r <= t: two independent logit-normals, r set to t on a share ``share_equal`` of the
    batch, then r = min(t, r) (py-meanflow's ``sample_two_timesteps_t_r_v1``)."""
    t = logit_normal(n, t_mean, t_std, generator, device)
    r = logit_normal(n, r_mean, r_std, generator, device)
    gen_device = generator.device if generator is not None else device
    equal = (torch.rand(n, generator=generator, device=gen_device) < share_equal).to(t.device)
    r = torch.where(equal, t, r)
    return t, torch.minimum(t, r)


def _is_null(cond: dict[str, Tensor], null: dict[str, Tensor]) -> Tensor:
    """(B,) bool: the samples whose condition is the null one (dropped for CFG training)."""
    b = len(next(iter(cond.values())))
    out = torch.ones(b, dtype=torch.bool, device=next(iter(cond.values())).device)
    for key, value in cond.items():
        out &= (value == null[key].to(value.device)).reshape(b, -1).all(dim=1)
    return out


_MATH_ATTENTION = False  # set once SDPA's fused kernel refused forward mode: jvp runs attention's math kernel


def _at_least_fp32(xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]):
    """``torch.func.jvp(fn, primals, tangents)``, under SDPA's math kernel when the fused kernels of this PyTorch
    have no forward-mode rule (the CPU flash kernel has none in torch 2.x): tried once, then remembered. Never below
    float32, outside any autocast (bf16-mixed runs: autocast casts the weights but not the fp32 tangents, and
    forward mode then fails on the dtype mismatch)."""
    global _MATH_ATTENTION
    with torch.autocast(primals[0].device.type, enabled=False):
        primals, tangents = _at_least_fp32(primals), _at_least_fp32(tangents)
        if not _MATH_ATTENTION:
            try:
                return torch.func.jvp(fn, primals, tangents)
            except NotImplementedError as e:
                if "forward AD" not in str(e):
                    raise
                _MATH_ATTENTION = True
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(fn, primals, tangents)


@register_objective(FORMULATION)
@dataclass(frozen=True, kw_only=True)
class MeanFlow(Flow):
    """MeanFlow's average velocity u(z_t, r, t) (Geng et al. 2025); at r = t it is the flow velocity eps - x0, so
    ``denoised`` / ``target`` are flow's. Options: the (t, r) sampler (``t_mean``, ``t_std``, ``r_mean``,
    ``r_std``: logit-normal; ``share_equal``: the share with r = t), the adaptive weight 1 / (err + ``adaptive_c``)
    ^ ``adaptive_p`` (p = 0: plain squared error), and CFG in the target: ``cfg_scale`` w (1: none), ``cfg_mix``
    k (the share of the conditional u; the guidance a sampler then sees is w / (1 - k))."""

    t_mean: float = -0.6
    t_std: float = 1.6
    r_mean: float = -4.0
    r_std: float = 1.6
    share_equal: float = 0.25
    adaptive_p: float = 0.75
    adaptive_c: float = 1e-3
    cfg_scale: float = 1.0
    cfg_mix: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share_equal <= 1.0:
            raise ValueError(f"share_equal must be in [0, 1], got {self.share_equal}")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            raise ValueError(
                f"adaptive_p must be >= 0 and adaptive_c > 0, got {self.adaptive_p}, {self.adaptive_c}"
            )
        if self.t_std <= 0 or self.r_std <= 0:
            raise ValueError(f"t_std and r_std must be > 0, got {self.t_std}, {self.r_std}")
        if self.cfg_scale < 1.0 or not 0.0 <= self.cfg_mix < 1.0:
            raise ValueError(
                f"cfg_scale must be >= 1 and cfg_mix in [0, 1), got {self.cfg_scale}, {self.cfg_mix}"
            )

    def guided_velocity(self, inputs: LossInputs, z: Tensor, level: Tensor, v: Tensor) -> Tensor:
        """v~ = w v + k u(z, t, t | c) + (1 - w - k) u(z, t, t | null) (sg) where the condition was kept, v elsewhere
        (and everywhere for w = 1 or an unconditional model)."""
        if self.cfg_scale == 1.0 and self.cfg_mix == 0.0 or inputs.null_condition is None or not inputs.cond:
            return v
        null = inputs.null_condition(len(z))
        instantaneous = functools.partial(inputs.net, second_level=torch.zeros_like(level))
        with torch.no_grad():
            u_null, u_cond = _cfg_batch(instantaneous, z, level, inputs.cond, null)
        w, k = self.cfg_scale, self.cfg_mix
        guided = w * v + k * u_cond.float() + (1 - w - k) * u_null.float()
        dropped = _is_null(inputs.cond, null).view(-1, *([1] * (v.ndim - 1)))
        return torch.where(dropped, v, guided)

    def loss(self, inputs: LossInputs) -> Tensor:
        process, x0 = inputs.process, inputs.x0
        check_rectified_flow(process, "the meanflow objective")
        check_two_time_net(inputs.net, "the meanflow objective")
        t, r = sample_two_times(
            len(x0),
            t_mean=self.t_mean,
            t_std=self.t_std,
            r_mean=self.r_mean,
            r_std=self.r_std,
            share_equal=self.share_equal,
            generator=inputs.generator,
            device=x0.device,
        )  # (B,) each
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=inputs.generator)
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        z = ((1 - tb) * x0 + tb * eps).contiguous(memory_format=inputs.memory_format)  # (B, C, H, W)
        v = self.guided_velocity(inputs, z, process.noise_level(t), eps - x0)

        def u_of(z: Tensor, t: Tensor, r: Tensor) -> Tensor:
            level = process.noise_level(t)
            return inputs.net(z, level, second_level=level - process.noise_level(r), **inputs.cond)

        u, dudt = jvp(u_of, (z, t, r), (v.to(z.dtype), torch.ones_like(t), torch.zeros_like(r)))
        target = (v - (tb - r.view_as(tb).to(x0.dtype)) * dudt).detach()
        err = (u.float() - target.float()).pow(2).flatten(1).sum(dim=1)  # (B,) squared L2 error
        if self.adaptive_p > 0:
            err = err / (err.detach() + self.adaptive_c) ** self.adaptive_p
        return err.mean()


@contextlib.contextmanager
def second_level(denoise: Denoiser, level: Tensor) -> Iterator[None]:
    """Within the block, ``denoise`` calls its net (and an autoguidance guide) with ``second_level=level`` (0-d,
    so it broadcasts over a CFG batch too)."""
    model, guidance = denoise.model, denoise.guidance
    denoise.model = functools.partial(model, second_level=level)
    if guidance.guide is not None:
        denoise.guidance = dataclasses.replace(
            guidance, guide=functools.partial(guidance.guide, second_level=level)
        )
    try:
        yield
    finally:
        denoise.model, denoise.guidance = model, guidance


def check_sampling(denoise: Denoiser, what: str) -> None:
    """ValueError in one line unless the denoiser runs a two-time net trained by the meanflow objective."""
    if denoise.objective.name != FORMULATION:
        raise ValueError(
            f"{what} samples nets trained with objective={FORMULATION} (formulation={FORMULATION}), "
            f"got objective {denoise.objective.name}"
        )
    check_two_time_net(denoise.model, what)


@register_sampler(FORMULATION, grid="even", formulation=FORMULATION)
def meanflow(denoise: Denoiser, x: Tensor, grid: Grid) -> Tensor:
    """MeanFlow sampling (Geng et al. 2025, Alg. 2 and its k-step form): z_r = z_t - (t - r) u(z_t, r, t) from
    each grid point t to the next r (its own grid 'even': k equal steps from t = 1; 1 step: z_0 = eps - u(eps, 0, 1)).
    Written through the Denoiser, x0_hat = z_t - t u and eps_hat = x0_hat + u, so the step is
    z_r = (1 - r) x0_hat + r eps_hat, with guidance, x0 clipping and callbacks as every sampler."""
    check_sampling(denoise, "the meanflow sampler")
    check_rectified_flow(denoise.process, "the meanflow sampler")
    x = grid.start(x)
    for i in denoise.progress(grid.steps):
        t, r = torch.tensor([grid.t[i], grid.t[i + 1]], dtype=torch.float32)
        level = denoise.process.noise_level(t) - denoise.process.noise_level(r)  # 0-d
        with second_level(denoise, level.to(x.device)):
            x0, eps = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        x = grid.alpha[i + 1] * x0 + grid.sigma[i + 1] * eps
        denoise.report(i, x, x0)
    return x
