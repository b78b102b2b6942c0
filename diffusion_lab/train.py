"""Training entry point: `python -m diffusion_lab.train [experiment=NAME] [overrides]` (Hydra)."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
from diffusion_lab.callbacks.preemption import GracefulStop, Interrupted
from diffusion_lab.callbacks.random_state import RandomState
from diffusion_lab.callbacks.run_config import RunConfig
from diffusion_lab.checkpoints import CheckpointError, check_resume, trust_from_config
from diffusion_lab.cli import exit_on_user_error
from diffusion_lab.config_types import check_config
from diffusion_lab.console import print_config_tree, quiet
from diffusion_lab.files import ensure_writable_dir
from diffusion_lab.imports import ConfigError
from diffusion_lab.instantiate import (
    build_callbacks,
    build_loggers,
    check_model_fits_data,
    check_multirun_launch,
    default_progress_bar,
    finish_wandb,
    log_hyperparameters,
    log_summary,
    summary_figures,
    sweep_info,
)
from diffusion_lab.renamed import exit_on_renamed
from diffusion_lab.run_folder import (
    AlreadyFinished,
    RunFolderError,
    RunLock,
    keep_hydra_records,
    launched_as_rank_zero,
    merge_summary,
    plan_resume,
    restore_hydra_records,
    write_summary,
)

log = logging.getLogger(__name__)


@trust_from_config  # trust_checkpoint=true: ckpt_path / auto_resume / *_ckpt read with full unpickling
def train(
    cfg: DictConfig, *, extra_callbacks: list[L.Callback] | None = None, multirun: bool = False
) -> dict[str, Any]:
    """Fit the configured system (`run_training`) while this process owns the run folder: a second run started in
    the same folder stops with one line instead of mixing its checkpoints and records into this one's."""
    out_dir = ensure_writable_dir(cfg.paths.output_dir, "run folder")
    lock = None
    try:  # a refused command leaves the folder's Hydra records describing the run in it, not itself
        lock = RunLock(out_dir).acquire() if launched_as_rank_zero() else None
        return run_training(cfg, extra_callbacks=extra_callbacks, multirun=multirun)
    except (RunFolderError, ConfigError, CheckpointError):
        restore_hydra_records(out_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def run_training(
    cfg: DictConfig, *, extra_callbacks: list[L.Callback] | None = None, multirun: bool = False
) -> dict[str, Any]:
    """Fit the configured system; write the last checkpoint and `summary.json` into the run dir (rank 0)."""
    start = time.time()
    out_dir = ensure_writable_dir(cfg.paths.output_dir, "run folder")
    config = OmegaConf.to_container(cfg, resolve=True)
    check_config(config)  # wrong types, unknown keys: one line
    check_run_keys(config)
    if cfg.get("print_config", True):
        show_config(config, out_dir)
    try:  # ckpt_path, or the folder's newest checkpoint with auto_resume; records rewound to it
        resume = plan_resume(
            out_dir,
            ckpt_path=cfg.get("ckpt_path"),
            auto_resume=cfg.get("auto_resume", False),
            max_steps=int(cfg.trainer.get("max_steps", -1)),
            rank_zero=launched_as_rank_zero(),
        )
    except AlreadyFinished as done:
        log.info("%s", done)
        restore_hydra_records(out_dir)
        return json.loads((out_dir / "summary.json").read_text())
    ckpt_path = str(resume.path) if resume else None
    max_steps = int(cfg.trainer.get("max_steps", -1))
    completing = resume is not None and 0 < max_steps <= resume.step  # only the end-of-run work is left
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    check_model_fits_data(model, datamodule)  # image size the net cannot halve, too few classes: one line
    if ckpt_path:  # a different architecture fails here, listing the differing config keys
        model_config = OmegaConf.to_container(cfg.model, resolve=True)
        for diff in check_resume(ckpt_path, model=model, model_config=model_config):
            log.warning("resuming with a changed model config: %s", diff)
    # signals save last.ckpt after the current step and exit 128 + signal; the final last.ckpt is written
    # as training ends (first callback: before EMA swaps the EMA weights in and before the end-of-run evaluation)
    stop = GracefulStop(dirpath=out_dir / "checkpoints")
    callbacks = [stop.final_checkpoint, *build_callbacks(cfg)]
    callbacks.append(RunConfig(config=OmegaConf.to_container(cfg, resolve=True)))
    callbacks.append(RandomState())  # global RNG states in checkpoints: a resumed run draws the same noise
    callbacks.extend(extra_callbacks or [])
    callbacks.extend(default_progress_bar(cfg, callbacks))
    callbacks.append(stop)  # last: its step-end save comes after the EMA update
    if completing:
        callbacks.append(CompleteRun())
    loggers = build_loggers(cfg, sweep=sweep_info())
    # every checkpoint write is atomic (temp file + fsync + rename) and refuses NaN weights
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir), **plugins
    )
    if multirun:
        check_multirun_launch(trainer)
    log_hyperparameters(loggers, config, model=model, datamodule=datamodule)

    fit_or_interrupt(trainer, model, datamodule=datamodule, ckpt_path=ckpt_path)

    last = out_dir / "checkpoints" / "last.ckpt"
    _save_final(trainer, model, last, raw=stop.final_checkpoint.raw_state)
    summary = run_summary(
        cfg, trainer, [model, *callbacks], out_dir=out_dir, start=start, ckpt_path=ckpt_path
    )
    if trainer.is_global_zero:  # a run resumed into its folder keeps the earlier figures (`earlier`)
        summary = merge_summary(out_dir / "summary.json", summary)
        write_summary(out_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "earlier"}))
        log_summary(trainer.loggers, summary, params=config, step=trainer.global_step)
    finish_wandb()
    return summary


def run_summary(
    cfg: DictConfig, trainer: L.Trainer, parts: list, *, out_dir: Path, start: float, ckpt_path: str | None
) -> dict[str, Any]:
    """What `summary.json` records of a finished fit: steps, time, final losses, val / eval figures and what the
    system and callbacks contribute (`parts`' `summary`)."""
    summary: dict[str, Any] = {
        "task_name": cfg.get("task_name"),
        "output_dir": str(out_dir),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "wall_seconds": round(time.time() - start, 2),
        "final_train_loss": _float(trainer.callback_metrics.get("train/loss")),
        "final_val_loss": _float(trainer.callback_metrics.get("val/loss")),
        "last_checkpoint": str(out_dir / "checkpoints" / "last.ckpt"),
        "resumed_from": ckpt_path,
    }
    summary.update(
        {k: _float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(("val/", "eval/"))}
    )
    for part in parts:  # systems and callbacks may contribute (scale factor, grids, accuracy)
        summary.update(getattr(part, "summary", None) or {})
    return summary


def check_run_keys(config: dict[str, Any]) -> None:
    """ConfigError (one line) naming the key, for the top-level keys no constructor checks (`seed`, `print_config`,
    `auto_resume`) and the trainer values whose Lightning message does not name theirs (`trainer.max_time`;
    `trainer.max_steps=0`, which would train nothing)."""
    seed = config.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed={seed!r} must be an integer (or null for a random one)")
    for key in ("print_config", "auto_resume"):
        if not isinstance(config.get(key, False), bool):
            raise ConfigError(f"{key} must be true or false, got {config[key]!r}")
    max_time = (config.get("trainer") or {}).get("max_time")
    if isinstance(max_time, str) and not re.fullmatch(r"\d+:\d+:\d+:\d+", max_time.strip()):
        raise ConfigError(
            f"trainer.max_time={max_time!r} is not a duration: give DD:HH:MM:SS, e.g. 00:12:00:00"
        )
    steps = (config.get("trainer") or {}).get("max_steps", -1)
    if isinstance(steps, int) and not isinstance(steps, bool) and (steps == 0 or steps < -1):
        raise ConfigError(
            f"trainer.max_steps={steps} is not a number of steps: give one >= 1 (or -1 for an end set by"
            " trainer.max_epochs / trainer.max_time)"
        )


class CompleteRun(L.Callback):
    """Resuming a run whose checkpoint is already at `trainer.max_steps` (it was stopped during its end-of-run
    work): Lightning's fit loop, restored at its end, would skip everything, hooks included; this runs the
    `on_train_start` / `on_train_end` hooks of the callbacks and the module in its place, once the checkpoint's
    state is restored, as the end of training would have (final checkpoint, grids, accuracy)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.trainer import call

        loop = trainer.fit_loop
        run = loop.run

        def run_or_complete() -> None:
            loop.setup_data()
            if not loop.done:
                return run()
            for hook in ("on_train_start", "on_train_end"):
                call._call_callback_hooks(trainer, hook)
                call._call_lightning_module_hook(trainer, hook)

        loop.run = run_or_complete


@rank_zero_only
def show_config(config: dict[str, Any], out_dir: Path) -> None:
    """Print the composed config as a tree (rich) and save it as `<run>/config_tree.log` (rank 0)."""
    print_config_tree(config, save_to=out_dir / "config_tree.log")


def optimized_value(summary: dict[str, Any], name: str | None, *, required: bool) -> float | None:
    """`summary[name]` as a float, what `main` returns for a sweeper to optimise (`optimized_metric`). A missing
    or non-numeric value is an error in a sweep (`required`), else None."""
    if not name:
        return None
    value = summary.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if required:
        numbers = ", ".join(sorted(summary_figures(summary))) or "none"
        raise ValueError(f"optimized_metric={name!r} is not a number in summary.json; its numbers: {numbers}")
    return None


def fit_or_interrupt(trainer: L.Trainer, model: L.LightningModule, **kwargs: Any) -> None:
    """`trainer.fit`, where a stop on SIGTERM never exits 0: Lightning's own handling (a SIGTERM before
    GracefulStop took over the signals) raises a SystemExit with code 0; it becomes `Interrupted` (143)."""
    try:
        trainer.fit(model, **kwargs)
    except SIGTERMException as e:
        raise Interrupted(signal.SIGTERM, f"stopped by SIGTERM at step {trainer.global_step}") from e


def _save_final(trainer: L.Trainer, model: L.LightningModule, path, *, raw: dict | None) -> None:
    """Save `last.ckpt` with the raw weights in the module (EMA keeps its own copy), then restore the EMA ones."""
    if raw is None or not any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
        trainer.save_checkpoint(path, weights_only=False)
        return
    ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(raw)
    try:
        trainer.save_checkpoint(path, weights_only=False)
    finally:
        model.load_state_dict(ema_state)


def _float(x) -> float | None:
    return None if x is None else float(x)


class RunDirCheck(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): creates `hydra.run.dir` / `hydra.sweep.dir` (as Hydra would next;
    `${now:...}` is cached, so it is the same folder) and ends in one line and exit 1 when that fails, instead of
    Hydra's traceback; keeps the `.hydra/` records already there, for a refused command to put back."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")
        self._keep(config, [Path(config.hydra.run.dir)])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
        self._keep(config, [p for p in Path(config.hydra.sweep.dir).iterdir() if p.is_dir()])

    @staticmethod
    def _check(path: str, key: str) -> None:
        try:
            ensure_writable_dir(path, f"run folder ({key})")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _keep(config: DictConfig, folders: list[Path]) -> None:
        """Keep the Hydra records already there (Hydra rewrites them before the job runs; a refusal restores them)."""
        if config.hydra.get("output_subdir") is not None:
            keep_hydra_records(folders, str(config.hydra.output_subdir))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # bad input ends with one line `error: <cause>` and exit code 1 (DIFFUSION_LAB_TRACEBACK=1: full traceback)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN  # a failed sweep job must not end the other jobs
    quiet()
    with exit_on_user_error((InstantiationException, OmegaConfBaseException), reraise=sweep):
        try:
            summary = train(cfg, multirun=sweep)
        except BaseException:
            finish_wandb(exit_code=1)  # the sweep's next job starts a run of its own
            raise
        # what a sweeper (Optuna) optimises: a quality figure, not the loss (its scale depends on the objective);
        # a grid sweep (Hydra's basic sweeper) of runs without that figure is fine
        optimizing = sweep and not str(HydraConfig.get().sweeper.get("_target_", "")).endswith("BasicSweeper")
        return optimized_value(summary, cfg.get("optimized_metric"), required=optimizing)


if __name__ == "__main__":
    exit_on_renamed(sys.argv[1:])
    main()
