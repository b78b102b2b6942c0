"""At the end of training: classify guided samples of each class with a classifier of held-out real data."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from diffusion_lab.callbacks.sampling import PeriodicSampling
from diffusion_lab.metrics.conditional import class_accuracy, fit_pixel_classifier, per_class_accuracy


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=256, shuffle=False))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


class ClassAccuracy(PeriodicSampling):
    """Logs `class_accuracy` (and the classifier's own accuracy on real validation images)."""

    def __init__(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        num_per_class: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 1234,
    ) -> None:
        super().__init__(sampler=sampler, guidance_scale=guidance_scale, seed=seed)
        self.num_per_class = num_per_class
        self.summary: dict = {}

    def measure(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        dm = trainer.datamodule
        if model.num_classes is None:
            rank_zero_warn("ClassAccuracy skipped: the model is not class-conditional")
            return {}
        if dm is None or getattr(dm, "test_set", None) is None or getattr(dm, "val_set", None) is None:
            rank_zero_warn("ClassAccuracy skipped: the data module has no held-out val and test splits")
            return {}
        # the classifier never saw the diffusion model's training images: fit on test, check on val
        x_fit, y_fit = _stack(dm.test_set)
        x_val, y_val = _stack(dm.val_set)
        clf = fit_pixel_classifier(x_fit, y_fit)
        k = model.num_classes
        labels = torch.arange(k).repeat_interleave(self.num_per_class)
        images = self.draw(model, num_samples=len(labels), labels=labels)
        self.summary = {
            "class_accuracy": class_accuracy(clf, images, labels),
            "class_accuracy_per_class": per_class_accuracy(clf, images, labels, k),
            "classifier_real_accuracy": class_accuracy(clf, x_val, y_val),
            "class_accuracy_guidance_scale": self.guidance_scale,
            "class_accuracy_sampler": getattr(self.sampler, "name", str(self.sampler)),
        }
        return {f"eval/{key}": v for key, v in self.summary.items() if isinstance(v, float)}
