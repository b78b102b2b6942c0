"""Sample a fixed-noise grid (one row per class or per prompt, guided) every N steps from the EMA weights."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import averaged_module
from diffusion_lab.diffusion.samplers import Sampler
from diffusion_lab.images import log_image, save_grid


class ImageLogger(Callback):
    """Writes `<run>/samples/step_XXXXXX.png` (and to the logger). Class models: row k = class k.

    Text models: row k = `prompts[k]` (default: the first 8 validation captions), listed in `step_XXXXXX.txt`.
    """

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
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if (
            steps is not None
        ):  # preview grids with fewer steps than the run's sampler (same sampler otherwise)
            if not isinstance(sampler, Sampler):
                raise TypeError(
                    f"steps= needs a registered sampler (get_sampler), got {type(sampler).__name__}"
                )
            sampler = dataclasses.replace(sampler, steps=steps)
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.log_on_train_end = on_train_end
        self.prompts = list(prompts) if prompts else None
        self.paths: list[str] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.log_on_train_end and trainer.global_step != self._last_step:
            self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        self._last_step = trainer.global_step
        model = averaged_module(trainer, pl_module)
        prompts = self.prompts
        if prompts is None and getattr(model, "is_text_conditional", False):
            prompts = default_prompts(trainer.datamodule)
        images, nrow = sample_grid(
            model,
            sampler=self.sampler,
            num_samples=self.num_samples,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            prompts=prompts,
            progress=True,
        )
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:06d}.png"
        save_grid(images, path, nrow=nrow)
        if prompts and getattr(model, "is_text_conditional", False):
            path.with_suffix(".txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(prompts)))
        self.paths.append(str(path))
        log_image(trainer.loggers, "samples", path, step=trainer.global_step)
        return path

    @property
    def summary(self) -> dict:
        return {"sample_grids": list(self.paths)}


def sample_grid(
    model,
    *,
    sampler: Callable[..., torch.Tensor],
    num_samples: int,
    guidance_scale: float,
    seed: int,
    class_labels: list[int] | None = None,
    prompts: list[str] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Fixed-seed samples for a grid: one row per prompt (text models) or per class, else a square grid."""
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    cond = {}
    if prompts and getattr(model, "is_text_conditional", False):
        per_row = max(1, num_samples // len(prompts))
        cond = model.encode_prompts([p for p in prompts for _ in range(per_row)])
        n, nrow = len(prompts) * per_row, per_row
    elif getattr(model, "num_classes", None) is not None:
        k = model.num_classes
        classes = list(range(k)) if class_labels is None else list(class_labels)
        per_row = max(1, num_samples // len(classes))
        labels = torch.tensor(classes, device=device).repeat_interleave(per_row)
        cond = {"class_labels": labels}
        n, nrow = len(labels), per_row
    else:
        n, nrow = num_samples, max(1, int(math.sqrt(num_samples)))
    images = model.sample(
        sampler=sampler,
        num_samples=n,
        cond=cond,
        guidance_scale=guidance_scale,
        generator=g,
        progress=progress,
    )
    return images, nrow


def default_prompts(datamodule, n: int = 8) -> list[str]:
    """The first n fixed validation captions of the data module (the empty caption when there are none)."""
    val = getattr(datamodule, "val_set", None)
    if val is None or getattr(val, "captioner", None) is None:
        return [""]
    return [val.caption(i) for i in range(min(n, len(val)))]
