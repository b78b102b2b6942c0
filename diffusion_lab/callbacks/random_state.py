"""Save the global random states (torch CPU/CUDA, numpy, python) in checkpoints and restore them on resume."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


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


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """A 32-bit seed for DDP rank `rank` derived from the run's `seed` (rank 0, no `extra`: `seed` itself)."""
    if rank == 0 and not extra:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, rank, *extra]).generate_state(1)[0])


def seed_global(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _run_seed() -> int:
    """The seed `seed_everything` set (the same on every rank)."""
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**32))


class RandomState(Callback):
    """Makes a resumed run draw the same timesteps, noise, condition dropout and augmentations as an
    uninterrupted one (Lightning itself restores no global RNG state).

    The states are taken when a checkpoint is written (after the step's updates, before the next batch is
    fetched) and put back in `on_train_start`, i.e. after Lightning has rebuilt the data loaders and just
    before the first batch of the resumed run is fetched. The data order itself is resumed by the training
    loader (`diffusion_lab.data.resumable`).

    DDP: every rank is seeded alike (same initial weights, same data shuffling seed), so at the start of a fresh
    run ranks > 0 re-seed their global RNGs from (seed, rank): each rank draws its own timesteps, noise and
    condition dropout instead of repeating rank 0's. Checkpoints hold every rank's states (`ranks`, gathered
    when the checkpoint is written: all ranks write checkpoints together), and each rank gets its own back on
    resume; resuming with another number of processes restores rank 0's states and re-seeds the others.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = capture_random_state()  # top level: this rank's (rank 0's in the file that is written)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)  # a collective: Lightning saves checkpoints on every rank
            state = {**state, "ranks": ranks}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        rank, world_size = trainer.global_rank, trainer.world_size
        if pending is None:
            if rank > 0:
                seed_global(rank_seed(_run_seed(), rank))
            return
        ranks = pending.get("ranks")
        if ranks is not None and len(ranks) == world_size:
            restore_random_state(ranks[rank])
            return
        restore_random_state(pending)
        if rank > 0:
            seed_global(rank_seed(_run_seed(), rank, trainer.global_step))
        if world_size > 1 or ranks is not None:
            log.info(
                "checkpoint random states are for %d process(es), this run has %d: rank 0's states restored,"
                " the other ranks re-seeded (the run continues, but not bit-for-bit as before)",
                len(ranks) if ranks is not None else 1,
                world_size,
            )
