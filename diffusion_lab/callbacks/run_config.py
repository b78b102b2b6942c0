"""Stores the resolved run config in every checkpoint, so a model can be rebuilt from the file alone."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from diffusion_lab.checkpoints import CHECKPOINT_KEY


class RunConfig(Callback):
    """Adds `checkpoint["diffusion_lab"] = {"config": <resolved config as plain dict>}`."""

    def __init__(self, *, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from diffusion_lab import __version__

        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "version": __version__}
