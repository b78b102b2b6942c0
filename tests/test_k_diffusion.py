"""euler / heun / dpmpp_2m on the Karras grid against k-diffusion's own loops, on one oracle denoiser."""

from __future__ import annotations

import pytest
import torch
from tqdm.auto import trange

from diffusion_lab.diffusion import get_process, get_sampler

# ---------------------------------------------------------------------------------------------------------
# The oracle: k-diffusion's sample_euler, sample_heun, sample_dpmpp_2m and get_sigmas_karras, verbatim from
# crowsonkb/k-diffusion k_diffusion/sampling.py at commit 4601bf085320592473f681a62808ed873d17fad5 (the same
# in the PyPI release 0.1.1.post1). Ported, not imported: k_diffusion/utils.py imports torchvision.


def append_dims(x, target_dims):
    """Appends dimensions to the end of a tensor until it has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Constructs the noise schedule of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def to_d(x, sigma, denoised):
    """Converts a denoiser output to a Karras ODE derivative."""
    return (x - denoised) / append_dims(sigma, x.ndim)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float("inf"), s_noise=1.):  # fmt: skip
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        # Euler method
        x = x + d * dt
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float("inf"), s_noise=1.):  # fmt: skip
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            # Euler method
            x = x + d * dt
        else:
            # Heun's method
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None

    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


K_DIFFUSION = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}

# ---------------------------------------------------------------------------------------------------------
# The same denoiser for both: the exact posterior mean of Gaussian data x0 ~ N(MU, SD^2 I)

SHAPE = (2, 3, 4, 4)
MU = torch.linspace(-0.8, 0.8, 48, dtype=torch.float64).reshape(1, 3, 4, 4)
SD = 0.5


def oracle(x_k: torch.Tensor, ksigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + ksigma eps = x_k] (k-diffusion's D(x; sigma)), computed in float64."""
    s2 = append_dims(ksigma.double(), x_k.ndim) ** 2
    return ((SD**2 * x_k.double() + s2 * MU) / (SD**2 + s2)).to(x_k.dtype)


def net_for(process):
    """The oracle as an x0-prediction net of ``process``: x_t at noise level t -> x0_hat (k-diffusion sigma
    from t: ve nets see c_noise = ln(sigma) / 4, discrete VP nets a (fractional) timestep)."""

    def net(x_t, level):
        if process.discrete:
            ksigma = process.sigma_at(level.double())
        else:
            ksigma = (4 * level.double()).exp()
        alpha = (1 + ksigma**2).rsqrt() if process.discrete else torch.ones_like(ksigma)
        return oracle(x_t / append_dims(alpha, x_t.ndim).to(x_t.dtype), ksigma)

    return net


@pytest.mark.parametrize("process_name", ["ve", "linear"])
@pytest.mark.parametrize("name", sorted(K_DIFFUSION))
def test_karras_grid_samplers_match_k_diffusion(name, process_name):
    """Same grid, same start (x_T * sigma_max, k-diffusion's and EDM's convention) and the same steps: ours and
    k-diffusion's agree to ~1e-6 on the ve process (EDM) and on a discrete VP process in k-diffusion's
    coordinates (x / alpha; DiscreteEpsDDPMDenoiser's view of a DDPM)."""
    process, steps = get_process(process_name), 12
    sampler = get_sampler(name, steps=steps, grid="karras")
    grid = sampler.grid(process)
    sigmas = get_sigmas_karras(steps, process.sigma_min, process.sigma_max).double()
    torch.testing.assert_close(torch.tensor(grid.ksigma, dtype=torch.float64), sigmas, atol=0, rtol=1e-6)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours = sampler(net_for(process), x_T, process, objective="x0")
    theirs = K_DIFFUSION[name](oracle, x_T * sigmas[0].float(), torch.tensor(grid.ksigma), disable=True)
    assert 0.6 * SD < (theirs - MU).std() < 1.4 * SD  # a real sample of the data, not a collapsed one
    torch.testing.assert_close(ours, theirs.float(), atol=2e-6, rtol=0)


def test_edm_and_euler_start_alike_on_the_karras_grid():
    """One starting convention per grid: sampler=edm and euler / heun / dpmpp_2m start from x_T * sigma_max."""
    process = get_process("ve")
    starts = {get_sampler(n, steps=5, grid="karras").grid(process).prior for n in ("edm", *K_DIFFUSION)}
    assert starts == {process.sigma_max}
