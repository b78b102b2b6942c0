"""Small shared helpers of the diffusion maths: broadcasting, option checking, seeded noise."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that ``x`` (B,) broadcasts against a tensor with ``ndim`` dims."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(x.shape)} to {ndim} dims")
    return x.reshape(*x.shape, *([1] * missing))


def keyword_options(fn: Callable[..., Any], *, skip: Iterable[str] = ()) -> list[str]:
    """Names of the keyword-only parameters of ``fn`` (its tunable options), minus ``skip``."""
    skip = set(skip)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip]


def check_options(
    fn: Callable[..., Any], opts: dict[str, Any], *, what: str, skip: Iterable[str] = ()
) -> None:
    """Raise a TypeError naming the valid options if ``opts`` holds a name ``fn`` does not take."""
    valid = keyword_options(fn, skip=skip)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for {what}; valid options: {', '.join(valid) or '(none)'}"
        )


def randn_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like ``x`` (float32), drawn on the generator's device, as diffusers does; a
    list of generators draws row i from generator i (per-sample seeds: noise that does not depend on the batch)."""
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise ValueError(f"{len(generator)} generators for a batch of {len(x)}")
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
