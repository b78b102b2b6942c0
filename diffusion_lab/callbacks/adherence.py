"""At the end of training: prompt adherence of a shapes text-to-image model at several guidance scales."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from diffusion_lab.callbacks.ema import averaged_module
from diffusion_lab.metrics.adherence import format_table, prompt_adherence


class PromptAdherence(Callback):
    """Writes `prompt_adherence` {scale: {colour, shape, size, position, all}} into the run summary and logger."""

    def __init__(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        guidance_scales: Sequence[float] = (1.0, 3.0, 5.0),
        num_prompts: int = 30,
        num_per_prompt: int = 4,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.guidance_scales = [float(s) for s in guidance_scales]
        self.num_prompts = num_prompts
        self.num_per_prompt = num_per_prompt
        self.seed = seed
        self.summary: dict = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    @rank_zero_only
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        model = averaged_module(trainer, pl_module)
        results = prompt_adherence(
            model,
            sampler=self.sampler,
            guidance_scales=self.guidance_scales,
            num_prompts=self.num_prompts,
            num_per_prompt=self.num_per_prompt,
            seed=self.seed,
        )
        rank_zero_info(
            "prompt adherence (share of samples whose detected attribute matches the prompt):\n"
            + format_table(results)
        )
        self.summary = {
            "prompt_adherence": results,
            "prompt_adherence_sampler": getattr(self.sampler, "name", ""),
        }
        metrics = {f"eval/adherence_{k}@{s}": v for s, row in results.items() for k, v in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return self.summary
