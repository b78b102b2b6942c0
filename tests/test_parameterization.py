"""Objectives (eps, v, x0, flow, edm), their conversions and training targets, and the loss weightings."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffusion_lab.diffusion import (
    LOSS_WEIGHTINGS,
    OBJECTIVES,
    convert,
    diffusion_loss,
    get_loss_weighting,
    get_objective,
    get_process,
)


def sample(seed: int = 0, dtype=torch.float64):
    """x0, eps, a batch of timesteps and their (alpha_t, sigma_t) from the cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    schedule = get_process("cosine")
    x0, eps = (
        torch.randn(4, 3, 5, 5, generator=g, dtype=dtype),
        torch.randn(4, 3, 5, 5, generator=g, dtype=dtype),
    )
    t = torch.tensor([0, 200, 600, 980])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    return schedule, x0, eps, t, alpha, sigma


@pytest.mark.parametrize("prediction_type", list(OBJECTIVES))
def test_to_x0_eps_inverts_the_target(prediction_type):
    _, x0, eps, _, alpha, sigma = sample()
    x_t = alpha * x0 + sigma * eps
    target = get_objective(prediction_type).target(x0, eps, alpha, sigma)
    x0_hat, eps_hat = get_objective(prediction_type).denoised(target, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("source,target", list(itertools.product(OBJECTIVES, repeat=2)))
def test_round_trips_between_all_types(source, target):
    _, x0, eps, _, alpha, sigma = sample(1)
    x_t = alpha * x0 + sigma * eps
    out = get_objective(source).target(x0, eps, alpha, sigma)
    there = convert(out, x_t, alpha, sigma, source=source, target=target)
    torch.testing.assert_close(
        there, get_objective(target).target(x0, eps, alpha, sigma), atol=1e-9, rtol=1e-9
    )
    back = convert(there, x_t, alpha, sigma, source=target, target=source)
    torch.testing.assert_close(back, out, atol=1e-9, rtol=1e-9)


def test_closed_forms_of_the_targets():
    _, x0, eps, _, alpha, sigma = sample(2)
    assert get_objective("eps").target(x0, eps, alpha, sigma) is eps
    assert get_objective("x0").target(x0, eps, alpha, sigma) is x0
    torch.testing.assert_close(get_objective("v").target(x0, eps, alpha, sigma), alpha * eps - sigma * x0)
    # v is the time derivative of x_phi = cos(phi) x0 + sin(phi) eps with alpha = cos(phi) (Salimans & Ho)
    phi = torch.atan2(sigma, alpha)
    torch.testing.assert_close(
        get_objective("v").target(x0, eps, alpha, sigma), -torch.sin(phi) * x0 + torch.cos(phi) * eps
    )


def test_v_target_matches_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    schedule, x0, eps, t, _, _ = sample(3, dtype=torch.float32)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").get_velocity(x0, eps, t)
    torch.testing.assert_close(get_objective("v").target(x0, eps, alpha, sigma), ref, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_lists_the_choices():
    _, x0, eps, _, alpha, sigma = sample()
    for fn in (
        lambda: get_objective("epsilon").target(x0, eps, alpha, sigma),
        lambda: get_objective("velocity").denoised(x0, x0, alpha, sigma),
    ):
        with pytest.raises(
            ValueError,
            match="unknown objective '.*'; valid choices: consistency, edm, eps, flow, meanflow, shortcut, v, x0",
        ):
            fn()


# ----------------------------------------------------------------------------------------------------------
# Loss weighting


def test_weighting_registry_and_uniform():
    assert set(LOSS_WEIGHTINGS) >= {"uniform", "min_snr"}
    snr = torch.tensor([0.01, 1.0, 100.0])
    torch.testing.assert_close(
        get_loss_weighting("uniform")(snr, objective=get_objective("v")), torch.ones(3)
    )


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0])
    w = {p: get_loss_weighting("min_snr", gamma=5.0)(snr, objective=get_objective(p)) for p in OBJECTIVES}
    clipped = torch.tensor([0.0, 0.5, 5.0, 5.0])
    torch.testing.assert_close(w["x0"], clipped)
    torch.testing.assert_close(w["eps"], torch.tensor([1.0, 1.0, 1.0, 0.25]))  # min(snr, 5) / snr; 1 at snr 0
    torch.testing.assert_close(w["v"], clipped / (snr + 1))


@pytest.mark.parametrize("prediction_type", list(OBJECTIVES))
def test_min_snr_is_one_objective_in_every_parameterization(prediction_type):
    """Hang et al.: the weighted loss equals min(snr, gamma) * |x0_hat - x0|^2 whatever the net predicts."""
    schedule, x0, eps, t, alpha, sigma = sample(4)
    x_t = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=x0.dtype)
    eps_hat = (x_t - alpha * x0_hat) / sigma
    out = get_objective(prediction_type).target(x0_hat, eps_hat, alpha, sigma)
    target = get_objective(prediction_type).target(x0, eps, alpha, sigma)
    snr = schedule.snrs[t]
    weight = get_loss_weighting("min_snr", gamma=5.0)(snr, objective=get_objective(prediction_type))
    per_sample_x0 = (x0_hat - x0).pow(2).flatten(1).mean(1)
    expected = (snr.clamp(max=5.0) * per_sample_x0).mean()
    torch.testing.assert_close(diffusion_loss(out, target, weight).double(), expected, rtol=1e-4, atol=0)


def test_diffusion_loss():
    a = torch.zeros(3, 2, 2)
    b = torch.stack([torch.full((2, 2), v) for v in (1.0, 2.0, 3.0)])  # per-sample mse 1, 4, 9
    assert diffusion_loss(a, b).item() == pytest.approx(14 / 3)
    assert diffusion_loss(a, b, torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(3 / 3)
    half = diffusion_loss(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32 and half.ndim == 0
    with pytest.raises(ValueError, match="one per sample"):
        diffusion_loss(a, b, torch.ones(3, 1))
    with pytest.raises(ValueError, match="differ"):
        diffusion_loss(a, b[:2])


def test_weighting_failures_are_loud():
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'; valid choices: min_snr, uniform"):
        get_loss_weighting("snr")
    with pytest.raises(TypeError, match="valid options: gamma"):
        get_loss_weighting("min_snr", gama=5)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        get_loss_weighting("min_snr", gamma=0)(torch.ones(2), objective=get_objective("eps"))
