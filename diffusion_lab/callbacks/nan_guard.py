"""Skip optimizer steps with a NaN/inf loss or gradient, count them, and stop after too many in a row."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because the loss or the gradients stayed non-finite for too many steps in a row."""


class NonFiniteGuard(Callback):
    """Drops the update of any optimizer step whose loss or gradient holds NaN/inf (logged as `train/skipped_steps`).

    The step still counts (global step and LR schedule advance, as with AMP's GradScaler), but the weights and
    the optimizer state are untouched: the gradients are set to None, which torch optimizers skip. After
    `max_consecutive_nonfinite` skipped steps in a row the run stops with NonFiniteTrainingError; since no
    update was applied, the weights (and any checkpoint written meanwhile) are those of the last good step.
    Under a GradScaler (precision 16-mixed) gradient overflow is the scaler's to handle, so only the loss is
    checked. With several devices the decision is shared, so every rank skips the same steps.
    """

    def __init__(self, *, max_consecutive_nonfinite: int = 10, check_gradients: bool = True) -> None:
        super().__init__()
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.check_gradients = check_gradients
        self.skipped = 0
        self.consecutive = 0
        self.last_good_step: int | None = None
        self._loss_finite: torch.Tensor | None = None
        self._stepped = False
        self._bad: str | None = None

    # ---------------------------------------------------------------- detection
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stepped, self._bad = False, None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_ok = self._loss_finite if self._loss_finite is not None else torch.ones((), dtype=torch.bool)
        self._loss_finite = None
        grad_ok = torch.ones((), dtype=torch.bool, device=loss_ok.device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.check_gradients and params and scaler is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            grad_ok = torch.isfinite(norm).to(loss_ok.device)
        flags = torch.stack([loss_ok.to(grad_ok.device), grad_ok]).cpu()  # the one host sync of the check
        bad = None if bool(flags.all()) else ("loss" if not flags[0] else "gradient")
        if trainer.world_size > 1:
            any_bad = trainer.strategy.reduce_boolean_decision(bad is not None, all=False)
            bad = bad or ("loss or gradient (on another device)" if any_bad else None)
        self._stepped = True
        if bad is not None:
            self._bad = self._bad or bad
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change

    # ---------------------------------------------------------------- counting / stopping
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:
            return
        step = trainer.global_step
        if self._bad is None:
            self.consecutive = 0
            self.last_good_step = step
        else:
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "step %d: non-finite %s, update skipped (%d in a row, %d in total)",
                step,
                self._bad,
                self.consecutive,
                self.skipped,
            )
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive_nonfinite:
            ckpt = trainer.checkpoint_callback
            last = (
                (getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")) if ckpt else ""
            )
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} steps in a row had a non-finite "
                f"{self._bad} (max_consecutive_nonfinite={self.max_consecutive_nonfinite}); their updates were "
                f"skipped, so the weights are those of step {self.last_good_step if self.last_good_step is not None else 0}"
                + (f"; last checkpoint: {last}" if last else "; no checkpoint was written yet")
                + f". {finite_checkpoint_advice(getattr(ckpt, 'dirpath', None))}"
            )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "last_good_step": self.last_good_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        # a resumed run starts its count afresh: it is resumed to try again (e.g. with a lower learning rate),
        # and the checkpoint's own non-finite steps would otherwise stop it at its first bad step
        self.consecutive = 0
        self.last_good_step = state_dict.get("last_good_step")

    @property
    def summary(self) -> dict:
        return {"skipped_steps": self.skipped}


def finite_checkpoint_advice(dirpath: str | None) -> str:
    """What to do after a blow-up: resume from the newest checkpoint in `dirpath` whose weights are all finite
    (with a lower learning rate), or, when none is, start again."""
    from pathlib import Path

    from diffusion_lab.checkpoints import CheckpointError, nonfinite_weights, read_checkpoint

    found = []
    for path in Path(dirpath).glob("*.ckpt") if dirpath else []:
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError:
            continue
        states = [ckpt.get(k) or {} for k in ("state_dict", "current_model_state")]
        if "global_step" in ckpt and not any(nonfinite_weights(s) for s in states):
            found.append((int(ckpt["global_step"]), path.stat().st_mtime_ns, path))
    if not found:
        return (
            "No checkpoint holds finite weights: start again with a lower learning rate, and check the data."
        )
    step, _, path = max(found)
    return (
        f"Resume from {path} (step {step}, the newest checkpoint with finite weights: ckpt_path={path}) with a"
        " lower learning rate (e.g. model.optimizer.lr), or check the data."
    )
