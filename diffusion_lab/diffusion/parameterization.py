"""Prediction types (eps, v, x0, flow velocity, EDM's F): training targets and every conversion, in one place.

Notation: x_t = alpha_t x0 + sigma_t eps for any process (alpha_t, sigma_t floats or tensors broadcastable
against x, e.g. from ``Process.alpha_sigma``), r = sqrt(alpha^2 + sigma^2) (1 for VP processes).
- eps, x0: the noise or the clean sample (Ho et al. 2020).
- v = (alpha eps - sigma x0) / r: the velocity of Salimans & Ho 2022 (sec. 4) in the normalised coordinates
  x_t / r, so it is the familiar alpha eps - sigma x0 on every VP process and defined on every other one.
- flow: u = eps - x0, the flow-matching velocity (Lipman et al. 2023; dx_t/dt for alpha = 1 - t, sigma = t).
- edm: F of EDM's preconditioning (Karras et al. 2022, Table 1) in k-diffusion sigma s = sigma / alpha:
  x0_hat = c_skip x_t / alpha + c_out F, c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), written
  with alpha and sigma so that it stays finite where alpha = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("eps", "v", "x0", "flow", "edm")

Scalar = Tensor | float


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError listing PREDICTION_TYPES if ``prediction_type`` is not one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid choices: {', '.join(PREDICTION_TYPES)}"
        )


def _r2(alpha: Scalar, sigma: Scalar) -> Scalar:
    return alpha * alpha + sigma * sigma


def _edm_q(alpha: Scalar, sigma: Scalar, sigma_data: float) -> Scalar:
    """q = sigma^2 + alpha^2 sd^2 = alpha^2 (s^2 + sd^2): EDM's coefficients in (alpha, sigma) form."""
    return sigma * sigma + alpha * alpha * sigma_data**2


def training_target(
    prediction_type: str,
    x0: Tensor,
    noise: Tensor,
    alpha_t: Scalar,
    sigma_t: Scalar,
    *,
    sigma_data: float = 0.5,
) -> Tensor:
    """What the network regresses for ``prediction_type`` (eps -> noise, x0 -> x0, v, flow, edm: see above)."""
    return from_x0_eps(prediction_type, x0, noise, alpha_t, sigma_t, sigma_data=sigma_data)


def from_x0_eps(
    prediction_type: str,
    x0: Tensor,
    eps: Tensor,
    alpha_t: Scalar,
    sigma_t: Scalar,
    *,
    sigma_data: float = 0.5,
) -> Tensor:
    """The model output of ``prediction_type`` that corresponds to the pair (x0, eps)."""
    check_prediction_type(prediction_type)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "edm":  # (x0 - c_skip x_t / alpha) / c_out
        q = _edm_q(alpha_t, sigma_t, sigma_data)
        return (sigma_t * x0 - alpha_t * sigma_data**2 * eps) / (sigma_data * _sqrt(q))
    return (alpha_t * eps - sigma_t * x0) / _sqrt(_r2(alpha_t, sigma_t))


def to_x0_eps(
    prediction_type: str,
    model_output: Tensor,
    x_t: Tensor,
    alpha_t: Scalar,
    sigma_t: Scalar,
    *,
    sigma_data: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output of ``prediction_type`` at x_t (DDIM eq. 9; v: Salimans & Ho eq. 9)."""
    check_prediction_type(prediction_type)
    if prediction_type == "eps":
        eps = model_output
        return (x_t - sigma_t * eps) / alpha_t, eps
    if prediction_type == "x0":
        x0 = model_output
        return x0, (x_t - alpha_t * x0) / sigma_t
    if prediction_type == "flow":
        u = model_output
        x0 = (x_t - sigma_t * u) / (alpha_t + sigma_t)
        return x0, x0 + u
    if prediction_type == "edm":
        q = _edm_q(alpha_t, sigma_t, sigma_data)
        x0 = (sigma_data**2 * alpha_t) / q * x_t + sigma_t * sigma_data / _sqrt(q) * model_output
        return x0, (x_t - alpha_t * x0) / sigma_t
    v, r2 = model_output, _r2(alpha_t, sigma_t)
    r = _sqrt(r2)
    return alpha_t / r2 * x_t - sigma_t / r * v, sigma_t / r2 * x_t + alpha_t / r * v


def convert(
    model_output: Tensor, x_t: Tensor, alpha_t: Scalar, sigma_t: Scalar, *, source: str, target: str
) -> Tensor:
    """Re-express a model output of type ``source`` as type ``target`` (e.g. v -> eps)."""
    x0, eps = to_x0_eps(source, model_output, x_t, alpha_t, sigma_t)
    return from_x0_eps(target, x0, eps, alpha_t, sigma_t)


def x0_error_scale(prediction_type: str, snr: Tensor, *, sigma_data: float = 0.5) -> Tensor:
    """(d x0_hat / d F)^2 as a function of snr = alpha^2 / sigma^2: a squared error in the model output F
    times this is the squared error of x0_hat (eps: 1 / snr, v: 1 / (1 + snr), x0: 1, flow: 1 / (1 + sqrt(snr))^2,
    edm: c_out^2 = sd^2 / (1 + sd^2 snr)). Loss weightings defined on x0 use it to weigh every prediction type."""
    check_prediction_type(prediction_type)
    snr = snr.float()
    if prediction_type == "eps":
        return 1 / snr
    if prediction_type == "v":
        return 1 / (1 + snr)
    if prediction_type == "x0":
        return torch.ones_like(snr)
    if prediction_type == "flow":
        return 1 / (1 + snr.sqrt()) ** 2
    return sigma_data**2 / (1 + sigma_data**2 * snr)


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else x**0.5
