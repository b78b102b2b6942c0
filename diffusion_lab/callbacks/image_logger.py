"""Sample a fixed-noise grid (one row per class or per prompt, guided) every N steps from the EMA weights."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from diffusion_lab.callbacks.sampling import PeriodicSampling, periodic_args
from diffusion_lab.diffusion.samplers import Sampler
from diffusion_lab.images import log_image, save_grid


class ImageLogger(PeriodicSampling):
    """Writes `<run>/samples/step_XXXXXX.png` (and to every logger that takes images). Class models: row k = class
    k. Text models: row k = `prompts[k]` (default: the first 8 validation captions), listed in `step_XXXXXX.txt`.
    `steps`: the run's sampler with fewer steps (cheaper previews)."""

    def __init__(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        every_n_steps: int = 500,
        num_samples: int = 64,
        guidance_scale: float = 3.0,
        seed: int = 0,
        on_train_end: bool = True,
        prompts: list[str] | None = None,
        steps: int | None = None,
    ) -> None:
        if steps is not None:
            if not isinstance(sampler, Sampler):
                raise TypeError(
                    f"steps= needs a registered sampler (get_sampler), got {type(sampler).__name__}"
                )
            sampler = dataclasses.replace(sampler, steps=steps)
        super().__init__(**periodic_args(locals()))
        self.num_samples = num_samples
        self.prompts = list(prompts) if prompts else None
        self.paths: list[str] = []

    def measure(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:06d}.png"
        if model.is_text_conditional:
            prompts = self.prompts or default_prompts(trainer.datamodule)
            per_row = max(1, self.num_samples // len(prompts))
            draw = {"prompts": [p for p in prompts for _ in range(per_row)]}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(prompts)))
        elif model.num_classes is not None:
            per_row = max(1, self.num_samples // model.num_classes)
            draw = {"labels": torch.arange(model.num_classes).repeat_interleave(per_row)}
        else:
            per_row, draw = max(1, int(math.sqrt(self.num_samples))), {}
        n = len(next(iter(draw.values()))) if draw else self.num_samples
        save_grid(self.draw(model, num_samples=n, **draw), path, nrow=per_row)
        self.paths.append(str(path))
        log_image(trainer.loggers, "samples", path, step=trainer.global_step)
        return {}

    @property
    def summary(self) -> dict:
        return {"sample_grids": list(self.paths)}


def default_prompts(datamodule, n: int = 8) -> list[str]:
    """The first n fixed validation captions of the data module (the empty caption when there are none)."""
    val = getattr(datamodule, "val_set", None)
    if val is None or getattr(val, "captioner", None) is None:
        return [""]
    return [val.caption(i) for i in range(min(n, len(val)))]
