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
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.checkpoints import load_system, trust_from_config
from diffusion_lab.cli import exit_on_user_error, file_argument
from diffusion_lab.console import quiet
from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.files import write_text_atomic, writing
from diffusion_lab.generate import balanced_labels, generate_all, guidance_options, resolve_device
from diffusion_lab.images import save_grid

log = logging.getLogger(__name__)


def number(value: Any, name: str, *, integer: bool = False, minimum: float | None = None) -> float | int:
    """A CLI argument as a finite number (an int when `integer`; 3.0 counts, 1.5 does not); ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    kind = "an integer" if integer else "a number"
    if not ok or (integer and not float(value).is_integer()):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return int(value) if integer else float(value)


def what_to_draw(model, *, n: int, class_label: Any, prompt: str | None) -> dict[str, Any]:
    """`labels` or `prompts` for `generate` (also what samples.npz records): the prompt n times, class
    `class_label` n times, or, for a class model given neither, every class in turn."""
    if prompt is not None:
        if not model.is_text_conditional:
            raise ValueError("prompt given, but this model is not text-conditional")
        warn_if_truncated(model.text_encoder, prompt)
        warn_unknown_words(model.text_encoder, prompt)
        return {"prompts": [prompt] * n}
    num_classes = model.num_classes
    if class_label is None:
        return {} if num_classes is None else {"labels": balanced_labels(n, num_classes)}
    if num_classes is None:
        raise ValueError("class_label given, but this model is not class-conditional")
    class_label = number(class_label, "class_label", integer=True)
    if not 0 <= class_label < num_classes:
        raise ValueError(
            f"class_label={class_label} is out of range: this model has classes 0..{num_classes - 1}"
        )
    return {"labels": torch.full((n,), class_label, dtype=torch.long)}


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


def warn_unknown_words(text_encoder, prompt: str) -> list[str]:
    """Warn (and return them) about the prompt's words outside the text encoder's vocabulary (a word tokenizer's
    `stoi`): the model sees each as the unknown token."""
    from diffusion_lab.nets.text import split_words

    stoi = getattr(getattr(text_encoder, "tokenizer", None), "stoi", None)
    if not isinstance(stoi, dict):
        return []
    unknown = list(dict.fromkeys(w for w in split_words(prompt) if w not in stoi))
    if unknown:
        log.warning(
            "the prompt's word(s) %s are not in the text encoder's vocabulary of %d words: the model sees each as"
            " the unknown token",
            ", ".join(repr(w) for w in unknown),
            len(stoi),
        )
    return unknown


SAMPLE_FILES = ("samples.npz", "grid.png", "sample.json")


def output_folder(out: Any, *, ckpt: str, sampler) -> Path:
    """Where samples go, never over earlier ones: an `out=` folder that holds samples is refused (the name was
    chosen, so writing elsewhere would surprise); the default `<run>/samples_cli/<sampler>_<steps>` gets the
    next free `_1`, `_2`, ... (a second call with another class or seed keeps the first one's samples)."""
    if out:
        out = Path(str(out))
        if held := [f for f in SAMPLE_FILES if (out / f).exists()]:
            raise ValueError(
                f"out={out} already holds samples ({', '.join(held)}): give another out= folder, or move them away"
            )
        return out
    base = Path(ckpt).resolve().parent.parent / "samples_cli" / f"{sampler.name}_{sampler.steps}"
    out, i = base, 0
    while any((out / f).exists() for f in SAMPLE_FILES):
        i += 1
        out = base.with_name(f"{base.name}_{i}")
    return out


@trust_from_config
def sample(cfg: DictConfig) -> dict[str, Any]:
    """Draw `cfg.n` samples; write `grid.png`, `samples.npz` and `sample.json` into the output folder."""
    n = number(cfg.n, "n", integer=True, minimum=1)
    guidance_scale = number(cfg.guidance_scale, "guidance_scale", minimum=0)
    batch_size = number(cfg.batch_size, "batch_size", integer=True, minimum=1)
    seed = number(cfg.seed, "seed", integer=True)
    nrow = None if cfg.nrow is None else number(cfg.nrow, "nrow", integer=True, minimum=1)
    if cfg.prompt is not None and not isinstance(cfg.prompt, str):
        raise ValueError(f"prompt must be a text, got {cfg.prompt!r}")
    ckpt = file_argument(cfg.ckpt, "ckpt")
    sampler = instantiate(cfg.sampler)
    device = resolve_device(cfg.device)
    out = output_folder(cfg.out, ckpt=ckpt, sampler=sampler)
    model, _ = load_system(ckpt, device=device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the output folder {out}: {e.strerror}") from e
    draw = what_to_draw(model, n=n, class_label=cfg.class_label, prompt=cfg.prompt)
    guidance = guidance_options(cfg, model, device=device)
    images = to_uint8(
        generate_all(
            model,
            sampler=sampler,
            num_samples=n,
            seed=seed,
            batch_size=batch_size,
            guidance_scale=guidance_scale,
            guidance=guidance,
            progress=True,
            **draw,
        )
    )
    classes = "labels" in draw and cfg.class_label is None and n >= model.num_classes
    nrow = nrow or (model.num_classes if classes else max(1, int(math.sqrt(n))))
    save_grid(images, out / "grid.png", nrow=nrow)
    with writing(out / "samples.npz", "samples file"):  # a full disk: one line, "disk full"
        np.savez_compressed(out / "samples.npz", images=images, **{k: np.asarray(v) for k, v in draw.items()})
    info = {
        "ckpt": str(cfg.ckpt),
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "n": n,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance.rescale,
        "guidance_interval": list(guidance.interval) if guidance.interval else None,
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
