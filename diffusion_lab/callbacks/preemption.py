"""Stop on SIGTERM / SIGINT / SLURM's warning signal without losing work: finish the step, save, exit 128 + signal."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class Interrupted(SystemExit):
    """The run stopped on a signal after saving `last.ckpt`; the exit code is 128 + the signal number (shells'
    convention: 143 for SIGTERM, 130 for SIGINT), so schedulers see that the job did not finish."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def _signal(name: str | int) -> signal.Signals:
    try:
        return signal.Signals(name) if isinstance(name, int) else signal.Signals[name.upper()]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {name!r}: give e.g. SIGUSR1") from None


class GracefulStop(Callback):
    """On SIGTERM, SIGINT or `requeue_signal`: finish the current optimizer step, write `<dirpath>/last.ckpt`
    (atomically, through the trainer's CheckpointIO) and raise `Interrupted` (exit 128 + signal) before the
    next step. A resumed run continues from that step exactly as an uninterrupted one would.

    The checkpoint is taken where Lightning's periodic ones are (at the end of the step, after the EMA update),
    the state an exact resume is tested from; Lightning's own SIGTERM handling stops one hook later, which saves
    nothing and exits 0. A second Ctrl-C stops at once without saving. With several processes the decision is
    shared each step, so every rank stops after the same step (a signal may reach rank 0 only).

    `requeue_signal` (SLURM's `--signal=USR1@90`, Lightning's SLURMEnvironment default): after saving, rank 0
    requeues the job with `scontrol requeue` when `requeue` and the process runs under SLURM; the requeued job
    continues from `last.ckpt` with `auto_resume=true`. Place this callback last; `final_checkpoint` first.
    """

    def __init__(
        self, *, dirpath: str | os.PathLike, requeue_signal: str | None = "SIGUSR1", requeue: bool = True
    ):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.requeue_signal = _signal(requeue_signal) if requeue_signal else None
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.final_checkpoint = FinalCheckpoint(stop=self)
        self._phase = "setup"  # setup -> train -> end (final checkpoint written)
        self._stop_before_next_step = False
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def signals(self) -> list[signal.Signals]:
        out = [signal.SIGTERM, signal.SIGINT]
        return out + ([self.requeue_signal] if self.requeue_signal and self.requeue_signal not in out else [])

    # ------------------------------------------------------------------------------------ handlers
    def _install(self) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                log.warning(
                    "cannot catch %s outside the main thread: a signal ends this run unsaved", sig.name
                )
                return

    def _restore(self) -> None:
        """Give back the handlers found at `_install`, where ours is still in place (Lightning's teardown, before
        or after this, puts back the ones from before training)."""
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) != self._handle:
                continue
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self._phase == "end":  # training is over and saved: stop the end-of-run evaluation at once
            raise Interrupted(
                sig, f"{sig.name} during the end-of-run evaluation; {self.dirpath / LAST} is complete"
            )
        if self.received is None:
            self.received = sig
            log.warning("%s received: stopping after this step and saving %s", sig.name, self.dirpath / LAST)
        elif sig == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait for the step
            self._restore()
            message = "a second SIGINT: stopped at once, without saving this step"
            log.warning(message)
            raise Interrupted(sig, message)  # exit 130; Lightning turns a KeyboardInterrupt into exit 1

    # ------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase = "train"
        self._install()  # after Lightning's own SIGTERM handler (registered just before): ours replaces it
        if (
            trainer.received_sigterm and self.received is None
        ):  # it came in while Lightning's handler was in place
            self.received = signal.SIGTERM

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self._stop_before_next_step:
            return
        self.received = self.received or signal.SIGTERM  # another rank's signal
        trainer.save_checkpoint(self.dirpath / LAST, weights_only=False)
        self._stop_before_next_step = True
        if self.requeue and self.received == self.requeue_signal and trainer.is_global_zero:
            requeue_slurm_job()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        if self._stop_before_next_step:  # the step's metrics are logged by now
            raise self._interrupted(trainer)

    def training_finished(self, trainer: L.Trainer) -> None:
        """Called by `FinalCheckpoint` once the final `last.ckpt` is written."""
        if self.received is not None:
            raise self._interrupted(trainer)
        self._phase = "end"

    def _interrupted(self, trainer: L.Trainer) -> Interrupted:
        sig = self.received or signal.SIGTERM
        message = (
            f"stopped by {sig.name} at step {trainer.global_step}: saved {self.dirpath / LAST}; continue with"
            f" auto_resume=true (same hydra.run.dir) or ckpt_path={self.dirpath / LAST}"
        )
        log.warning(message)
        return Interrupted(sig, message)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


class FinalCheckpoint(Callback):
    """Writes `last.ckpt` the moment training ends, before the EMA weights replace the raw ones in the module and
    before the end-of-run evaluation (grids, accuracy), so a signal or a kill during that evaluation loses no
    training; keeps the raw weights (`raw_state`) for train.py's final save. From then on every checkpoint
    records `callbacks["FinalCheckpoint"]["training_finished"] = True`. Place it first; `GracefulStop` creates it.
    """

    def __init__(self, *, stop: GracefulStop) -> None:
        super().__init__()
        self.stop = stop
        self.finished = False
        self.raw_state: dict | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finished = True
        self.raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        trainer.save_checkpoint(self.stop.dirpath / LAST, weights_only=False)
        self.stop.training_finished(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"training_finished": self.finished}


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (array task), as Lightning's SLURM auto-requeue does; logs the outcome."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.info("not a SLURM job: nothing to requeue")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("requeueing SLURM job %s failed: %s", job, e)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s: it continues from the last checkpoint with auto_resume=true", job)
    else:
        log.warning(
            "requeueing SLURM job %s failed (exit %d): %s", job, result.returncode, result.stderr.strip()
        )
