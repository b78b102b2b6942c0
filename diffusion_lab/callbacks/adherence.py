"""At the end of training: prompt adherence of a shapes text-to-image model at several guidance scales."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from diffusion_lab.callbacks.sampling import PeriodicSampling
from diffusion_lab.metrics.adherence import format_table, prompt_adherence


class PromptAdherence(PeriodicSampling):
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
        super().__init__(sampler=sampler, seed=seed)
        self.guidance_scales = [float(s) for s in guidance_scales]
        self.num_prompts = num_prompts
        self.num_per_prompt = num_per_prompt
        self.summary: dict = {}

    def measure(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        results = prompt_adherence(
            model,
            sampler=self.sampler,
            guidance_scales=self.guidance_scales,
            num_prompts=self.num_prompts,
            num_per_prompt=self.num_per_prompt,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        rank_zero_info(
            "prompt adherence (share of samples whose detected attribute matches the prompt):\n"
            + format_table(results)
        )
        self.summary = {
            "prompt_adherence": results,
            "prompt_adherence_sampler": getattr(self.sampler, "name", ""),
        }
        return {f"eval/adherence_{k}@{s}": v for s, row in results.items() for k, v in row.items()}
