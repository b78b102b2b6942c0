"""Image transforms on tensors (no torchvision): to [-1, 1], resize, center crop, random flip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) array -> float tensor (C, H, W) in [-1, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def resize(image: torch.Tensor, size: int | tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """Bilinear (antialiased) resize of a (C, H, W) or (B, C, H, W) tensor."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == hw:
        return image
    batched = image.ndim == 4
    x = image if batched else image[None]
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    return x if batched else x[0]


def random_hflip(
    image: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip a (C, H, W) tensor left-right with probability p."""
    if torch.rand((), generator=generator).item() < p:
        return image.flip(-1)
    return image


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert (C, H, W) between grey (1) and RGB (3)."""
    c = image.shape[0]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return image.expand(3, -1, -1).clone()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
        return (image * w).sum(0, keepdim=True)
    if c == 4:
        return match_channels(image[:3], channels)
    raise ValueError(f"cannot convert an image with {c} channels to {channels}")


def center_crop_array(image: np.ndarray, size: int | None = None) -> np.ndarray:
    """Square center crop of an (H, W[, C]) array; `size=None` takes the largest centred square."""
    h, w = image.shape[:2]
    s = min(h, w) if size is None else size
    if s > min(h, w):
        raise ValueError(f"crop size {s} is larger than the image ({h}x{w})")
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


@dataclass(frozen=True)
class ImageTransform:
    """uint8 (H, W[, C]) array -> float (C, H, W) in [-1, 1]: square center crop, channels, resize, flip.

    The crop runs on the uint8 array (cheap), `crop_size=None` keeps the largest centred square
    (a no-op for square images); `hflip` flips left-right with probability 1/2 using torch's RNG,
    which Lightning's `seed_everything` and the DataLoader's per-worker seeding make reproducible.
    """

    image_size: int
    channels: int
    crop_size: int | None = None
    hflip: bool = False

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = to_tensor(center_crop_array(np.asarray(image), self.crop_size))  # (C, h, w)
        x = resize(match_channels(x, self.channels), self.image_size)  # (C, H, W)
        return random_hflip(x) if self.hflip else x
