"""Training-time noise-level distributions (uniform, EDM's log-normal, SD3's logit-normal), registered by name.

Each is ``fn(process, n, *, generator, device, <options>) -> t`` of shape (n,) in the process's own units;
discrete processes get integer indices (rounded where the distribution is continuous).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .processes import Process, shift_time
from .registry import Registry
from .utils import check_options

NOISE_LEVELS = Registry("noise-level distribution")


def _on_process(process: Process, t: Tensor, device: torch.device | str | None) -> Tensor:
    """Round to table indices for discrete processes; float32 on ``device`` otherwise."""
    if process.discrete:
        return t.round().long().clamp(0, process.num_timesteps - 1).to(device)
    return t.float().to(device)


def _draw(kind: str, n: int, generator: torch.Generator | None, device) -> Tensor:
    """n standard normal (kind='randn') or uniform (kind='rand') draws on the generator's device (or ``device``)."""
    where = generator.device if generator is not None else device
    return getattr(torch, kind)((n,), generator=generator, device=where)


@NOISE_LEVELS.register("uniform")
def uniform(
    process: Process, n: int, *, generator: torch.Generator | None = None, device: Any = None
) -> Tensor:
    """Uniform t: integer t in 0..T-1 for discrete schedules (Ho et al. 2020), else U(t_min, t_max)."""
    if process.discrete:
        return torch.randint(0, process.num_timesteps, (n,), device=device, generator=generator)
    u = _draw("rand", n, generator, device)
    return _on_process(process, process.t_min + u * (process.t_max - process.t_min), device)


@NOISE_LEVELS.register("log_normal")
def log_normal(
    process: Process,
    n: int,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: Any = None,
) -> Tensor:
    """EDM's ln(sigma) ~ N(P_mean, P_std^2) on the k-diffusion sigma (Karras et al. 2022, sec. 5)."""
    ksigma = (_draw("randn", n, generator, device) * p_std + p_mean).double().exp()
    return _on_process(process, process.t_from_ksigma(ksigma.cpu()), device)


@NOISE_LEVELS.register("logit_normal")
def logit_normal(
    process: Process,
    n: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float | None = None,
    generator: torch.Generator | None = None,
    device: Any = None,
) -> Tensor:
    """SD3's logit-normal unit time u = sigmoid(N(mean, std^2)) (Esser et al. 2024, sec. 3.1), then the
    resolution shift (null: the process's own, 1 if it has none), mapped to t by ``process.from_unit``."""
    u = torch.sigmoid(_draw("randn", n, generator, device) * std + mean).double()
    u = shift_time(u, getattr(process, "shift", 1.0) if shift is None else shift)
    return _on_process(process, process.from_unit(u), device)


def get_noise_levels(name: str, **opts: Any) -> Callable[..., Tensor]:
    """The registered distribution ``name`` with its options bound: ``draw(process, n, generator=, device=)``."""
    fn = NOISE_LEVELS.get(name)
    check_options(fn, opts, what=f"noise-level distribution {name!r}", skip=("generator", "device"))
    return functools.partial(fn, **opts)
