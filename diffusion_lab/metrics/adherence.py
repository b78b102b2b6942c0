"""Prompt adherence of text-to-image samples on the shapes data, scored by the exact attribute detector."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from diffusion_lab.data.phrases import compose_caption
from diffusion_lab.data.shapes import ATTRIBUTES, SHAPES_VOCABULARY, detect_shapes, random_attributes
from diffusion_lab.generate import generate_all


def attribute_adherence(
    detected: Sequence[Mapping[str, str | None]], targets: Sequence[Mapping[str, str]]
) -> dict[str, float]:
    """Share of samples whose detected value equals the prompt's, per attribute the prompts name, and `all`."""
    if len(detected) != len(targets):
        raise ValueError(f"{len(detected)} detections for {len(targets)} prompts")
    keys = [k for k in ATTRIBUTES if any(k in t for t in targets)]
    out = {k: float(np.mean([d.get(k) == t[k] for d, t in zip(detected, targets) if k in t])) for k in keys}
    out["all"] = float(np.mean([all(d.get(k) == v for k, v in t.items()) for d, t in zip(detected, targets)]))
    return out


def shapes_prompts(num_prompts: int, *, seed: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """`num_prompts` random attribute sets (seeded) and one caption of each through SHAPES_VOCABULARY."""
    rng = np.random.default_rng(seed)
    targets = random_attributes(num_prompts, rng)
    return [compose_caption(t, rng, vocab=SHAPES_VOCABULARY) for t in targets], targets


@torch.no_grad()
def prompt_adherence(
    model,
    *,
    sampler: Callable[..., torch.Tensor],
    guidance_scales: Sequence[float] = (1.0, 3.0, 5.0),
    num_prompts: int = 30,
    num_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """{guidance scale: per-attribute adherence} of `num_per_prompt` samples of each of `num_prompts` prompts.

    The same prompts and seeds (hence initial noise) are used at every scale, so the scales are compared on equal
    terms.
    """
    prompts, targets = shapes_prompts(num_prompts, seed=seed)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    targets = [t for t in targets for _ in range(num_per_prompt)]
    kwargs = dict(
        sampler=sampler, num_samples=len(prompts), seed=seed, batch_size=batch_size, prompts=prompts
    )
    return {
        str(float(scale)): attribute_adherence(
            detect_shapes(generate_all(model, guidance_scale=scale, **kwargs)), targets
        )
        for scale in guidance_scales
    }


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per guidance scale, one column per attribute."""
    cols = list(next(iter(results.values())))
    lines = ["| guidance | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for scale, row in results.items():
        lines.append(f"| {scale} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """python -m diffusion_lab.metrics.adherence CKPT [--guidance 1 3 5] [--sampler NAME --steps K]."""
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.diffusion import get_sampler

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ckpt", help="a shapes text-to-image checkpoint (diffusion_lab.train)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    model, _ = load_system(args.ckpt)
    results = prompt_adherence(
        model,
        sampler=get_sampler(args.sampler, steps=args.steps),
        guidance_scales=args.guidance,
        num_prompts=args.prompts,
        num_per_prompt=args.per_prompt,
        seed=args.seed,
    )
    print(format_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
