"""A training progress bar over optimizer steps (step / max_steps, loss, it/s) that does not restart each epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting `trainer.global_step` up to `trainer.estimated_stepping_batches`.

    Diffusion runs are budgeted in steps (`trainer.max_steps`), not epochs: one bar for the whole run, its
    postfix the logged `prog_bar` metrics (the training loss), resumed runs starting at their step.
    Validation keeps Lightning's own bar."""

    @property
    def train_description(self) -> str:
        return "train"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.init_train_tqdm()
        total = trainer.estimated_stepping_batches
        bar.reset(total=None if math.isinf(total) else int(total))
        bar.initial = bar.n = trainer.global_step
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for all epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: the run folder says it
        return metrics
