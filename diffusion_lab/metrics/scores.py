"""Scores from a judge network's logits: Inception Score (Salimans et al. 2016) and conditional accuracy."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of the samples: (mean, std). 1 = uninformative, K = perfect."""
    logp = log_softmax(np.asarray(logits, np.float64), axis=1)  # (N, K)
    splits = max(1, min(splits, len(logp)))
    scores = []
    for part in np.array_split(logp, splits):
        p_y = np.exp(part).mean(axis=0)  # marginal (K,)
        kl = (np.exp(part) * (part - np.log(np.clip(p_y, 1e-30, None)))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def conditional_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples the judge classifies as the label they were generated for."""
    labels = np.asarray(labels)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} logits vs {len(labels)} labels")
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())
