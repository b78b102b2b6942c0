"""Guidance in the one denoiser wrapper: classifier-free guidance (Ho & Salimans 2022) and its refinements.

``Denoiser`` is what every sampler calls: it turns the net into x0_hat (the objective's preconditioning and
conversion), applying on the way
- CFG, ``uncond + s (cond - uncond)``, in ONE batched forward over [uncond; cond];
- guidance rescale (Lin et al. 2023, Alg. 2, phi): the guided x0_hat rescaled to the per-sample std of the
  conditional one (diffusers applies it to the raw output; the two agree for x0-prediction);
- a guidance interval (Kynkaanniemi et al. 2024): guidance only for k-diffusion sigma in (lo, hi], the plain
  conditional prediction elsewhere (one forward, no uncond);
- autoguidance (Karras et al. 2024): the guide is a weaker model of the same kind (e.g. an earlier checkpoint)
  called with the same condition, ``guide + s (main - guide)``.
Guiding x0_hat equals guiding the raw output for every objective (x0_hat is affine in it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .objectives import Objective, get_objective
from .processes import ALPHA_FLOOR, Process
from .utils import randn_like

Model = Callable[..., Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def _cfg_batch(
    model: Model, x: Tensor, t: Tensor, cond: dict[str, Any], uncond: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """(out_uncond, out_cond) from ONE call on [uncond; cond]: x and t doubled, condition tensors concatenated."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Tensor):
            both[key] = torch.cat([uncond[key], value])  # (2B, ...)
        elif value is uncond[key] or value == uncond[key]:
            both[key] = value
        else:
            raise ValueError(f"cond[{key!r}] is not a tensor, so it must equal uncond[{key!r}]")
    out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return out_uncond, out_cond


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, Alg. 2: phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std per sample."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (
        cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
    )
    return phi * rescaled + (1 - phi) * guided


@dataclass(frozen=True)
class Guidance:
    """How the denoiser is guided: CFG ``scale`` (1: off), ``rescale`` phi (Lin et al. 2023), ``interval`` [lo, hi]
    in k-diffusion sigma where guidance applies (Kynkaanniemi et al. 2024), and ``guide``, a weaker net of the same
    kind in place of the unconditional branch (autoguidance, Karras et al. 2024)."""

    scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    guide: Model | None = None

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.scale}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.rescale}")
        if self.interval is not None:
            lo, hi = (float(v) for v in self.interval)
            if not 0 <= lo < hi:
                raise ValueError(
                    f"guidance_interval must be [lo, hi] with 0 <= lo < hi (k-diffusion sigma), got {[lo, hi]}"
                )
            object.__setattr__(self, "interval", (lo, hi))


class Denoiser:
    """What every sampler gets: the net as (x0_hat, eps_hat) at (x_t, t, alpha, sigma) with guidance, x0
    clipping and the objective's conversion in this one place, plus the process (for noise levels off the
    grid), the run's noise source, progress bar and step callback."""

    def __init__(
        self,
        model: Model,
        *,
        process: Process,
        objective: str | Objective = "eps",
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        guidance: Guidance | None = None,
        clip_x0: bool = False,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        name: str = "sampling",
    ) -> None:
        self.model, self.process, self.objective = model, process, get_objective(objective)
        self.cond, self.uncond, self.guidance = cond or {}, uncond, guidance or Guidance()
        self.clip_x0 = clip_x0
        self.generator, self.callback, self.show_progress, self.name = generator, callback, progress, name

    def guided_at(self, ksigma: float) -> bool:
        """Whether guidance applies at this k-diffusion sigma (scale != 1, something to guide with, interval)."""
        g = self.guidance
        if g.scale == 1.0 or (self.uncond is None and g.guide is None):
            return False
        return g.interval is None or g.interval[0] < ksigma <= g.interval[1]

    def __call__(self, x: Tensor, t: float, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at x_t = x with x_t = alpha x0 + sigma eps; t is the process's noise level."""
        if alpha == 0 and self.objective.name == "eps":
            raise ValueError(
                "eps prediction cannot give x0 where alpha = 0 (zero terminal SNR, flow at t = 1): use v, x0 or "
                "flow prediction, or a k-diffusion sampler (euler, heun, dpmpp_2m, ...) that floors alpha"
            )
        integral = isinstance(t, int) or (self.process.discrete and float(t).is_integer())
        t_batch = torch.full((len(x),), t, dtype=torch.long if integral else torch.float32, device=x.device)
        x_in, level = self.objective.net_input(x, t_batch, alpha, sigma, self.process)

        def x0_of(out: Tensor) -> Tensor:
            if out.shape != x.shape:
                raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
            return self.objective.denoised(out.float(), x, alpha, sigma)[0]

        if not self.guided_at(sigma / max(alpha, ALPHA_FLOOR)):
            x0 = x0_of(self.model(x_in, level, **self.cond))
        else:  # guide the raw outputs (x0_hat is affine in them), then convert once
            g = self.guidance
            if g.guide is not None:  # autoguidance: the weaker model with the same condition
                out_u, out_c = g.guide(x_in, level, **self.cond), self.model(x_in, level, **self.cond)
            else:
                out_u, out_c = _cfg_batch(self.model, x_in, level, self.cond, self.uncond)
            x0 = x0_of(out_u + g.scale * (out_c - out_u))
            if g.rescale > 0:
                x0 = rescale_guidance(x0, x0_of(out_c), g.rescale)
        if self.clip_x0:
            # eps_hat follows the clipped x0_hat so the pair stays consistent (guided-diffusion's ddim_sample;
            # diffusers' DDIM with use_clipped_model_output=True): leaving eps as predicted breaks DDIM under
            # strong guidance, where x0 and eps then disagree.
            x0 = x0.clamp(-1.0, 1.0)
        return x0, (x - alpha * x0) / sigma

    def at_ksigma(self, x: Tensor, ksigma: float, t: float | None = None) -> Tensor:
        """x0_hat for the k-diffusion sample x = x_t / alpha at k-diffusion sigma ``ksigma`` (Karras et al.
        2022); t defaults to the process's noise level there (for points off the grid, e.g. EDM's churn)."""
        a, s = (float(v) for v in self.process.from_ksigma(torch.tensor([ksigma], dtype=torch.float64)))
        if t is None:
            t = float(self.process.t_from_ksigma(torch.tensor([ksigma], dtype=torch.float64))[0])
        return self(x * a, t, a, s)[0]

    def noise_like(self, x: Tensor) -> Tensor:
        """Fresh N(0, I) noise from the run's generator (float32, drawn on the generator's device)."""
        return randn_like(x, self.generator)

    def progress(self, steps: int) -> Iterable[int]:
        """range(steps), under a tqdm bar when progress=True."""
        return tqdm(range(steps), desc=self.name, disable=not self.show_progress, leave=False)

    def report(self, i: int, x: Tensor, x0: Tensor) -> None:
        """Hand step i's sample x_t (the process's scale) and its x0_hat to the user's callback, if any."""
        if self.callback is not None:
            self.callback(i, x, x0)
