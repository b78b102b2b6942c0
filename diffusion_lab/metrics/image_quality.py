"""Per-image PSNR and SSIM of images in [-1, 1] (torchmetrics' functional implementations, no torchvision)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check(preds: torch.Tensor, target: torch.Tensor) -> None:
    if preds.shape != target.shape or preds.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) batches of one shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,), preds clamped to [-1, 1]; same as on [0, 1] images with data range 1."""
    _check(preds, target)
    return peak_signal_noise_ratio(
        preds.float().clamp(-1, 1), target.float(), data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)
    )


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image (B,) (Gaussian 11x11 window, sigma 1.5), preds clamped to [-1, 1]."""
    _check(preds, target)
    return structural_similarity_index_measure(
        preds.float().clamp(-1, 1), target.float(), data_range=DATA_RANGE, reduction="none"
    )
