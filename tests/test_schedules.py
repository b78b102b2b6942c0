"""Noise schedules: closed forms, parity with diffusers' tables and timesteps, and q(x_t | x_0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion import BETA_SCHEDULES, DiscreteProcess, get_process
from diffusion_lab.diffusion.grids import SPACINGS


def _diffusers():
    """diffusers is a test oracle only (the dev extra): the parity tests skip without it, the others run."""
    return pytest.importorskip("diffusers")


DIFFUSERS_NAME = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
DIFFUSERS_BETAS = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}


def diffusers_ddpm(name: str, num_timesteps: int = 1000, **kwargs):
    return _diffusers().DDPMScheduler(
        num_train_timesteps=num_timesteps,
        beta_schedule=DIFFUSERS_NAME[name],
        **DIFFUSERS_BETAS.get(name, {}),
        **kwargs,
    )


def test_registry_lists_the_schedules():
    assert set(BETA_SCHEDULES) >= {"linear", "scaled_linear", "cosine", "sigmoid"}


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAME))
def test_alphas_cumprod_match_diffusers(name, rescale):
    ours = get_process(name, rescale_zero_terminal_snr=rescale)
    ref = diffusers_ddpm(name, rescale_betas_zero_snr=rescale)
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.alphas_cumprod.shape == (1000,)
    # diffusers builds its tables in float32 (the rescale adds a few ulps): compare to float32 precision
    atol = 5e-7 if rescale else 1e-7
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=2e-5, atol=atol)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=atol / 5)


def test_closed_forms():
    T = 1000
    lin = get_process("linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(
        lin.betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64)
    )
    sl = get_process("scaled_linear")
    root = sl.betas.sqrt()
    assert root[0].item() == pytest.approx(0.00085**0.5) and root[-1].item() == pytest.approx(0.012**0.5)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(T - 1))  # linear in sqrt space
    # cosine: ab_t = f(t + 1) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2), until betas hit 0.999
    cos = get_process("cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 1, 10, 500, 900, 990]:
        assert cos.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert cos.betas.max().item() == pytest.approx(0.999) and cos.betas[-1].item() == pytest.approx(0.999)
    sig = get_process("sigmoid", beta_start=0.001, beta_end=0.03, num_timesteps=11)
    expected = 0.001 + (0.03 - 0.001) / (1 + np.exp(-np.linspace(-6, 6, 11)))
    np.testing.assert_allclose(sig.betas.numpy(), expected, rtol=1e-12)
    # derived tables
    torch.testing.assert_close(lin.alphas_cumprod, torch.cumprod(1 - lin.betas, 0))
    torch.testing.assert_close(
        lin.sqrt_alphas_cumprod**2 + lin.sqrt_one_minus_alphas_cumprod**2, torch.ones(T, dtype=torch.float64)
    )
    torch.testing.assert_close(lin.sigmas, ((1 - lin.alphas_cumprod) / lin.alphas_cumprod).sqrt())


def test_zero_terminal_snr():
    plain, ztsnr = (
        get_process("scaled_linear"),
        get_process("scaled_linear", rescale_zero_terminal_snr=True),
    )
    assert ztsnr.alphas_cumprod[-1].item() == 0.0 and plain.alphas_cumprod[-1].item() > 1e-3
    assert ztsnr.snr(torch.tensor([999])).item() == 0.0
    assert ztsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    # Lin et al.: sqrt(ab) is shifted and scaled, i.e. an affine map of the original sqrt(ab)
    a, b = plain.sqrt_alphas_cumprod, ztsnr.sqrt_alphas_cumprod
    scale = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, (a - a[-1]) * scale)
    assert ztsnr.sigmas[-1].item() == pytest.approx(
        (2.0**24 - 1) ** 0.5
    )  # finite, as diffusers' 2**-24 clamp


@pytest.mark.parametrize("num_timesteps", [1000, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_inference_timesteps_match_diffusers(spacing, num_timesteps):
    schedule = get_process("linear", num_timesteps=num_timesteps)
    ref = diffusers_ddpm("linear", num_timesteps, timestep_spacing=spacing)
    checked = 0
    for steps in sorted({1, 2, 3, 7, 10, 20, 25, 49, num_timesteps // 3, num_timesteps}):
        ref.set_timesteps(steps)
        ours = schedule.inference_timesteps(steps, spacing)
        assert ours.dtype == torch.long and len(ours) == steps
        assert (ours.diff() < 0).all() or spacing == "leading" and steps == num_timesteps or steps == 1
        if len(ref.timesteps) == steps:  # see test_trailing_spacing_never_goes_below_zero
            assert ours.tolist() == ref.timesteps.tolist(), steps
            checked += 1
    assert checked >= 8


def test_trailing_spacing_never_goes_below_zero():
    """Documented deviation: diffusers' float arange yields steps + 1 timesteps ending in -1 for some step
    counts (e.g. 61 of 1000); we compute trailing timesteps exactly and agree on the first `steps`."""
    schedule = get_process("linear")
    ref = diffusers_ddpm("linear", timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1].item() == -1
    ours = schedule.inference_timesteps(61, "trailing")
    assert ours.tolist() == ref.timesteps[:61].tolist() and ours.min().item() >= 0


@pytest.mark.parametrize("spacing", SPACINGS)
def test_unrounded_timesteps_match_diffusers_euler(spacing):
    schedule = get_process("linear")
    ref = _diffusers().EulerDiscreteScheduler(timestep_spacing=spacing)
    ref.set_timesteps(13)
    ours = schedule.inference_timesteps(13, spacing, rounded=False)
    assert ours.dtype == torch.float64
    np.testing.assert_array_equal(ours.numpy(), ref.timesteps.numpy().astype(np.float64))
    # and the interpolated sigmas (without the appended 0); diffusers' float32 1 - ab_0 costs ~1e-4 at t = 0
    np.testing.assert_allclose(schedule.sigma_at(ours).numpy(), ref.sigmas[:-1].numpy(), rtol=1e-4)


def test_sigma_at_interpolates_like_numpy():
    schedule = get_process("cosine", num_timesteps=100)
    t = torch.tensor([0.0, 0.25, 17.5, 42.0, 98.9, 99.0])
    expected = np.interp(t.numpy(), np.arange(100), schedule.sigmas.numpy())
    np.testing.assert_allclose(schedule.sigma_at(t).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAME))
def test_add_noise_matches_diffusers(name):
    schedule, ref = get_process(name), diffusers_ddpm(name)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(
        schedule.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5
    )


def test_add_noise_statistics():
    """Over many noise draws x_t has mean sqrt(ab_t) x0 and variance 1 - ab_t (Ho et al. 2020, eq. 4)."""
    schedule = get_process("cosine")
    n, t = 20000, torch.tensor([10, 300, 700, 990])
    x0 = torch.tensor([1.5, -0.5, 2.0, 0.7]).view(4, 1)
    noise = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    x_t = schedule.add_noise(x0.expand(4, n), noise, t).double()
    ab = schedule.alphas_cumprod[t]
    se = 4 / n**0.5  # a 4-standard-error band
    assert ((x_t.mean(1) - ab.sqrt() * x0.view(4).double()).abs() < se * (1 - ab).sqrt()).all()
    assert ((x_t.var(1) / (1 - ab) - 1).abs() < 4 * (2 / n) ** 0.5).all()


def test_add_noise_shapes_dtypes_and_broadcasting():
    schedule = get_process("linear")
    t = torch.tensor([3, 900])
    for shape in [(2,), (2, 5), (2, 7, 16), (2, 3, 4, 4), (2, 1, 2, 3, 3)]:
        x0, noise = torch.ones(shape), torch.zeros(shape)
        x_t = schedule.add_noise(x0, noise, t)
        assert x_t.shape == shape
        torch.testing.assert_close(x_t.reshape(2, -1)[:, 0], schedule.sqrt_alphas_cumprod[t].float())
    half = schedule.add_noise(torch.ones(2, 3).bfloat16(), torch.ones(2, 3).bfloat16(), t)
    assert half.dtype == torch.bfloat16
    alpha, sigma = schedule.alpha_sigma(t, torch.zeros(2, 3, 4, 4))
    assert alpha.shape == sigma.shape == (2, 1, 1, 1) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(2, 1, 1, 1))
    with pytest.raises(TypeError, match="integer timesteps"):
        schedule.add_noise(x0, noise, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="add_noise wants"):
        schedule.add_noise(torch.ones(3, 2), torch.ones(3, 2), t)


def test_snr():
    schedule = get_process("linear")
    t = torch.tensor([0, 100, 999])
    ab = schedule.alphas_cumprod[t]
    snr = schedule.snr(t)
    assert snr.dtype == torch.float32 and snr.shape == (3,)
    torch.testing.assert_close(snr, (ab / (1 - ab)).float())
    assert (schedule.snr(torch.arange(1000)).diff() < 0).all()  # strictly decreasing


def test_schedule_is_a_plain_object_with_cached_tables():
    schedule = get_process("linear")
    assert not isinstance(schedule, torch.nn.Module) and isinstance(schedule, DiscreteProcess)
    a = schedule.table("sqrt_alphas_cumprod", device="cpu", dtype=torch.float32)
    assert a is schedule.table("sqrt_alphas_cumprod", device="cpu", dtype=torch.float32)
    assert schedule.name == "linear" and schedule.num_timesteps == 1000 and "linear" in repr(schedule)


def test_failures_are_loud():
    with pytest.raises(ValueError, match="unknown noise process 'cosin'; valid choices: cosine, linear"):
        get_process("cosin")
    with pytest.raises(ValueError, match="num_timesteps must be an integer >= 1"):
        get_process("linear", num_timesteps=0)
    with pytest.raises(TypeError, match="unknown option.*beta_min.*valid options: beta_start, beta_end"):
        get_process("linear", beta_min=0.1)
    with pytest.raises(ValueError, match="betas must lie in"):
        get_process("linear", beta_start=0.0)
    schedule = get_process("linear", num_timesteps=10)
    for steps in [0, 11]:
        with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.10"):
            schedule.inference_timesteps(steps)
    with pytest.raises(ValueError, match="valid choices: leading, trailing, linspace"):
        schedule.inference_timesteps(5, "uniform")
