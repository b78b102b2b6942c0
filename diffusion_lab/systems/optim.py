"""The one optimizer + per-step LR scheduler set-up shared by the single-optimizer systems, and its LR schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)


def warmup_cosine(progress: float, *, warmup: float, start_factor: float, end_factor: float) -> float:
    """LR factor at `progress` in [0, 1]: linear warm-up from `start_factor` over the first `warmup` of the run,
    then a half cosine down to `end_factor` at 1 (the shape of OneCycleLR, Smith & Topin 2019, without momentum)."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return start_factor + (1.0 - start_factor) * p / warmup
    if warmup >= 1.0:
        return 1.0
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))


class WarmupCosineLR(LRScheduler):
    """Warm-up + cosine decay over a planned horizon that is re-planned on resume, never restored.

    The LR is a pure function of the run's progress: `step / total_steps`, or, for a run limited by
    `trainer.max_time`, the elapsed share of that time when it is further along (so a time-limited run ends
    where the schedule ends). `build_optimizers` plans the horizon from the trainer (`plan`); resuming restores
    only the step counter, so a larger `trainer.max_steps` stretches the curve to the new end, and the peak LR
    is the configured optimizer LR, also when it differs from the checkpoint's (both changes are logged).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | None = None,
        warmup: float = 0.1,
        start_factor: float = 0.04,
        end_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup is a share of the run in [0, 1], got {warmup}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(
                f"total_steps must be >= 1 (or null: planned from the trainer), got {total_steps}"
            )
        self.total_steps = total_steps
        self.warmup = warmup
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.time_fraction: Callable[[], float] | None = None
        super().__init__(optimizer, last_epoch=last_epoch)

    def plan(self, *, total_steps: float | None, time_fraction: Callable[[], float] | None = None) -> None:
        """Set the horizon: a number of optimizer steps (inf or None: unbounded) and/or a clock returning the
        elapsed share of a time limit. A schedule needs at least one of them."""
        finite = total_steps is not None and math.isfinite(total_steps) and total_steps > 0
        if not finite and time_fraction is None:
            raise ValueError(
                "the LR schedule needs an end: set trainer.max_steps, trainer.max_epochs or trainer.max_time"
                " (or model.lr_scheduler=null for a constant LR)"
            )
        self.total_steps = int(total_steps) if finite else None
        self.time_fraction = time_fraction
        self._apply()

    def progress(self) -> float:
        steps = self.last_epoch / self.total_steps if self.total_steps else 0.0
        return max(steps, self.time_fraction() if self.time_fraction is not None else 0.0)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(
            self.progress(), warmup=self.warmup, start_factor=self.start_factor, end_factor=self.end_factor
        )
        return [base * factor for base in self.base_lrs]

    def _apply(self) -> None:
        """Write the LR of the current step into the optimizer (after planning or restoring)."""
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "time_fraction")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter only (also from another scheduler's state, e.g. OneCycleLR's); the plan and
        the peak LR stay those of this run's config, and the optimizer gets this step's LR."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        saved_total = state_dict.get("total_steps")
        if saved_total is not None and self.total_steps is not None and saved_total != self.total_steps:
            log.warning(
                "LR schedule re-planned: %d steps now, %d in the checkpoint (resumed at step %d)",
                self.total_steps,
                saved_total,
                self.last_epoch,
            )
        for group, base, saved in zip(
            self.optimizer.param_groups, self.base_lrs, state_dict.get("base_lrs", [])
        ):
            group["initial_lr"] = base  # the optimizer state just restored the checkpoint's
            if not math.isclose(base, saved, rel_tol=1e-9):
                log.warning(
                    "learning rate: the config's %g replaces the checkpoint's %g (peak of the schedule)",
                    base,
                    saved,
                )
        self._apply()


def trainer_horizon(module: nn.Module) -> tuple[float | None, Callable[[], float] | None]:
    """(optimizer steps the attached trainer will take — inf when unbounded, elapsed share of its time limit or
    None); (None, None) outside a trainer."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None, None
    from lightning.pytorch.callbacks import Timer

    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    time_fraction = None
    if timer is not None and timer.time_remaining("train") is not None:

        def time_fraction() -> float:
            elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
            fraction = elapsed / max(elapsed + remaining, 1e-9)
            if (
                trainer.world_size > 1
            ):  # every rank must step the same LR: rank 0's clock (ranks step together)
                fraction = trainer.strategy.broadcast(fraction, src=0)
            return fraction

    steps = trainer.max_steps if trainer.max_steps > 0 else math.inf
    if trainer.max_epochs not in (None, -1):  # epochs x batches (and max_steps when smaller)
        steps = trainer.estimated_stepping_batches
    return steps, time_fraction


def build_optimizers(
    module: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    lr_scheduler: Callable[..., Any] | None = None,
):
    """`configure_optimizers` output: the partial optimizer over trainable params, the scheduler stepped per step
    (a `WarmupCosineLR` without `total_steps` is planned from the trainer: max_steps, max_epochs, max_time)."""
    opt = optimizer(params=[p for p in module.parameters() if p.requires_grad])
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(optimizer=opt)
    if isinstance(scheduler, WarmupCosineLR) and (
        scheduler.total_steps is None or getattr(module, "_trainer", None)
    ):
        steps, time_fraction = trainer_horizon(module)
        scheduler.plan(total_steps=scheduler.total_steps or steps, time_fraction=time_fraction)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
