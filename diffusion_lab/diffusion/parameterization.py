"""Prediction types (eps, v, x0): training targets and every conversion between them, in one place.

Variance-preserving notation: x_t = alpha_t x0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, and the
velocity v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
alpha_t and sigma_t are floats or tensors broadcastable against x (e.g. from ``NoiseSchedule.alpha_sigma``).
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("eps", "v", "x0")

Scalar = Tensor | float


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError listing PREDICTION_TYPES if ``prediction_type`` is not one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid choices: {', '.join(PREDICTION_TYPES)}"
        )


def training_target(
    prediction_type: str, x0: Tensor, noise: Tensor, alpha_t: Scalar, sigma_t: Scalar
) -> Tensor:
    """What the network regresses for ``prediction_type``: eps -> noise, x0 -> x0, v -> alpha eps - sigma x0."""
    return from_x0_eps(prediction_type, x0, noise, alpha_t, sigma_t)


def from_x0_eps(prediction_type: str, x0: Tensor, eps: Tensor, alpha_t: Scalar, sigma_t: Scalar) -> Tensor:
    """The model output of ``prediction_type`` that corresponds to the pair (x0, eps)."""
    check_prediction_type(prediction_type)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    return alpha_t * eps - sigma_t * x0


def to_x0_eps(
    prediction_type: str, model_output: Tensor, x_t: Tensor, alpha_t: Scalar, sigma_t: Scalar
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output of ``prediction_type`` at x_t (DDIM eq. 9; v: Salimans & Ho eq. 9)."""
    check_prediction_type(prediction_type)
    if prediction_type == "eps":
        eps = model_output
        return (x_t - sigma_t * eps) / alpha_t, eps
    if prediction_type == "x0":
        x0 = model_output
        return x0, (x_t - alpha_t * x0) / sigma_t
    v = model_output
    return alpha_t * x_t - sigma_t * v, alpha_t * v + sigma_t * x_t


def convert(
    model_output: Tensor, x_t: Tensor, alpha_t: Scalar, sigma_t: Scalar, *, source: str, target: str
) -> Tensor:
    """Re-express a model output of type ``source`` as type ``target`` (e.g. v -> eps)."""
    x0, eps = to_x0_eps(source, model_output, x_t, alpha_t, sigma_t)
    return from_x0_eps(target, x0, eps, alpha_t, sigma_t)
