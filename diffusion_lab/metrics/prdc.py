"""Improved precision and recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020) on
k-nearest-neighbour manifolds of feature sets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances (N, M), computed in row chunks."""
    return torch.cat([torch.cdist(x[i : i + chunk], y) for i in range(0, len(x), chunk)])


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set, itself excluded: (N,)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(x)}")
    return _distances(x, x).kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """precision = share of fake points inside the real manifold (union of real k-NN balls); recall = share of
    real points inside the fake manifold; density / coverage (Naeem et al.) from the real balls."""
    return prdc_resampled(real, fake, k=k)(np.arange(len(fake)))


def prdc_resampled(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3
) -> Callable[[np.ndarray], dict[str, float]]:
    """precision / recall / density / coverage of `fake[indices]` from one distance computation (for the
    bootstrap): a resample keeps each fake point's k-NN ball (its radius in the whole fake set), so duplicates
    do not shrink radii to 0."""
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need feature sets (N, D) and (M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    r_real, r_fake = knn_radii(x, k), knn_radii(y, k)
    d = _distances(x, y)  # (N_real, M_fake)
    inside_real = (d <= r_real[:, None]).numpy()  # fake j inside the ball of real i
    inside_fake = (d <= r_fake[None, :]).numpy()  # real i inside the ball of fake j
    in_manifold = inside_real.any(axis=0)  # (M,) fake j inside the real manifold
    counts = inside_real.sum(axis=0) / k  # (M,) real balls holding fake j, over k

    def prdc(idx: np.ndarray) -> dict[str, float]:
        chosen = np.unique(idx)
        return {
            "precision": float(in_manifold[idx].mean()),
            "recall": float(inside_fake[:, chosen].any(axis=1).mean()),
            "density": float(counts[idx].mean()),
            "coverage": float(
                inside_real[:, chosen].any(axis=1).mean()
            ),  # nearest chosen fake inside the ball
        }

    return prdc
