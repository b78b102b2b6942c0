"""Access to the EMA weights kept by Lightning's EMAWeightAveraging (the EMA itself is Lightning's)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, WeightAveraging


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of `pl_module` when a WeightAveraging callback holds one, else `pl_module` itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb._average_model.module
    return pl_module


class KeepRawWeights(Callback):
    """Stashes the raw (non-EMA) weights when fit ends, before EMAWeightAveraging copies the EMA weights in.

    Place it first in the callback list. `train.py` puts the raw weights back around its final save, so
    `last.ckpt` of a finished run holds both (`state_dict` = EMA, `current_model_state` = raw) and resuming
    it continues from the raw weights, as resuming a mid-run checkpoint does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: dict | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
