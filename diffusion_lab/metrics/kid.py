"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, over subsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> np.ndarray:
    """k(x, y) = (gamma <x, y> + coef)^degree, gamma = 1 / D by default; (N, D), (M, D) -> (N, M)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices (diagonals of k_xx, k_yy excluded); 0 in expectation, can be < 0."""
    m, n = len(k_xx), len(k_yy)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of min(subset_size, N, M) per side."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need feature sets (N, D) and (M, D), got {real.shape} and {fake.shape}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per side, got {len(real)} real and {len(fake)} fake")
    rng = np.random.default_rng(seed)
    kw = dict(degree=degree, gamma=gamma, coef=coef)
    scores = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        scores.append(
            mmd2_unbiased(
                polynomial_kernel(x, x, **kw), polynomial_kernel(y, y, **kw), polynomial_kernel(x, y, **kw)
            )
        )
    return float(np.mean(scores)), float(np.std(scores))


def kid_resampled(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> Callable[[np.ndarray], float]:
    """Unbiased MMD^2 of `fake[indices]` against one seeded real subset of min(subset_size, N) points, from kernel
    matrices computed once (the fake-fake one is (M, M): keep M to a few thousand); for the bootstrap."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    x = real[np.random.default_rng(seed).choice(len(real), min(subset_size, len(real)), replace=False)]
    kw = dict(degree=degree, gamma=gamma, coef=coef)
    k_xx = polynomial_kernel(x, x, **kw)
    xx = (k_xx.sum() - np.trace(k_xx)) / (len(x) * (len(x) - 1))
    k_yy, k_xy = polynomial_kernel(fake, fake, **kw), polynomial_kernel(x, fake, **kw)

    def kid(idx: np.ndarray) -> float:
        n = len(idx)
        yy = (k_yy[np.ix_(idx, idx)].sum() - k_yy[idx, idx].sum()) / (n * (n - 1))
        return float(xx + yy - 2 * k_xy[:, idx].mean())

    return kid
