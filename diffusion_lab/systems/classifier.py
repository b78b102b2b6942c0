"""Image classifier system: cross-entropy training of a ConvClassifier on labelled data (FID features / judge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.systems.optim import build_optimizers


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (replicate padding, then a random crop)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])


class ClassifierSystem(L.LightningModule):
    """Trains `net` (logits = net(images)) with cross-entropy; logs loss and accuracy per split.

    `image_size` is the resolution it was trained at: the feature extractor built from its checkpoint
    (`diffusion_lab.metrics.features.ClassifierFeatures`) resizes images to it.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        image_size: int,
        max_shift: int = 2,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.image_size = image_size
        self.max_shift = max_shift
        self.label_smoothing = label_smoothing

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, num_classes)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        if "label" not in batch:
            raise ValueError("the classifier needs labelled batches (a 'label' entry); this data has none")
        images, labels = batch["image"], batch["label"].long()
        if split == "train":
            images = random_shift(images, self.max_shift)
        logits = self(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.label_smoothing if split == "train" else 0.0
        )
        acc = (logits.argmax(dim=1) == labels).float().mean()
        on_step = split == "train"
        kw = dict(on_step=on_step, on_epoch=not on_step, batch_size=len(labels), sync_dist=not on_step)
        self.log(f"{split}/loss", loss, prog_bar=True, **kw)
        self.log(f"{split}/acc", acc, prog_bar=split != "train", **kw)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return build_optimizers(self, self.optimizer_factory, self.lr_scheduler_factory)
