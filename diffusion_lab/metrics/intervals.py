"""Uncertainty of metrics: the seeded bootstrap over generated samples, Student-t intervals over seeds, Welch's
t-test between groups of seeds and Holm's step-down correction for testing many pairs at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95  # every interval the framework writes is a 95% interval unless told otherwise
RESAMPLES = 200  # bootstrap resamples (B)


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], Mapping[str, float]],
    n: int,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    point: Mapping[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """{name: (low, high)} for each value of `statistic(indices)` over `resamples` seeded resamples (with
    replacement) of the n generated samples.

    The interval is the basic bootstrap pivoted on the bootstrap's own median m: for a point value T = statistic(
    arange(n)), [T - (q_hi - m), T - (q_lo - m)] with q the (1 -+ level) / 2 quantiles of the resampled values.
    It is an interval for the metric's expected value at this n (what another set of n samples would give on
    average); the bias a resample's duplicates add to FID-like statistics cancels in q - m. For a plain mean it
    is the usual basic / percentile interval. `point` replaces T where the reported value comes from another
    (equivalent or subset-averaged) computation."""
    if n < 2:
        raise ValueError(f"the bootstrap needs at least 2 samples, got {n}")
    if resamples < 2 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 2 and 0 < level < 1, got {resamples} and {level}")
    point = {**statistic(np.arange(n)), **(point or {})}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(resamples):
        values = statistic(rng.integers(0, n, size=n))
        for k in draws:
            draws[k].append(float(values[k]))
    out = {}
    for k, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) < 2 or not np.isfinite(point[k]):
            out[k] = (math.nan, math.nan)
            continue
        q_lo, m, q_hi = np.quantile(v, [(1 - level) / 2, 0.5, (1 + level) / 2])
        out[k] = (float(point[k] - (q_hi - m)), float(point[k] - (q_lo - m)))
    return out


def mean_interval(values: np.ndarray, **kwargs) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-sample values (accuracy, adherence, precision as indicators)."""
    v = np.asarray(values, dtype=np.float64)
    return bootstrap_intervals(lambda idx: {"mean": v[idx].mean()}, len(v), **kwargs)["mean"]


def t_interval(values: Sequence[float], *, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of n >= 2 independent values (e.g. one metric over seeds)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(v)}")
    half = scipy_stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) = mean(b): (t, degrees of freedom, two-sided p)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t needs at least 2 values per group, got {len(a)} and {len(b)}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # no spread at all: equal means are no evidence, different ones infinite
        return (
            (0.0, math.nan, 1.0)
            if a.mean() == b.mean()
            else (math.copysign(math.inf, a.mean() - b.mean()), math.nan, 0.0)
        )
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(t), float(df), float(2 * scipy_stats.t.sf(abs(t), df))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over all the tests given)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
