"""Power-function EMA profiles (Karras et al. 2024, EDM2 `training/phema.py`): the maths of post-hoc EMA.

The maths (the paper's Appendix C, in its names): a power-function EMA of exponent gamma averages the weights
theta(tau), 0 <= tau <= t, with the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1); its relative
standard deviation sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) says its length as a share of the
training time. Tracked step by step with beta_t = (1 - 1 / t)^(gamma + 1), it averages the weights theta_s after
step s with the profile integrated over (s - 1, s] exactly. Snapshots of such EMAs at several times and lengths
span profiles; the EMA of any other length is the combination of snapshots whose profile is closest in L2 to
the wanted one (least squares on the profiles' closed-form inner products), applied to the snapshots' weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0: the plain average of all weights so far


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of the power-function profile with relative standard deviation sigma_rel: the largest
    real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) (Eq. 126, Algorithm 2)."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all((s > 0) & (s < SIGMA_REL_MAX)):
        raise ValueError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (the plain average), got {sigma_rel}"
        )
    gamma = [np.roots([1.0, 7.0, 16.0 - v**-2, 12.0 - v**-2]).real.max() for v in s.reshape(-1)]
    return np.asarray(gamma, dtype=np.float64).reshape(s.shape)


def power_ema_beta(gamma: float, step: int) -> float:
    """beta_t = (1 - 1 / t)^(gamma + 1): the decay after optimizer step t >= 1 that tracks the power-function
    profile (Eq. 127 with one step per unit of time); 0 at t = 1, where the EMA starts as a copy."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> = integral of p_{t_a, gamma_a}(tau) p_{t_b, gamma_b}(tau) d tau over [0, min(t_a, t_b)]
    = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_max) (t_min / t_max)^(gamma of the longer one)
    (Eq. 151, Algorithm 3), broadcast over the arguments."""
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, dtype=np.float64), np.asarray(gamma_b, dtype=np.float64)
    t_max, t_min = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_long = np.where(t_a < t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max)
    return scale * (t_min / t_max) ** gamma_long


def posthoc_coefficients(
    in_steps: Sequence[int],
    in_sigma_rels: Sequence[float],
    out_step: int,
    out_sigma_rels: Sequence[float],
) -> np.ndarray:
    """(inputs, outputs) weights x minimising || sum_i x_i p_i - p_out ||_2 for every output profile: the
    solution of the Gram system A x = b of the inputs' profiles (Algorithm 3), each column then scaled to sum
    to 1 so that weights that never changed are reproduced exactly."""
    in_t = np.asarray(in_steps, dtype=np.float64)
    in_g = sigma_rel_to_gamma(np.asarray(in_sigma_rels, dtype=np.float64))
    out_g = sigma_rel_to_gamma(np.asarray(out_sigma_rels, dtype=np.float64))
    gram = profile_inner_products(in_t[:, None], in_g[:, None], in_t[None, :], in_g[None, :])  # (I, I)
    b = profile_inner_products(in_t[:, None], in_g[:, None], float(out_step), out_g[None, :])  # (I, O)
    x = np.linalg.solve(gram, b)
    return x / x.sum(axis=0, keepdims=True)
