"""Sampling entry point: `python -m diffusion_lab.sample ckpt=PATH sampler=NAME n=N out=DIR` -> grid + npz."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.callbacks.checkpoint import CheckpointError
from diffusion_lab.callbacks.run_config import CHECKPOINT_KEY
from diffusion_lab.console import quiet
from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.images import save_grid
from diffusion_lab.validation import exit_on_user_error, state_mismatch

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a diffusion_lab checkpoint file (CPU), failing with a one-line cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a diffusion_lab training checkpoint (no '{CHECKPOINT_KEY}' config block)"
        )
    return ckpt


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict that reports differing architectures as a short list, not a wall of keys."""
    if parts := state_mismatch(module.state_dict(), state):
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts))
    module.load_state_dict(state)


def standalone_model_config(model_config: dict, path: str | Path) -> DictConfig:
    """The model config to rebuild a checkpoint from the file alone: a latent model's autoencoder comes from
    the checkpoint itself (it carries the stage-1 block) and weights to start from (`init_ckpt`) are not
    read, since the state_dict holds the trained ones."""
    cfg = OmegaConf.create(model_config)
    if "autoencoder_ckpt" in cfg:
        cfg.autoencoder_ckpt = str(path)
    for node in (cfg, cfg.get("text_encoder")):
        if isinstance(node, DictConfig) and "init_ckpt" in node:
            node.init_ckpt = None
    return cfg


def load_system(path: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the trained system (EMA weights) and its run config from a checkpoint alone."""
    ckpt = read_checkpoint(path)
    config = ckpt[CHECKPOINT_KEY]["config"]
    model = instantiate(standalone_model_config(config["model"], path), _convert_="all")
    load_state_checked(model, ckpt["state_dict"], source=str(path))
    model.eval().to(device)
    return model, config


def load_guide(path: str | Path, model, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The net of a guide checkpoint for autoguidance (Karras et al. 2024): a weaker model of the same kind
    (same process, prediction type and conditioning), e.g. an earlier checkpoint of the same run."""
    guide, _ = load_system(path, device=device)
    for what in ("process", "objective"):
        mine, theirs = getattr(model, what, None), getattr(guide, what, None)
        if repr(mine) != repr(theirs):
            raise ValueError(f"guide_ckpt {path} has another {what} ({theirs!r}) than the model ({mine!r})")
    for what in ("num_classes", "is_text_conditional", "sample_shape"):
        if getattr(model, what, None) != getattr(guide, what, None):
            raise ValueError(f"guide_ckpt {path} differs from the model in {what}: it cannot guide it")
    return guide.net


def guidance_options(cfg: DictConfig, model, *, device: str | torch.device) -> dict[str, Any]:
    """guidance_rescale / guidance_interval / guide (from guide_ckpt) of a sample or evaluate config."""
    interval = cfg.get("guidance_interval")
    return {
        "guidance_rescale": float(cfg.get("guidance_rescale") or 0.0),
        "guidance_interval": None if interval is None else [float(v) for v in interval],
        "guide": load_guide(cfg.guide_ckpt, model, device=device) if cfg.get("guide_ckpt") else None,
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_condition(model, *, n: int, class_label: int | None, prompt: str | None) -> tuple[dict, dict]:
    """Net condition for n samples plus what to record in samples.npz (labels / prompts)."""
    num_classes = getattr(model, "num_classes", None)
    if prompt is not None:
        if not hasattr(model, "encode_prompts"):
            raise ValueError("prompt given, but this model is not text-conditional")
        return model.encode_prompts([prompt] * n), {"prompts": np.array([prompt] * n)}
    if class_label is not None:
        if num_classes is None:
            raise ValueError("class_label given, but this model is not class-conditional")
        if not 0 <= int(class_label) < num_classes:
            raise ValueError(
                f"class_label={class_label} is out of range: this model has classes 0..{num_classes - 1}"
            )
        labels = torch.full((n,), int(class_label), dtype=torch.long)
    elif num_classes is not None:
        labels = torch.arange(n) * num_classes // n  # all classes, in blocks
    else:
        return {}, {}
    return {"class_labels": labels.to(model.device)}, {"labels": labels.numpy()}


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Draw `cfg.n` samples; write `grid.png`, `samples.npz` and `sample.json` into the output folder."""
    if cfg.n < 1:
        raise ValueError(f"n must be >= 1, got {cfg.n}")
    if cfg.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {cfg.guidance_scale}")
    sampler = instantiate(cfg.sampler)
    device = resolve_device(cfg.device)
    model, _ = load_system(cfg.ckpt, device=device)
    out = (
        Path(cfg.out)
        if cfg.out
        else Path(cfg.ckpt).resolve().parent.parent / "samples_cli" / f"{sampler.name}_{sampler.steps}"
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the output folder {out}: {e.strerror}") from e
    cond, record = build_condition(model, n=cfg.n, class_label=cfg.class_label, prompt=cfg.prompt)
    guidance = guidance_options(cfg, model, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x_T = torch.randn((cfg.n, *model.sample_shape), generator=g, device=device)
    chunks = []
    for i in range(0, cfg.n, cfg.batch_size):
        part = {k: v[i : i + cfg.batch_size] for k, v in cond.items()}
        chunks.append(
            model.sample(
                sampler=sampler,
                x_T=x_T[i : i + cfg.batch_size],
                cond=part,
                guidance_scale=cfg.guidance_scale if part or guidance["guide"] is not None else 1.0,
                generator=g,
                progress=True,
                **guidance,
            ).cpu()
        )
    images = to_uint8(torch.cat(chunks))
    nrow = cfg.nrow or (
        cfg.n // model.num_classes
        if "labels" in record and cfg.class_label is None and cfg.n >= model.num_classes
        else max(1, int(math.sqrt(cfg.n)))
    )
    save_grid(images, out / "grid.png", nrow=nrow)
    np.savez_compressed(out / "samples.npz", images=images, **record)
    info = {
        "ckpt": str(cfg.ckpt),
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "n": cfg.n,
        "seed": cfg.seed,
        "guidance_scale": cfg.guidance_scale,
        "guidance_rescale": guidance["guidance_rescale"],
        "guidance_interval": guidance["guidance_interval"],
        "guide_ckpt": cfg.get("guide_ckpt"),
        "out": str(out),
    }
    (out / "sample.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote %s and %s", out / "grid.png", out / "samples.npz")
    return info


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    # bad input ends with one line `error: <cause>` and exit code 1 (DIFFUSION_LAB_TRACEBACK=1: full traceback)
    quiet()
    with exit_on_user_error((InstantiationException, OmegaConfBaseException)):
        sample(cfg)


if __name__ == "__main__":
    main()
