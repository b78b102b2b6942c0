"""Image grids and PNG/NPZ writing with einops and Pillow (no torchvision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.files import atomic_save, writing


def make_grid(
    images: np.ndarray | torch.Tensor, *, nrow: int, pad: int = 1, pad_value: int = 255
) -> np.ndarray:
    """uint8 (N, H, W, C) (or float (N, C, H, W) in [-1, 1]) -> one uint8 (rows*H, nrow*W, C) grid image."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    full = np.full((rows * nrow, h + 2 * pad, w + 2 * pad, c), pad_value, dtype=np.uint8)
    full[:n, pad : pad + h, pad : pad + w] = images
    return rearrange(full, "(r k) h w c -> (r h) (k w) c", k=nrow)


def save_png(image: np.ndarray, path: str | os.PathLike, *, min_size: int = 256) -> Path:
    """Write a uint8 (H, W, C) image atomically, upscaled (nearest) so small grids stay visible; a full disk or
    an unwritable folder is one OutputError line."""
    path = Path(path)
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    scale = max(1, -(-min_size // max(img.size)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with writing(path, "image"):
        atomic_save(img, path, save=lambda im, f: im.save(f, format="PNG"))
    return path


def save_grid(images: np.ndarray | torch.Tensor, path: str | os.PathLike, *, nrow: int) -> Path:
    """Grid of images -> PNG at `path`."""
    return save_png(make_grid(images, nrow=nrow), path)


def log_image(
    loggers, key: str, image: np.ndarray | str | os.PathLike, *, step: int | None = None
) -> list[str]:
    """Send one image (uint8 (H, W, C), or a PNG path) to every Lightning logger that can take images, chosen by
    what it offers: `log_image` (wandb), `experiment.add_image` (TensorBoard), `experiment.log_image` with a
    `run_id` (MLflow: artifact `<key>/step_XXXXXX.png`). Others (CSV) keep only the PNG. Returns the logger names
    that took it."""
    if not isinstance(image, np.ndarray):
        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB"))
    took = []
    for logger in loggers:
        experiment = logger.experiment
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[image], step=step)
        elif callable(getattr(experiment, "add_image", None)):
            experiment.add_image(key, image, step, dataformats="HWC")
        elif callable(getattr(experiment, "log_image", None)) and getattr(logger, "run_id", None):
            name = f"{key}.png" if step is None else f"{key}/step_{step:06d}.png"
            experiment.log_image(logger.run_id, image, artifact_file=name)
        else:
            continue
        took.append(type(logger).__name__)
    return took
