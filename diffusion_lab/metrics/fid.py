"""Frechet distance (FID, Heusel et al. 2017) on any features, torchmetrics' FID with cached real statistics, and
the per-(data set, split, resolution, extractor) cache of real features.

The cache holds the real features themselves (float32 (N, D), plus logits where the extractor has them), so
FID, KID and precision/recall all come from one pass over the real data. A file is named
`<DataModule>_<split>_<res>px_<extractor>_<key>.npz` where `key` hashes the data description (class and
settings of the data module), the split's size and a sample of its images, the extractor's fingerprint and
`num_real`: changing any of them makes a new file, nothing is ever silently reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import scipy.linalg
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from diffusion_lab.files import atomic_save
from diffusion_lab.files import cache_dir as default_cache_root
from diffusion_lab.metrics.features import FeatureExtractor, extract_all

log = logging.getLogger(__name__)
# data module attributes that are not part of the data's identity: loader settings and the built splits
NON_IDENTITY_KEYS = {
    "batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "train_set",
    "val_set",
    "test_set",
}


# ---------------------------------------------------------------------------------------- Frechet distance
@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> GaussianStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), n=len(f))


class FeatureStats:
    """Streaming float64 statistics of features: running sum (D,) and sum of outer products (D, D), as EDM's
    `calculate_inception_stats` accumulates them, so memory stays flat however many samples go through."""

    def __init__(self, dim: int) -> None:
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)
        self.n = 0

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        f = np.asarray(
            features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64
        )
        if f.ndim != 2 or f.shape[1] != len(self.sum):
            raise ValueError(f"expected features (B, {len(self.sum)}), got {f.shape}")
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f
        self.n += len(f)

    def stats(self) -> GaussianStats:
        """Mean and unbiased covariance, (outer - n mu mu^T) / (n - 1) as EDM computes them."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 samples, got {self.n}")
        mu = self.sum / self.n
        return GaussianStats(mu=mu, sigma=(self.outer - np.outer(mu, mu) * self.n) / (self.n - 1), n=self.n)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), computed exactly as EDM's
    `calculate_fid_from_inception_stats` (scipy.linalg.sqrtm of the product in float64, real part).

    Small-n bias: the estimate is biased upwards by roughly tr(S)/n-sized terms (Chong & Forsyth 2020), so FIDs are
    comparable only at the same n (and reference); even two halves of one real split score > 0."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    m = np.square(a.mu - b.mu).sum()
    with warnings.catch_warnings():  # singular products (n < D) give a warning and still the right trace
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(np.dot(a.sigma, b.sigma))
    s = s[0] if isinstance(s, tuple) else s
    return float(np.real(m + np.trace(a.sigma + b.sigma - s * 2)))


def fid_resampled(fake: np.ndarray, real: GaussianStats) -> Callable[[np.ndarray], float]:
    """FID of `fake[indices]` against `real`, fast enough for the bootstrap: with R = S_r^1/2 (one symmetric
    eigendecomposition), tr (S_f S_r)^1/2 is the sum of singular values of (F - mean F) R / sqrt(n - 1), read from
    the eigenvalues of its n x n or D x D Gram matrix. Equals `frechet_distance` (tests check it)."""
    f = np.asarray(fake, dtype=np.float64)
    w, v = np.linalg.eigh((real.sigma + real.sigma.T) / 2)
    z = f @ ((v * np.sqrt(np.clip(w, 0, None))) @ v.T)  # (n, D) features times R
    trace_real = float(np.trace(real.sigma))

    def fid(idx: np.ndarray) -> float:
        x, zi = f[idx], z[idx]
        mu = x.mean(axis=0)
        zc = (zi - zi.mean(axis=0)) / math.sqrt(len(idx) - 1)
        gram = zc @ zc.T if len(idx) < zc.shape[1] else zc.T @ zc
        tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
        trace_fake = np.square(x - mu).sum() / (len(idx) - 1)
        return float(np.square(mu - real.mu).sum() + trace_fake + trace_real - 2 * tr_cross)

    return fid


def fid_infinity(
    fake: np.ndarray, real: GaussianStats, *, points: int = 15, min_n: int | None = None, seed: int = 0
) -> tuple[float, float]:
    """FID extrapolated to infinitely many generated samples (Chong & Forsyth 2020, "Effectively unbiased FID"):
    FID of `points` seeded subsets of sizes evenly spaced in 1/n from `min_n` to all n, fit by least squares as
    FID_n = FID_inf + slope / n. Returns (FID_inf, slope). The paper fits 5k..50k (n / 10); the default n / 4
    is less noisy at the few thousand samples a CPU run draws."""
    f = np.asarray(fake, dtype=np.float64)
    n = len(f)
    lo = max(2, n // 4 if min_n is None else int(min_n))
    if n < 4 or lo >= n:
        raise ValueError(f"FID_inf needs subsets of several sizes; got n={n}, min_n={lo}")
    sizes = np.unique(np.round(1 / np.linspace(1 / lo, 1 / n, points)).astype(int))
    fid = fid_resampled(f, real)
    rng = np.random.default_rng(seed)
    values = [fid(rng.permutation(n)[:m]) for m in sizes]
    slope, intercept = np.polyfit(1 / sizes, values, 1)
    return float(intercept), float(slope)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return frechet_distance(GaussianStats.from_features(real), GaussianStats.from_features(fake))


# --------------------------------------------------------------------------------------- torchmetrics' FID
def fid_metric(extractor: FeatureExtractor) -> FrechetInceptionDistance:
    """torchmetrics' FID around `extractor` (float images in [-1, 1]), keeping real statistics across resets."""
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    metric.orig_dtype = torch.float32  # set by update(); a DDP rank with no samples still computes
    return metric


def set_real_features(metric: FrechetInceptionDistance, features: np.ndarray | None) -> None:
    """Load real statistics from features (N, D); None zeroes them (DDP ranks other than 0: sums add up)."""
    d = metric.real_features_sum.shape[0]
    device = metric.real_features_sum.device
    if features is None:
        f = torch.zeros((0, d), dtype=torch.float64, device=device)
    else:
        f = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
        if f.ndim != 2 or f.shape[1] != d:
            raise ValueError(
                f"real features of shape {tuple(f.shape)} do not match the metric's {d} features"
            )
    metric.real_features_sum = f.sum(dim=0)
    metric.real_features_cov_sum = f.T @ f
    metric.real_features_num_samples = torch.tensor(len(f), dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------- real feature cache
def describe_datamodule(datamodule: Any) -> dict[str, Any]:
    """Class and plain settings of a data module (what defines its data; loader settings left out)."""
    out: dict[str, Any] = {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"}
    lightning_own = (
        set(vars(L.LightningDataModule())) if isinstance(datamodule, L.LightningDataModule) else set()
    )
    for k, v in sorted(vars(datamodule).items()):
        if (
            k.startswith("_") or k in NON_IDENTITY_KEYS or k in lightning_own
        ):  # `trainer` is set once attached
            continue
        if isinstance(v, (str, int, float, bool, type(None), Path)) or (
            isinstance(v, (tuple, list)) and all(isinstance(x, (str, int, float, bool)) for x in v)
        ):
            out[k] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
    return out


def _image(item: Any) -> torch.Tensor:
    return item["image"] if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item


def data_fingerprint(dataset: Dataset, description: dict[str, Any], *, probe: int | None = 16) -> str:
    """SHA-1 of a data description, the split's size and `probe` evenly spaced images of it (None: every image,
    the split's content hash)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(json.dumps(description, sort_keys=True, default=str).encode())
    n = len(dataset)
    h.update(str(n).encode())
    probe = n if probe is None else probe
    probes = np.unique(np.linspace(0, n - 1, num=min(probe, n)).round().astype(int)) if n else []
    for i in probes:
        h.update(np.ascontiguousarray(_image(dataset[int(i)]).numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


class RealFeatureCache:
    """Real features on disk under `root` (default: `$DIFFUSION_LAB_CACHE/fid` or `~/.cache/diffusion_lab/fid`).

    `computed` counts how many times features were actually extracted (tests check reuse with it).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root() / "fid"
        self.computed = 0
        self._content: dict[tuple, str] = {}  # content hashes of the splits seen (stats())

    def path(self, *, name: str, split: str, resolution: int, extractor: FeatureExtractor, key: str) -> Path:
        return self.root / f"{name}_{split}_{resolution}px_{extractor.name}_{key[:16]}.npz"

    def get(
        self,
        extractor: FeatureExtractor,
        dataset: Dataset,
        *,
        description: dict[str, Any],
        split: str,
        num_real: int | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        write: bool = True,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, logits | None) of the first `num_real` items of `dataset` (all when None), from the cache
        file when it exists, else extracted (and written when `write`: only DDP rank 0 should)."""
        n = len(dataset) if num_real is None else min(int(num_real), len(dataset))
        if n < 2:
            raise ValueError(f"the {split} split has {len(dataset)} images; FID needs at least 2")
        key = hashlib.sha1(
            json.dumps(
                {"data": data_fingerprint(dataset, description), "extractor": extractor.fingerprint, "n": n},
                sort_keys=True,
            ).encode(),
            usedforsecurity=False,
        ).hexdigest()
        first = _image(dataset[0])
        name = description.get("class", "data").rsplit(".", 1)[-1]
        path = self.path(
            name=name, split=split, resolution=int(first.shape[-1]), extractor=extractor, key=key
        )
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["features"], (z["logits"] if "logits" in z.files else None)
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable real-feature cache %s (%s); recomputing", path, e)
        self.computed += 1
        loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
        feats, logits = [], []
        for batch in tqdm(
            loader, desc=f"real {split} features ({extractor.name})", disable=not progress, leave=False
        ):
            f, lg = extract_all(extractor, _image(batch), batch_size=batch_size, device=device)
            feats.append(f)
            if lg is not None:
                logits.append(lg)
        features = np.concatenate(feats)
        real_logits = np.concatenate(logits) if logits else None
        if write:
            save_npz(
                path,
                features=features,
                meta=np.array(json.dumps({**description, "split": split, "n": n})),
                **({"logits": real_logits} if real_logits is not None else {}),
            )
            log.info("cached real %s features of %d images at %s", extractor.name, n, path)
        return features, real_logits

    def stats(
        self,
        extractor: FeatureExtractor,
        dataset: Dataset,
        *,
        description: dict[str, Any],
        split: str,
        num_real: int | None = None,
        features: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        write: bool = True,
        progress: bool = False,
    ) -> GaussianStats:
        """Reference statistics of the first `num_real` items of `dataset` (the whole split when None), computed
        once and cached under the split's content hash (every image) and the extractor's fingerprint.

        Streaming in float64 (`FeatureStats`): memory stays flat at any split size. `features` (the same
        items' features, already extracted for KID / precision-recall) skips the extraction."""
        n = len(dataset) if num_real is None else min(int(num_real), len(dataset))
        if n < 2:
            raise ValueError(f"the {split} split has {len(dataset)} images; FID needs at least 2")
        memo = (id(dataset), n, json.dumps(description, sort_keys=True, default=str))
        if memo not in self._content:  # reads every image once per cache object, not once per extractor
            self._content[memo] = data_fingerprint(Subset(dataset, range(n)), description, probe=None)
        content = self._content[memo]
        key = hashlib.sha1(
            json.dumps({"content": content, "extractor": extractor.fingerprint}, sort_keys=True).encode(),
            usedforsecurity=False,
        ).hexdigest()
        name = description.get("class", "data").rsplit(".", 1)[-1]
        path = self.root / f"{name}_{split}_n{n}_{extractor.name}_stats_{key[:16]}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return GaussianStats(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]))
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable reference statistics %s (%s); recomputing", path, e)
        if features is not None:
            if len(features) != n:
                raise ValueError(f"{len(features)} features given for {n} reference images")
            stats = GaussianStats.from_features(features)
        else:
            self.computed += 1
            acc = FeatureStats(extractor.num_features)
            loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
            for batch in tqdm(loader, desc=f"{split} statistics", disable=not progress, leave=False):
                acc.update(extract_all(extractor, _image(batch), batch_size=batch_size, device=device)[0])
            stats = acc.stats()
        if write:
            meta = {
                **description,
                "split": split,
                "n": n,
                "content_sha1": content,
                "extractor": extractor.fingerprint,
            }
            save_npz(path, mu=stats.mu, sigma=stats.sigma, n=np.array(n), meta=np.array(json.dumps(meta)))
        return stats


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to `path` atomically (`files.atomic_save`)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_save(buffer.getvalue(), path)
