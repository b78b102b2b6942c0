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

from diffusion_lab.callbacks.checkpoint import CheckpointError, verify_checkpoint
from diffusion_lab.callbacks.run_config import CHECKPOINT_KEY
from diffusion_lab.console import quiet
from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.files import write_text_atomic, writing
from diffusion_lab.images import save_grid
from diffusion_lab.validation import exit_on_user_error, locate, state_mismatch

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a diffusion_lab checkpoint file (CPU), failing with a one-line cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_checkpoint(path)  # bytes changed on disk since they were written: refused
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


def check_generative(config: dict, path: str | Path) -> None:
    """CheckpointError unless the checkpoint's system is a diffusion model (not a classifier, an autoencoder or a
    text encoder run), before anything is built from it."""
    from diffusion_lab.systems.diffusion import DiffusionSystem

    target = (config.get("model") or {}).get("_target_", "")
    cls = locate(target) if target else None
    if not (isinstance(cls, type) and issubclass(cls, DiffusionSystem)):
        raise CheckpointError(
            f"{path} is not a diffusion model checkpoint: it holds a {target.rsplit('.', 1)[-1] or 'system'}"
            f" (task {config.get('task_name')!r}); give the checkpoint of a diffusion run"
        )


def weights_to_sample(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights (`state_dict`); the raw ones, with a warning, when the EMA had not begun when the
    checkpoint was written (Lightning's EMAWeightAveraging before `update_starting_at_step`: `state_dict` then
    holds the initial, untrained weights)."""
    averaged = (ckpt.get("averaging_state") or {}).get("n_averaged")
    if averaged is not None and int(averaged) == 0 and "current_model_state" in ckpt:
        log.warning(
            "%s: the EMA had not begun when this checkpoint was written (step %s), so its EMA weights are the"
            " initial ones; sampling from the raw trained weights instead",
            path,
            ckpt.get("global_step"),
        )
        return ckpt["current_model_state"]
    return ckpt["state_dict"]


def load_system(path: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the trained system (EMA weights) and its run config from a checkpoint alone."""
    ckpt = read_checkpoint(path)
    config = ckpt[CHECKPOINT_KEY]["config"]
    check_generative(config, path)
    model = instantiate(standalone_model_config(config["model"], path), _convert_="all")
    load_state_checked(model, weights_to_sample(ckpt, path), source=str(path))
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
    """`auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`, ...; ValueError (one line) for an unknown device
    or one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={name} but CUDA is not available here: use device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={name} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
            )
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"device={name} is not supported here: use auto, cpu, cuda or cuda:N")
    return device


def number(value: Any, name: str, *, integer: bool = False, minimum: float | None = None) -> float | int:
    """A CLI argument as a finite number (an int when `integer`; 3.0 counts, 1.5 does not); ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    kind = "an integer" if integer else "a number"
    if not ok or (integer and not float(value).is_integer()):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return int(value) if integer else float(value)


def build_condition(model, *, n: int, class_label: int | None, prompt: str | None) -> tuple[dict, dict]:
    """Net condition for n samples plus what to record in samples.npz (labels / prompts)."""
    num_classes = getattr(model, "num_classes", None)
    if prompt is not None:
        if not hasattr(model, "encode_prompts"):
            raise ValueError("prompt given, but this model is not text-conditional")
        warn_if_truncated(getattr(model, "text_encoder", None), prompt)
        return model.encode_prompts([prompt] * n), {"prompts": np.array([prompt] * n)}
    if class_label is not None:
        if num_classes is None:
            raise ValueError("class_label given, but this model is not class-conditional")
        class_label = number(class_label, "class_label", integer=True)
        if not 0 <= class_label < num_classes:
            raise ValueError(
                f"class_label={class_label} is out of range: this model has classes 0..{num_classes - 1}"
            )
        labels = torch.full((n,), int(class_label), dtype=torch.long)
    elif num_classes is not None:
        labels = torch.arange(n) * num_classes // n  # all classes, in blocks
    else:
        return {}, {}
    return {"class_labels": labels.to(model.device)}, {"labels": labels.numpy()}


def warn_if_truncated(text_encoder, prompt: str) -> int:
    """Warn (and return how many) when `prompt` has more tokens than the text encoder's context holds."""
    if text_encoder is None or not hasattr(text_encoder, "count_tokens"):
        return 0
    tokens, context = text_encoder.count_tokens(prompt)
    dropped = max(0, tokens - context)
    if dropped:
        log.warning(
            "the prompt has %d tokens but the text encoder's context holds %d: the last %d token(s) were dropped"
            " (the model sees %r)",
            tokens,
            context,
            dropped,
            text_encoder.tokenizer.decode(text_encoder.tokenizer([prompt])[0])[0]
            if hasattr(text_encoder, "tokenizer")
            else prompt,
        )
    return dropped


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Draw `cfg.n` samples; write `grid.png`, `samples.npz` and `sample.json` into the output folder."""
    n = number(cfg.n, "n", integer=True, minimum=1)
    guidance_scale = number(cfg.guidance_scale, "guidance_scale", minimum=0)
    batch_size = number(cfg.batch_size, "batch_size", integer=True, minimum=1)
    seed = number(cfg.seed, "seed", integer=True)
    if cfg.prompt is not None and not isinstance(cfg.prompt, str):
        raise ValueError(f"prompt must be a text, got {cfg.prompt!r}")
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
    cond, record = build_condition(model, n=n, class_label=cfg.class_label, prompt=cfg.prompt)
    guidance = guidance_options(cfg, model, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn((n, *model.sample_shape), generator=g, device=device)
    chunks = []
    for i in range(0, n, batch_size):
        part = {k: v[i : i + batch_size] for k, v in cond.items()}
        chunks.append(
            model.sample(
                sampler=sampler,
                x_T=x_T[i : i + batch_size],
                cond=part,
                guidance_scale=guidance_scale if part or guidance["guide"] is not None else 1.0,
                generator=g,
                progress=True,
                **guidance,
            ).cpu()
        )
    images = to_uint8(torch.cat(chunks))
    nrow = cfg.nrow or (
        n // model.num_classes
        if "labels" in record and cfg.class_label is None and n >= model.num_classes
        else max(1, int(math.sqrt(n)))
    )
    save_grid(images, out / "grid.png", nrow=nrow)
    with writing(out / "samples.npz", "samples file"):  # a full disk: one line, "disk full"
        np.savez_compressed(out / "samples.npz", images=images, **record)
    info = {
        "ckpt": str(cfg.ckpt),
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "n": n,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance["guidance_rescale"],
        "guidance_interval": guidance["guidance_interval"],
        "guide_ckpt": cfg.get("guide_ckpt"),
        "out": str(out),
    }
    write_text_atomic(out / "sample.json", json.dumps(info, indent=2) + "\n", what="sample record")
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
