"""Access to the EMA weights kept by Lightning's EMAWeightAveraging (the EMA itself is Lightning's)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of `pl_module` when a WeightAveraging callback holds one, else `pl_module` itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb._average_model.module
    return pl_module
