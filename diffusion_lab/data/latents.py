"""Latent cache: a data set's posterior mean and std under a frozen autoencoder, encoded once, kept in a file."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusion_lab.data.base import ImageDataset
from diffusion_lab.files import atomic_save

log = logging.getLogger(__name__)
CACHE_FORMAT = "diffusion_lab.latents/1"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """Hash of what decides the cached latents: the items (source indices), the transform and sample pixels."""
    h = hashlib.sha256()
    h.update(f"{type(dataset.source).__name__}|{len(dataset)}|{_unflipped(dataset)!r}".encode())
    h.update(np.ascontiguousarray(dataset.indices, dtype=np.int64).tobytes())
    for i in sorted({0, len(dataset) // 2, len(dataset) - 1}):
        h.update(np.ascontiguousarray(dataset.source[int(dataset.indices[i])]).tobytes())
    return h.hexdigest()


def cache_file(
    cache_dir: str | os.PathLike, autoencoder_ckpt: str | os.PathLike, dataset: ImageDataset
) -> Path:
    """`<cache_dir>/latents_<autoencoder sha256>_<data fingerprint>.pt` (12 hex digits each)."""
    key_ae, key_data = file_sha256(autoencoder_ckpt)[:12], dataset_fingerprint(dataset)[:12]
    return Path(cache_dir) / f"latents_{key_ae}_{key_data}.pt"


def _unflipped(dataset: ImageDataset):
    return dataclasses.replace(dataset.transform, hflip=False)


class _Images(Dataset):
    """The items of an ImageDataset as tensors, unflipped (and flipped when its transform flips)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset, self.transform = dataset, _unflipped(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.transform(self.dataset.source[int(self.dataset.indices[i])])  # (C, H, W)
        return torch.stack([x, x.flip(-1)]) if self.dataset.transform.hflip else x[None]


@torch.no_grad()
def encode_dataset(
    autoencoder: torch.nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """{mean, std}: float32 (N, V, C, h, w) posterior moments; V = 2 (as is, flipped) when the data flips, else 1."""
    means, stds = [], []
    loader = DataLoader(_Images(dataset), batch_size=batch_size, shuffle=False)
    for x in tqdm(loader, desc="latent cache: encoding", leave=False):
        b, v = x.shape[:2]
        post = autoencoder.encode(x.flatten(0, 1).to(device))  # over (B V, C, h, w)
        means.append(post.mean.float().cpu().unflatten(0, (b, v)))
        stds.append(post.std.float().cpu().unflatten(0, (b, v)))
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def load_or_build_cache(
    autoencoder: torch.nn.Module,
    autoencoder_ckpt: str | os.PathLike,
    dataset: ImageDataset,
    cache_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    build: bool = True,
) -> tuple[dict[str, torch.Tensor], Path]:
    """The cached moments of `dataset` under this autoencoder, encoding and writing them first if needed."""
    path = cache_file(cache_dir, autoencoder_ckpt, dataset)
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") == CACHE_FORMAT and len(data["mean"]) == len(dataset):
            log.info("latent cache: reusing %s", path)
            return data, path
        log.warning("latent cache %s is stale or foreign: rebuilding it", path)
    if not build:
        raise FileNotFoundError(f"latent cache {path} is missing (it is built by the first process)")
    log.info("latent cache: encoding %d items to %s", len(dataset), path)
    was_training = autoencoder.training
    autoencoder.eval()
    data = {"format": CACHE_FORMAT, **encode_dataset(autoencoder, dataset, device=device)}
    autoencoder.train(was_training)
    atomic_save(data, path)  # concurrent runs never read half a file
    return data, path


class CachedLatentDataset(Dataset):
    """An ImageDataset's items with {latent_mean, latent_std} in place of the image (labels / captions as there).

    A data set that flips left-right gets the moments of the flipped image half of the time (torch's RNG).
    """

    def __init__(self, dataset: ImageDataset, latents: dict[str, torch.Tensor]) -> None:
        if len(latents["mean"]) != len(dataset):
            raise ValueError(f"latent cache holds {len(latents['mean'])} items, the data set {len(dataset)}")
        self.dataset = dataset
        self.mean, self.std = latents["mean"], latents["std"]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        d, j = self.dataset, int(self.dataset.indices[i])
        v = int(torch.rand(()).item() < 0.5) if self.mean.shape[1] == 2 else 0
        out: dict = {"latent_mean": self.mean[i, v], "latent_std": self.std[i, v]}  # (C, h, w) each
        if d.labels is not None:
            out["label"] = int(d.labels[j])
        if d.attributes is not None:
            out["attributes"] = torch.as_tensor(d.attributes[j], dtype=torch.float32)
        if d.captioner is not None:
            out["caption"] = d.captioner.sample(j) if d.train else d.captioner.fixed(j)
        return out
