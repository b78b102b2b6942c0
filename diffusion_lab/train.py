"""Training entry point: `python -m diffusion_lab.train [experiment=NAME] [overrides]` (Hydra)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
from diffusion_lab.callbacks.ema import KeepRawWeights
from diffusion_lab.callbacks.random_state import RandomState
from diffusion_lab.callbacks.run_config import RunConfig
from diffusion_lab.validation import check_config, check_resume, ensure_writable_dir, exit_on_user_error

log = logging.getLogger(__name__)


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


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def train(cfg: DictConfig, *, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Fit the configured system; write the last checkpoint and `summary.json` into the run dir."""
    start = time.time()
    out_dir = ensure_writable_dir(cfg.paths.output_dir, "run folder")
    check_config(OmegaConf.to_container(cfg, resolve=True))  # wrong types, unknown keys: one line
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    if cfg.get("ckpt_path"):  # a different architecture fails here, listing the differing config keys
        model_config = OmegaConf.to_container(cfg.model, resolve=True)
        for diff in check_resume(cfg.ckpt_path, model=model, model_config=model_config):
            log.warning("resuming with a changed model config: %s", diff)
    keep_raw = KeepRawWeights()  # first: its on_train_end runs before EMA swaps the EMA weights in
    callbacks = [keep_raw, *build_callbacks(cfg)]
    callbacks.append(RunConfig(config=OmegaConf.to_container(cfg, resolve=True)))
    callbacks.append(RandomState())  # global RNG states in checkpoints: a resumed run draws the same noise
    callbacks.extend(extra_callbacks or [])
    loggers = build_loggers(cfg)
    # every checkpoint write is atomic (temp file + fsync + rename) and refuses NaN weights
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir), **plugins
    )
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    last = out_dir / "checkpoints" / "last.ckpt"
    _save_final(trainer, model, last, raw=keep_raw.state)
    summary: dict[str, Any] = {
        "task_name": cfg.get("task_name"),
        "output_dir": str(out_dir),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "wall_seconds": round(time.time() - start, 2),
        "final_train_loss": _float(trainer.callback_metrics.get("train/loss")),
        "final_val_loss": _float(trainer.callback_metrics.get("val/loss")),
        "last_checkpoint": str(last),
    }
    summary.update(
        {k: _float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(("val/", "eval/"))}
    )
    for part in (model, *callbacks):  # systems and callbacks may contribute (scale factor, grids, accuracy)
        summary.update(getattr(part, "summary", None) or {})
    if trainer.is_global_zero:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("summary: %s", json.dumps(summary))
    return summary


def _save_final(trainer: L.Trainer, model: L.LightningModule, path, *, raw: dict | None) -> None:
    """Save `last.ckpt` with the raw weights in the module (EMA keeps its own copy), then restore the EMA ones."""
    if raw is None or not any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
        trainer.save_checkpoint(path)
        return
    ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(raw)
    try:
        trainer.save_checkpoint(path)
    finally:
        model.load_state_dict(ema_state)


def _float(x) -> float | None:
    return None if x is None else float(x)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # bad input ends with one line `error: <cause>` and exit code 1 (DIFFUSION_LAB_TRACEBACK=1: full traceback)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN  # a failed sweep job must not end the other jobs
    with exit_on_user_error((InstantiationException, OmegaConfBaseException), reraise=sweep):
        summary = train(cfg)
    return summary.get("final_train_loss")


if __name__ == "__main__":
    main()
