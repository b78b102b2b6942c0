"""Every metric of one generated feature set against the real reference, each with its 95% bootstrap interval over
the generated samples (`<metric>_lo`, `<metric>_hi` beside `<metric>`): what evaluate writes per cell."""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from diffusion_lab.metrics.fid import GaussianStats, fid_infinity, fid_resampled, frechet_distance
from diffusion_lab.metrics.intervals import LEVEL, RESAMPLES, bootstrap_intervals, mean_interval
from diffusion_lab.metrics.kid import kernel_inception_distance, kid_resampled
from diffusion_lab.metrics.prdc import prdc_resampled
from diffusion_lab.metrics.scores import inception_score

log = logging.getLogger(__name__)
KID_BOOTSTRAP_MAX = 4000  # the KID bootstrap holds an (M, M) kernel: above this, a subset with scaled spread


def score_with_intervals(
    name: str,
    real: np.ndarray,
    fake: np.ndarray,
    logits: np.ndarray | None,
    *,
    metrics: Collection[str],
    real_stats: GaussianStats | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float]:
    """{fid_<name>, fid_inf_<name>, kid_<name>, kid_<name>_std, precision_<name>, recall_<name>, is_<name>} (those
    asked for in `metrics`), each value but fid_inf with `_lo` / `_hi`: the bootstrap interval (`intervals.bootstrap_intervals`, `resamples`
    resamples of the generated set, seeded by `seed`). FID is against `real_stats` (e.g. a whole split's cached
    statistics) when given, else against the statistics of `real`."""
    fake = np.asarray(fake)
    n = len(fake)
    boot = dict(resamples=resamples, level=level, seed=seed)
    out: dict[str, float] = {}

    def put(key: str, value: float, interval: tuple[float, float]) -> None:
        out[key], out[f"{key}_lo"], out[f"{key}_hi"] = value, interval[0], interval[1]

    if "fid" in metrics:
        stats = real_stats if real_stats is not None else GaussianStats.from_features(real)
        value = frechet_distance(GaussianStats.from_features(fake), stats)
        fid = fid_resampled(fake, stats)
        lo, hi = bootstrap_intervals(lambda i: {"v": fid(i)}, n, point={"v": value}, **boot)["v"]
        put(f"fid_{name}", value, (max(lo, 0.0), hi))  # FID >= 0: the pivot's long right tail can cross 0
    if (
        "fid_infinity" in metrics
    ):  # Chong & Forsyth 2020; a point value (its bootstrap would cost 15 FIDs each)
        stats = real_stats if real_stats is not None else GaussianStats.from_features(real)
        out[f"fid_inf_{name}"] = fid_infinity(fake, stats, seed=seed)[0]
    if "kid" in metrics:
        mean, std = kernel_inception_distance(
            real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        put(f"kid_{name}", mean, _kid_interval(real, fake, mean, subset_size=kid_subset_size, **boot))
        out[f"kid_{name}_std"] = std
    if "precision_recall" in metrics:
        prdc = prdc_resampled(real, fake, k=pr_k)
        values = prdc(np.arange(n))
        intervals = bootstrap_intervals(prdc, n, **boot)
        for key in ("precision", "recall"):
            put(f"{key}_{name}", values[key], intervals[key])
    if "inception_score" in metrics and logits is not None:
        lg = np.asarray(logits)
        value = inception_score(lg)[0]
        interval = bootstrap_intervals(
            lambda i: {"v": inception_score(lg[i])[0]}, n, point={"v": value}, **boot
        )
        put(f"is_{name}", value, interval["v"])
    return out


def _kid_interval(
    real: np.ndarray,
    fake: np.ndarray,
    point: float,
    *,
    subset_size: int,
    resamples: int,
    level: float,
    seed: int,
) -> tuple[float, float]:
    """KID's interval: the bootstrap of the unbiased MMD^2 of the fake set against one real subset, pivoted on
    the subset-averaged point value. Above KID_BOOTSTRAP_MAX fake samples it runs on a seeded subset of that
    size and its spread is scaled by sqrt(subset / n) (the 1/n variance of a non-degenerate U-statistic)."""
    m = min(len(fake), KID_BOOTSTRAP_MAX)
    part = fake if m == len(fake) else fake[np.random.default_rng(seed).choice(len(fake), m, replace=False)]
    kid = kid_resampled(real, part, subset_size=subset_size, seed=seed)
    t0 = kid(np.arange(m))
    lo, hi = bootstrap_intervals(lambda i: {"v": kid(i)}, m, resamples=resamples, level=level, seed=seed)["v"]
    scale = np.sqrt(m / len(fake))
    return float(point + (lo - t0) * scale), float(point + (hi - t0) * scale)


def accuracy_with_interval(
    logits: np.ndarray, labels: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """(conditional accuracy, low, high): share of samples classified as their label, bootstrap interval."""
    labels = np.asarray(labels)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} logits vs {len(labels)} labels")
    correct = (np.asarray(logits).argmax(axis=1) == labels).astype(np.float64)
    return (float(correct.mean()), *mean_interval(correct, resamples=resamples, level=level, seed=seed))
