"""Fixed-seed sample generation in chunks, shared by the FID callback and `evaluate` (DDP ranks split the chunks).

Chunk j covers samples [j * batch_size, (j + 1) * batch_size) and draws its x_T and sampler noise from a generator
seeded by (seed, j) alone, so the same samples come out whatever the number of ranks or which rank runs a chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ... (every chunk sees every class)."""
    return torch.arange(n) % num_classes


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for chunk `chunk` of a run seeded `seed` (no collisions between (seed, chunk) pairs)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def iter_chunks(
    n: int, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, stop) of the chunks this rank runs (round-robin)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world_size == rank:
            yield j, start, min(start + batch_size, n)


def condition_for(
    model, start: int, stop: int, *, labels: torch.Tensor | None, prompts: Sequence[str] | None
) -> dict[str, torch.Tensor]:
    """The net condition of samples [start, stop): class labels, or encoded prompts (text models), or none."""
    if prompts is not None:
        if not hasattr(model, "encode_prompts"):
            raise ValueError("prompts given, but this model is not text-conditional")
        return model.encode_prompts(list(prompts[start:stop]))
    if labels is not None:
        return {"class_labels": labels[start:stop].to(model.device)}
    return {}


@torch.no_grad()
def generate(
    model,
    *,
    sampler: Callable[..., torch.Tensor],
    num_samples: int,
    seed: int,
    batch_size: int,
    guidance_scale: float = 1.0,
    labels: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    guidance_opts: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, images in [-1, 1] on the model's device) for this rank's chunks of `num_samples`.

    ``guidance_opts``: guidance_rescale / guidance_interval / guide (autoguidance) for ``model.sample``."""
    guidance_opts = dict(guidance_opts or {})
    device = model.device
    chunks = list(iter_chunks(num_samples, batch_size, rank=rank, world_size=world_size))
    for j, start, stop in tqdm(chunks, desc="chunks", disable=not progress or len(chunks) < 2, leave=False):
        g = torch.Generator(device=device).manual_seed(chunk_seed(seed, j))
        x_T = torch.randn((stop - start, *model.sample_shape), generator=g, device=device)
        cond = condition_for(model, start, stop, labels=labels, prompts=prompts)
        images = model.sample(
            sampler=sampler,
            x_T=x_T,
            cond=cond,
            guidance_scale=guidance_scale if cond or guidance_opts.get("guide") is not None else 1.0,
            generator=g,
            progress=progress,
            **guidance_opts,
        )
        yield start, stop, images
