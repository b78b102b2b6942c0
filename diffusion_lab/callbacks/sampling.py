"""The one base of the callbacks that sample during training: when, from which weights, on which ranks, to where."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lab.callbacks.ema import averaged_module
from diffusion_lab.generate import generate, generate_all

PERIODIC_ARGS = ("sampler", "every_n_steps", "on_train_end", "guidance_scale", "seed", "batch_size")


def periodic_args(args: dict[str, Any]) -> dict[str, Any]:
    """The PeriodicSampling arguments among a subclass constructor's `locals()`."""
    return {k: args[k] for k in PERIODIC_ARGS if k in args}


class PeriodicSampling(Callback):
    """Runs `measure(trainer, model)` on the EMA weights (`averaged_module`) every `every_n_steps` (None: never)
    and when training ends (`on_train_end`), at most once per step; on rank 0 only, or on every rank when
    `all_ranks` (a metric whose samples are split across DDP ranks). The numbers it returns go to every logger
    at that step (from rank 0); images go through `images.log_image`. Samples come from the one generation
    loop (`diffusion_lab.generate`) with this callback's sampler, seed, guidance scale and batch size.
    """

    all_ranks = False

    def __init__(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        every_n_steps: int | None = None,
        on_train_end: bool = True,
        guidance_scale: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.log_on_train_end = on_train_end
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.batch_size = batch_size
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every and step > 0 and step % every == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.log_on_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Measure now (this rank, if it takes part) and log the numbers; returns them."""
        self._last_step = trainer.global_step
        if not (self.all_ranks or trainer.is_global_zero):
            return {}
        metrics = self.measure(trainer, averaged_module(trainer, pl_module))
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def measure(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        """Sample and score (or write); the metrics to log, e.g. {"eval/fid_random": 12.3}."""
        raise NotImplementedError

    def draw(
        self,
        model,
        *,
        num_samples: int,
        labels: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
        trainer: L.Trainer | None = None,
    ):
        """This callback's fixed-seed samples: all of them (a tensor on the CPU), or with `trainer` (all_ranks)
        this rank's chunks, as `generate`'s (start, stop, images) iterator."""
        kwargs = dict(
            sampler=self.sampler,
            num_samples=num_samples,
            seed=self.seed,
            batch_size=self.batch_size,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            labels=labels,
            prompts=prompts,
        )
        if trainer is None:
            return generate_all(model, progress=True, **kwargs)
        rank, world = trainer.global_rank, trainer.world_size
        return generate(model, rank=rank, world_size=world, progress=trainer.is_global_zero, **kwargs)
