"""The one optimizer + per-step LR scheduler set-up shared by the single-optimizer systems."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def build_optimizers(
    module: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    lr_scheduler: Callable[..., Any] | None = None,
):
    """`configure_optimizers` output: the partial optimizer over trainable params, the scheduler stepped per step."""
    opt = optimizer(params=[p for p in module.parameters() if p.requires_grad])
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=opt), "interval": "step"}}
