"""A shuffled training loader whose position Lightning saves in checkpoints, so a resumed run sees the same batches.

Lightning (2.x) stores `state_dict()` of a training DataLoader that has one and calls `load_state_dict()` before
iterating it again on resume; it does not skip batches itself. `ResumableDataLoader` records how many batches it
handed out in the current epoch and `ResumableSampler` (a DistributedSampler, so Lightning does not replace it
under DDP) draws each epoch's permutation from `seed + epoch` and skips the ones already trained on.
Exact for `num_workers=0`; with worker processes the order of items is still exact, but random augmentations
inside the workers restart their streams on resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(DistributedSampler):
    """Per-epoch permutation from `seed + epoch` (this rank's share under DDP) that can start part-way."""

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
        )
        self._skip: tuple[int, int] | None = None  # (epoch, indices to skip)

    def start_at(self, *, epoch: int, index: int) -> None:
        """The next iteration of `epoch` (as set by `set_epoch`) starts at its `index`-th item."""
        self._skip = (epoch, index)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None:
            epoch, index = self._skip
            if epoch == self.epoch:
                indices = indices[index:]
            self._skip = None
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A shuffled DataLoader with `state_dict` / `load_state_dict` = (seed, epoch, batches handed out).

    `sampler` is for Lightning, which rebuilds loaders with another sampler for some features (e.g.
    `overfit_batches`); such a loader is not resumable."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int | None = None,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if seed is None:  # the run's seed (seed_everything): the same on every rank, so shards never overlap
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % 2**31
        kwargs.pop("shuffle", None)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, seed=seed) if sampler is None else sampler,
            # its own generator: worker seeds draw nothing from the global RNG
            generator=torch.Generator().manual_seed(seed) if generator is None else generator,
            **kwargs,
        )
        self._batches = 0
        self._epoch = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            yield from super().__iter__()
            return
        resume = sampler._skip
        self._epoch = sampler.epoch
        self._batches = resume[1] // self.batch_size if resume and resume[0] == sampler.epoch else 0
        self.generator.manual_seed(sampler.seed + sampler.epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"seed": int(self.sampler.seed), "epoch": int(self._epoch), "batches": int(self._batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or not state_dict:
            return
        sampler.seed = int(state_dict["seed"])
        sampler.start_at(epoch=int(state_dict["epoch"]), index=int(state_dict["batches"]) * self.batch_size)
