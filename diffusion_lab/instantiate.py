"""What `train` builds from the config, beside it: callbacks, loggers (grouped by sweep), checks before fitting."""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig

from diffusion_lab.callbacks.progress import StepProgressBar
from diffusion_lab.imports import ConfigError
from diffusion_lab.nets.base import DenoisingNet


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every non-null entry of `cfg.callbacks` with a `_target_`."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"callbacks.{name} has no _target_")
        out.append(instantiate(node))
    return out


def build_loggers(cfg: DictConfig, *, sweep: dict[str, Any] | None = None) -> list:
    """The configured loggers; inside a sweep (`sweep_info()`) wandb runs are grouped by the sweep."""
    loggers = [
        instantiate(node, **sweep_logger_kwargs(node, sweep, task_name=cfg.get("task_name")))
        for node in (cfg.get("logger") or {}).values()
        if node is not None
    ]
    for lg in loggers:  # Lightning's WandbLogger passes anonymous=None, which wandb >= 0.19 warns about
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]
    return loggers


def sweep_info() -> dict[str, Any] | None:
    """The sweep folder, job number and overrides when this process runs a Hydra multirun job, else None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {
        "dir": hc.sweep.dir,
        "num": hc.job.num,
        "override_dirname": hc.job.override_dirname,
        "overrides": list(hc.overrides.task),
    }


def sweep_group(sweep_dir: str | Path) -> str:
    """A sweep's name in wandb: its folder's last two parts (`ablation_objective/2026-01-01_12-00-00`); evaluate
    gives the same name to evaluations of the sweep's checkpoints."""
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


def sweep_logger_kwargs(node: DictConfig, sweep: dict[str, Any] | None, *, task_name: str | None) -> dict:
    """WandbLogger arguments that group the jobs of one sweep: `group` = the sweep, `job_type` = the task,
    `name` = job number + overrides, only where the config leaves them unset (null, or the default name
    `${task_name}`); the job's overrides are added to the configured `tags`."""
    if sweep is None or not str(node.get("_target_", "")).endswith("WandbLogger"):
        return {}
    out: dict[str, Any] = {}
    if node.get("group") is None:
        out["group"] = sweep_group(sweep["dir"])
    if node.get("job_type") is None:
        out["job_type"] = task_name
    out["tags"] = [*(node.get("tags") or []), *(o[:64] for o in sweep["overrides"])]  # wandb: 64 characters
    if node.get("name") == task_name:
        out["name"] = f"{sweep['num']}_{sweep['override_dirname']}"[:128]
    return out


def default_progress_bar(cfg: DictConfig, callbacks: list[L.Callback]) -> list[L.Callback]:
    """[StepProgressBar()] unless the trainer shows no bar or a progress bar callback is configured."""
    if not cfg.trainer.get("enable_progress_bar", True) or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [StepProgressBar()]


def log_hyperparameters(loggers: list, config: dict[str, Any], *, model, datamodule) -> None:
    """The composed config, once, to every logger. Lightning would also log the system's (and data module's)
    `save_hyperparameters()` values as flat duplicate keys: that is switched off (what
    `save_hyperparameters(logger=False)` sets), the composed config holds them all."""
    for part in (model, datamodule):
        if hasattr(part, "_log_hyperparams"):
            part._log_hyperparams = False
    for lg in loggers:
        lg.log_hyperparams(config)


def summary_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a run summary (what goes into loggers' summaries / HParams)."""
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def log_summary(loggers: list, summary: dict[str, Any], *, params: dict[str, Any], step: int) -> None:
    """The run's final figures (summary.json's numbers) into every logger, after Lightning has finalized them:
    wandb's run summary; TensorBoard's HParams dashboard (`log_hyperparams(params, metrics)`, written once,
    here); other loggers (CSV, MLflow) as `summary/<name>` metrics at the last step."""
    figures = summary_figures(summary)
    if not figures:
        return
    prefixed = {f"summary/{k}": v for k, v in figures.items()}
    for lg in loggers:
        run_summary = getattr(lg.experiment, "summary", None)
        if callable(getattr(run_summary, "update", None)):  # wandb
            run_summary.update(figures)
            continue
        if "metrics" in inspect.signature(lg.log_hyperparams).parameters:  # TensorBoard
            lg.log_hyperparams(params, metrics=prefixed)
        else:
            lg.log_metrics(prefixed, step=step)
        lg.finalize("success")  # flush / close again


def finish_wandb(exit_code: int = 0) -> None:
    """End this process's wandb run, if one is open: Lightning leaves it open, and the next job of a sweep
    (same process) would log into it instead of starting its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def check_multirun_launch(trainer: L.Trainer) -> None:
    """Refuse DDP processes that Lightning would start itself inside a Hydra sweep job.

    Lightning's launcher re-runs `sys.argv` for ranks > 0: under `-m` each of them re-runs the whole sweep
    into another sweep folder, and joins whichever job reaches the rendezvous. Processes started from outside
    (SLURM through `hydra/launcher=slurm`, torchrun) are fine."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    env = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and not (
        env is not None and env.creates_processes_externally
    ):
        raise ValueError(
            f"a Hydra multirun (-m) with {trainer.world_size} DDP processes that Lightning would launch itself:"
            " it re-runs the command line for every rank, i.e. the whole sweep. Use hydra/launcher=slurm (SLURM"
            " starts the processes), or `torchrun --nproc_per_node=N -m diffusion_lab.train -m ..."
            " hydra.sweep.dir=<fixed>`, or one run per job without -m (README: Multiple GPUs and clusters)"
        )


def check_model_fits_data(model: torch.nn.Module, datamodule: Any) -> None:
    """ConfigError (one line) when the model cannot take the data: a UNet that cannot halve the input size as
    often as it has levels (the skip connections would not line up, or pixels be dropped), or fewer class
    embeddings than the data has classes (higher labels would index past the table or hit the null class)."""
    net = getattr(model, "net", None)
    shape = getattr(model, "sample_shape", None)
    if isinstance(net, DenoisingNet) and shape is not None:
        factor = net.input_multiple
        h, w = shape[-2:]
        if h % factor or w % factor:
            size = getattr(datamodule, "image_size", None)
            where = f"data.image_size={size} gives" if size == h else "the data gives"
            mult = (getattr(net, "init_kwargs", None) or {}).get("channel_mult")
            why = (
                f"which this UNet cannot halve {len(mult) - 1} time(s) (model.net.channel_mult={list(mult)})"
                if mult
                else f"which this {type(net).__name__} cannot cut into {factor}x{factor} patches"
                f" (model.net.patch_size={factor})"
            )
            raise ConfigError(
                f"{where} {h}x{w} inputs, {why}: use a multiple of {factor}, e.g. {-(-h // factor) * factor}"
            )
    ours, theirs = getattr(model, "num_classes", None), getattr(datamodule, "num_classes", None)
    if ours is not None and theirs is not None and ours < theirs:
        raise ConfigError(
            f"model.net.num_classes={ours} is smaller than the data's {theirs} classes (labels 0..{theirs - 1}):"
            f" set it to {theirs} (or null for an unconditional model)"
        )
    if ours is not None and theirs and ours > theirs:  # the extra classes would never be trained, yet sampled
        raise ConfigError(
            f"model.net.num_classes={ours} but the data has {theirs} classes (labels 0..{theirs - 1}):"
            f" set model.net.num_classes={theirs} (or null for an unconditional model)"
        )
