"""Power-function EMAs of the weights during training and their periodic snapshots, for post-hoc EMA (EDM2)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lab.checkpoints import CheckpointError, read_checkpoint
from diffusion_lab.files import atomic_save
from diffusion_lab.power_ema import power_ema_beta, sigma_rel_to_gamma

SNAPSHOT_DIR = "phema"
_SNAPSHOT = re.compile(r"snapshot-(\d+)-(\d+\.\d+)\.pt")


class PostHocEMA(Callback):
    """Tracks one power-function EMA of the trained weights per `sigma_rels` entry (Karras et al. 2024 track 0.05
    and 0.10) with beta_t = (1 - 1 / t)^(gamma + 1) after optimizer step t, and every `every_n_steps` steps (and at
    the end of training) writes each to `<dirpath>/snapshot-<step>-<sigma_rel>.pt` (default dirpath: the
    checkpoint folder's `phema/`); `python -m diffusion_lab.phema` reconstructs the EMA of any length from them.

    Averages the floating-point parameters that train (a latent model's frozen autoencoder is not copied), in
    float32 on the model's device. The averages ride in Lightning checkpoints, so a resumed run continues them.
    Lightning's EMAWeightAveraging (`WarmupEMA`) is independent of this and stays what `state_dict` holds.
    """

    def __init__(
        self,
        *,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 100,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        if not sigma_rels:
            raise ValueError("sigma_rels must list at least one EMA length, e.g. [0.05, 0.1]")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [float(g) for g in sigma_rel_to_gamma(self.sigma_rels)]
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self.step = 0  # optimizer steps averaged so far
        self.emas: list[dict[str, torch.Tensor]] | None = None
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_rels=self.sigma_rels)

    # ------------------------------------------------------------------ the averages
    @staticmethod
    def averaged_parameters(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The parameters the EMAs cover, by their state_dict names: floating point and trained."""
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad and p.is_floating_point()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.emas is None:
            params = self.averaged_parameters(pl_module)
            self.emas = [{n: p.detach().float().clone() for n, p in params.items()} for _ in self.sigma_rels]
            self._apply_loaded()

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step <= self.step or self.emas is None:  # no optimizer step since the last update (accumulation)
            return
        params = self.averaged_parameters(pl_module)
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            weight = 1.0 - power_ema_beta(gamma, step)
            for name, avg in ema.items():
                avg.lerp_(params[name].detach().float(), weight)
        self.step = step
        if step % self.every_n_steps == 0:
            self.write_snapshots(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step % self.every_n_steps:  # the last steps since the last snapshot
            self.write_snapshots(trainer)

    # ------------------------------------------------------------------ snapshots
    def snapshot_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        base = (
            Path(ckpt.dirpath)
            if ckpt is not None and ckpt.dirpath
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        return base / SNAPSHOT_DIR

    def write_snapshots(self, trainer: L.Trainer) -> None:
        """One file per tracked EMA at the current step (rank 0; atomic, with a SHA-256 beside it)."""
        if not trainer.is_global_zero or self.emas is None or self.step == 0:
            return
        directory = self.snapshot_dir(trainer)
        for sigma_rel, ema in zip(self.sigma_rels, self.emas, strict=True):
            data = {
                "step": self.step,
                "sigma_rel": sigma_rel,
                "weights": {n: t.detach().cpu() for n, t in ema.items()},
            }
            atomic_save(data, snapshot_path(directory, self.step, sigma_rel), checksum=True)

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": self.sigma_rels, "step": self.step, "emas": self.emas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [round(s, 6) for s in state_dict["sigma_rels"]] != [round(s, 6) for s in self.sigma_rels]:
            raise ValueError(
                f"the checkpoint's post-hoc EMAs track sigma_rels {state_dict['sigma_rels']}, this run "
                f"{self.sigma_rels}: resume with the same callbacks.phema.sigma_rels"
            )
        self._loaded = state_dict
        self._apply_loaded()

    def _apply_loaded(self) -> None:
        if self._loaded is None or self.emas is None:
            return
        for ema, saved in zip(self.emas, self._loaded["emas"], strict=True):
            for name, avg in ema.items():
                avg.copy_(saved[name])
        self.step = int(self._loaded["step"])
        self._loaded = None


# ------------------------------------------------------------------------------------------------ snapshot files
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file of a tracked power-function EMA: its path, optimizer step and sigma_rel."""

    path: Path
    step: int
    sigma_rel: float


def snapshot_path(directory: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(directory) / f"snapshot-{step:07d}-{sigma_rel:.3f}.pt"


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots in `directory`, by step then sigma_rel."""
    found = []
    for p in Path(directory).glob("snapshot-*.pt"):
        if m := _SNAPSHOT.fullmatch(p.name):
            found.append(Snapshot(p, int(m.group(1)), float(m.group(2))))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def load_snapshot(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The averaged weights of a snapshot file (state_dict names), checked against its checksum."""
    data = read_checkpoint(snapshot.path, what="post-hoc EMA snapshot")
    if not isinstance(data.get("weights"), dict):
        raise CheckpointError(f"{snapshot.path} is not a post-hoc EMA snapshot (no 'weights')")
    return data["weights"]
