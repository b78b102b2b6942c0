"""At the end of training: classify guided samples of each class with a classifier of held-out real data."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader

from diffusion_lab.callbacks.ema import averaged_module
from diffusion_lab.metrics.conditional import class_accuracy, fit_pixel_classifier, per_class_accuracy


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=256, shuffle=False))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


class ClassAccuracy(Callback):
    """Logs `class_accuracy` (and the classifier's own accuracy on real validation images)."""

    def __init__(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        num_per_class: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.num_per_class = num_per_class
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.summary: dict = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    @rank_zero_only
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        dm = trainer.datamodule
        if getattr(pl_module, "num_classes", None) is None:
            rank_zero_warn("ClassAccuracy skipped: the model is not class-conditional")
            return {}
        if dm is None or getattr(dm, "test_set", None) is None or getattr(dm, "val_set", None) is None:
            rank_zero_warn("ClassAccuracy skipped: the data module has no held-out val and test splits")
            return {}
        # the classifier never saw the diffusion model's training images: fit on test, check on val
        x_fit, y_fit = _stack(dm.test_set)
        x_val, y_val = _stack(dm.val_set)
        clf = fit_pixel_classifier(x_fit, y_fit)
        model = averaged_module(trainer, pl_module)
        k = model.num_classes
        labels = torch.arange(k).repeat_interleave(self.num_per_class).to(model.device)
        g = torch.Generator(device=model.device).manual_seed(self.seed)
        images = model.sample(
            sampler=self.sampler,
            num_samples=len(labels),
            cond={"class_labels": labels},
            guidance_scale=self.guidance_scale,
            generator=g,
            progress=True,
        )
        self.summary = {
            "class_accuracy": class_accuracy(clf, images, labels.cpu()),
            "class_accuracy_per_class": per_class_accuracy(clf, images, labels.cpu(), k),
            "classifier_real_accuracy": class_accuracy(clf, x_val, y_val),
            "class_accuracy_guidance_scale": self.guidance_scale,
            "class_accuracy_sampler": getattr(self.sampler, "name", str(self.sampler)),
        }
        metrics = {f"eval/{key}": v for key, v in self.summary.items() if isinstance(v, float)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return self.summary
