"""EMA of the weights from the first step, with a warm-up (on Lightning's EMAWeightAveraging), and access to it."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging


def warmup_decay(step: int, *, decay: float, gamma: float, power: float) -> float:
    """EMA decay after `step` averaged steps: min(decay, 1 - (1 + step / gamma)^-power) (the warm-up of
    Tan & Le's EfficientNet EMA as in diffusers' EMAModel); 0 at step 0, i.e. the first update copies."""
    return min(decay, 1.0 - (1.0 + step / gamma) ** -power)


class WarmupEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging updated from the first optimizer step, its decay warming up from 0 to
    `decay` (`warmup_decay`): no checkpoint, preview grid or sample ever comes from un-averaged initial weights.

    Before `update_starting_at_step` the average follows the raw weights exactly (decay 0); the warm-up counts
    from there. The decay depends on the step only, so a resumed run averages exactly as an uninterrupted one.
    """

    def __init__(
        self,
        *,
        decay: float = 0.999,
        gamma: float = 1.0,
        power: float = 0.75,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if gamma <= 0 or power <= 0:
            raise ValueError(f"gamma and power must be > 0, got gamma={gamma}, power={power}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=None,
        )
        self._kwargs["avg_fn"] = self._average
        self.decay, self.gamma, self.power = decay, gamma, power
        self.start_step = update_starting_at_step
        self.current_decay = 0.0

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or not super().should_update(step_idx=step_idx):
            return False
        since = step_idx - self.start_step
        self.current_decay = (
            0.0 if since < 0 else warmup_decay(since, decay=self.decay, gamma=self.gamma, power=self.power)
        )
        return True

    def _average(
        self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        if not averaged.is_floating_point():  # counters (BatchNorm's num_batches_tracked): the current value
            return current
        return torch.lerp(current, averaged, self.current_decay)


def has_average(callback: WeightAveraging) -> bool:
    """Whether the callback's average holds at least one update (Lightning's averages start as a copy of the
    initial weights and stay so until `update_starting_at_step`)."""
    model = getattr(callback, "_average_model", None)
    return model is not None and int(model.n_averaged) > 0


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of `pl_module` when a WeightAveraging callback holds an average, else `pl_module` itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and has_average(cb):
            return cb._average_model.module
    return pl_module
