"""Save the global random states (torch CPU/CUDA, numpy, python) in checkpoints and restore them on resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def capture_random_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Set the global RNGs to a `capture_random_state()` result."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RandomState(Callback):
    """Makes a resumed run draw the same timesteps, noise, condition dropout and augmentations as an
    uninterrupted one (Lightning itself restores no global RNG state).

    The states are taken when a checkpoint is written (after the step's updates, before the next batch is
    fetched) and put back in `on_train_start`, i.e. after Lightning has rebuilt the data loaders and just
    before the first batch of the resumed run is fetched. The data order itself is resumed by the training
    loader (`diffusion_lab.data.resumable`). Under DDP rank 0's states are saved and restored on every rank.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            restore_random_state(self._pending)
            self._pending = None
