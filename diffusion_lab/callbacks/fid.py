"""FID every N steps on the EMA weights: fixed-seed samples vs cached real statistics, DDP-aware (torchmetrics)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_lab.callbacks.sampling import PeriodicSampling, periodic_args
from diffusion_lab.generate import balanced_labels
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.metrics.fid import RealFeatureCache, describe_datamodule, fid_metric, set_real_features

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class FID(PeriodicSampling):
    """Logs `eval/fid_<extractor>` (e.g. `eval/fid_classifier`, `eval/fid_inception`) every `every_n_steps`.

    Samples `num_samples` images from the EMA weights (`averaged_module`) with fixed seeds (class models:
    balanced labels, guided by `guidance_scale`); under DDP each rank samples its share of the chunks and
    torchmetrics' `FrechetInceptionDistance` sums the statistics across ranks. The real statistics of the data
    module's `split` (first `num_real` images, all by default) are computed once and cached in `cache_dir`
    (default `$DIFFUSION_LAB_CACHE/fid` or `~/.cache/diffusion_lab/fid`); only rank 0 reads or writes them.
    """

    all_ranks = True  # the FID sync is a collective

    def __init__(
        self,
        *,
        feature: FeatureExtractor,
        sampler: Callable[..., torch.Tensor],
        every_n_steps: int = 1000,
        num_samples: int = 1000,
        batch_size: int = 250,
        guidance_scale: float = 1.0,
        seed: int = 0,
        split: str = "test",
        num_real: int | None = None,
        cache_dir: str | None = None,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(**periodic_args(locals()))
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
        self.feature = feature
        self.num_samples = num_samples
        self.split = split
        self.num_real = num_real
        self.cache = RealFeatureCache(cache_dir)
        self.key = f"fid_{feature.name}"
        self.history: list[tuple[int, float]] = []
        self._metric = None

    def _real_dataset(self, trainer: L.Trainer):
        dm = trainer.datamodule
        if dm is not None and getattr(dm, f"{self.split}_set", None) is None and hasattr(dm, "setup"):
            dm.setup("test")  # fit-time setup may build the training splits only
        ds = getattr(dm, f"{self.split}_set", None) if dm is not None else None
        if ds is None:
            raise RuntimeError(
                f"FID needs the data module's {self.split} split, and {type(dm).__name__} has none"
            )
        return dm, ds

    def _setup_metric(self, trainer: L.Trainer, device: torch.device) -> None:
        metric = fid_metric(self.feature).to(device)
        # only rank 0 holds (and caches) the real statistics; the others keep zeros, so the sum over ranks
        # that torchmetrics takes in compute() is exactly rank 0's
        if trainer.is_global_zero:
            dm, ds = self._real_dataset(trainer)
            feats, _ = self.cache.get(
                self.feature,
                ds,
                description=describe_datamodule(dm),
                split=self.split,
                num_real=self.num_real,
                batch_size=self.batch_size,
                device=device,
                write=True,
                progress=True,
            )
            set_real_features(metric, feats)
        else:
            set_real_features(metric, None)
        self._metric = metric

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Run on every rank (the FID sync is a collective); returns the FID (same on all ranks)."""
        return super().evaluate(trainer, pl_module)[f"eval/{self.key}"]

    def measure(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        if self._metric is None:
            self._setup_metric(trainer, model.device)
        metric = self._metric.to(model.device)
        metric.reset()  # fake statistics only (reset_real_features=False)
        k = model.num_classes
        labels = balanced_labels(self.num_samples, k) if k is not None else None
        for _, _, images in self.draw(model, num_samples=self.num_samples, labels=labels, trainer=trainer):
            metric.update(images, real=False)
        value = float(metric.compute())
        self.history.append((trainer.global_step, value))
        trainer.callback_metrics[f"eval/{self.key}"] = torch.tensor(value)
        if trainer.is_global_zero:
            log.info("step %d: %s = %.4f", trainer.global_step, self.key, value)
        if value != value:  # NaN
            rank_zero_warn(f"{self.key} is NaN at step {trainer.global_step}")
        return {f"eval/{self.key}": value}

    @property
    def summary(self) -> dict:
        if not self.history:
            return {}
        return {self.key: self.history[-1][1], f"{self.key}_history": [list(h) for h in self.history]}
