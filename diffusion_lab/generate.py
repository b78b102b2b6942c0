"""The one generation loop: (system, labels / prompts, n, seed, sampler, guidance) -> images, chunk by chunk.

`sample`, `evaluate`, the training callbacks and notebooks all draw through `generate`. Seeding rule: sample i
draws its x_T and every step's noise from its own generator, seeded `sample_seed(seed, i)`, so it is the same
image whatever the batch size, the number of DDP ranks or the rank that draws it (chunk j runs on rank
j mod world_size). The system decides the rest: its condition (`system.condition`), x0 clipping (`clip_x0`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_lab.checkpoints import load_guide
from diffusion_lab.diffusion import Guidance
from diffusion_lab.diffusion.utils import randn_like

SEEDING_RULE = "per-sample/1"  # evaluate reuses a cached sample file only when it was drawn by this rule


def balanced_labels(n: int, num_classes: int, *, start: int = 0) -> torch.Tensor:
    """Label (start + i) mod K for sample i: every class in turn (what a class model draws when no class is
    named); exactly n / K of each class when K divides n."""
    return (torch.arange(n) + start) % num_classes


def seed_range(spec: str | int | None, n: int) -> range:
    """The sample indices of a generated set: None = 0..n-1 (EDM's `--seeds=0-49999` convention for n = 50000),
    "a-b" = a..b inclusive (must hold n indices), an int a = a..a+n-1."""
    if spec is None or spec == "":
        return range(n)
    if isinstance(spec, int):
        start, stop = spec, spec + n - 1
    else:
        try:
            start, stop = (int(v) for v in str(spec).split("-"))
        except ValueError:
            raise ValueError(
                f"seeds={spec!r} is not a range: use seeds=a-b (e.g. 0-49999) or a first seed"
            ) from None
    if start < 0 or stop - start + 1 != n:
        raise ValueError(f"seeds={spec} holds {stop - start + 1} seeds but num_samples={n}: make them match")
    return range(start, stop + 1)


def random_labels(n: int, num_classes: int, *, seed: int, start: int = 0) -> torch.Tensor:
    """An independent uniform label per sample index (from `sample_seed(seed, index)`, as EDM draws a class per
    seed): the class counts vary like a multinomial sample."""
    return torch.tensor(
        [np.random.default_rng(sample_seed(seed, start + i)).integers(num_classes) for i in range(n)]
    )


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed` (no collisions between (seed, index) pairs)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def iter_chunks(
    n: int, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, stop) of the chunks this rank runs (round-robin)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world_size == rank:
            yield j, start, min(start + batch_size, n)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`, ...; ValueError (one line) for an unknown device
    or one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={name} but CUDA is not available here: use device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={name} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
            )
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"device={name} is not supported here: use auto, cpu, cuda or cuda:N")
    return device


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def guidance_options(cfg: Mapping[str, Any], model, *, device: str | torch.device) -> Guidance:
    """The ``Guidance`` of a sample or evaluate config: guidance_rescale, guidance_interval and guide (the net of
    guide_ckpt); its scale is set per draw (``generate``'s guidance_scale)."""
    interval, rescale = cfg.get("guidance_interval"), cfg.get("guidance_rescale") or 0.0
    if not _is_number(rescale) or not 0 <= rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (phi), got {rescale!r}")
    if interval is not None and (
        isinstance(interval, str)
        or len(interval) != 2
        or not all(_is_number(v) and v >= 0 for v in interval)
        or not interval[0] < interval[1]
    ):
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo < hi (sigmas), got {interval!r}")
    return Guidance(
        rescale=float(rescale),
        interval=None if interval is None else tuple(float(v) for v in interval),
        guide=load_guide(cfg["guide_ckpt"], model, device=device) if cfg.get("guide_ckpt") else None,
    )


@torch.no_grad()
def generate(
    model,
    *,
    sampler: Callable[..., torch.Tensor],
    num_samples: int,
    seed: int,
    batch_size: int = 256,
    guidance_scale: float = 1.0,
    labels: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    guidance: Guidance | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    first_index: int = 0,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, images in [-1, 1] on the model's device) for this rank's chunks of `num_samples`.

    `labels` (N,) / `prompts` (N texts): the condition of each sample (`model.condition`); none: unconditional
    (a text model then samples the empty caption). `guidance`: its rescale / interval / guide (autoguidance),
    at `guidance_scale`; without a condition or a guide, guidance is off. `first_index`: sample i is drawn as
    sample `first_index + i` (a seed range that starts elsewhere, EDM's `--seeds=a-b`)."""
    guidance = guidance or Guidance()
    device = model.device
    chunks = list(iter_chunks(num_samples, batch_size, rank=rank, world_size=world_size))
    for _, start, stop in tqdm(chunks, desc="chunks", disable=not progress or len(chunks) < 2, leave=False):
        generators = [
            torch.Generator(device=device).manual_seed(sample_seed(seed, first_index + i))
            for i in range(start, stop)
        ]
        x_T = randn_like(torch.empty((stop - start, *model.sample_shape), device=device), generators)
        cond = model.condition(
            labels=None if labels is None else labels[start:stop],
            prompts=None if prompts is None else list(prompts[start:stop]),
        )
        images = model.sample(
            sampler=sampler,
            x_T=x_T,
            cond=cond,
            guidance=replace(guidance, scale=guidance_scale if cond or guidance.guide is not None else 1.0),
            generator=generators,
            progress=progress,
        )
        yield start, stop, images


def generate_all(model, **kwargs: Any) -> torch.Tensor:
    """Every image of `generate(model, **kwargs)` in order, on the CPU (one process)."""
    return torch.cat([images.cpu() for _, _, images in generate(model, **kwargs)])
