"""The continuous-time core: processes, objectives, noise levels, grids and samplers on every formulation.

Values, not shapes: the exact denoiser of Gaussian data (closed form) must give every sampler x process x grid
the data's mean and std; EDM and flow sampling match diffusers' EDM / FlowMatch schedulers on the same
denoiser; the Karras grid, EDM's loss and the flow loss match hand computations.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from diffusion_lab.diffusion import (
    GRIDS,
    NOISE_LEVELS,
    OBJECTIVES,
    SAMPLERS,
    Denoiser,
    Guidance,
    get_loss_weighting,
    get_noise_levels,
    get_objective,
    get_process,
    get_sampler,
    make_grid,
    training_loss,
)
from diffusion_lab.diffusion.processes import ALPHA_FLOOR, shift_time
from diffusion_lab.diffusion.samplers import denoiser_samplers

# ----------------------------------------------------------------------------------------------------------
# Oracle: the exact denoiser of x0 ~ N(MU, S^2 I)

S = 0.5
SHAPE = (1, 2, 2)
MU = torch.tensor([-0.6, 0.1, 0.4, 0.9]).reshape(1, *SHAPE)


def noise_level_to_t(process, level: torch.Tensor) -> torch.Tensor:
    """Invert ``process.noise_level`` (what an eps / v / x0 / flow net sees)."""
    if process.name == "ve":
        return (4 * level.double()).exp()
    if process.name == "rectified_flow":
        return level.double() / process.time_scale
    return level.double()


def gaussian_oracle(process, objective, mu: torch.Tensor = MU, s: float = S):
    """A net whose x0_hat is E[x0 | x_t] for x0 ~ N(mu, s^2 I): (s^2 alpha x_t + sigma^2 mu) / (s^2 alpha^2 + sigma^2)."""

    def net(x_in, level, **cond):
        if objective.preconditioned:  # x_in = x_t / sqrt(sigma^2 + alpha^2 sd^2), level = ln(ksigma) / 4
            a, sg = process.from_ksigma((4 * level.double()).exp())
            a, sg = a.view(-1, 1, 1, 1), sg.view(-1, 1, 1, 1)
            x_t = x_in.double() * (sg**2 + a**2 * objective.sigma_data**2).sqrt()
        else:
            a, sg = process.coefficients(noise_level_to_t(process, level))
            a, sg = a.view(-1, 1, 1, 1), sg.view(-1, 1, 1, 1)
            x_t = x_in.double()
        x0 = (s**2 * a * x_t + sg**2 * mu) / (s**2 * a**2 + sg**2)
        eps = torch.where(sg > 0, (x_t - a * x0) / sg.clamp(min=1e-30), torch.zeros_like(x_t))
        return objective.target(x0, eps, a, sg).float()

    return net


def draw(sampler, process, objective, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, samples) of the oracle net, in float64."""
    x_T = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    out = sampler(
        gaussian_oracle(process, objective),
        x_T,
        process,
        objective=objective,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    return x_T.double(), out.double()


def exact_flow(sampler, process, x_T: torch.Tensor) -> torch.Tensor:
    """Where the probability-flow ODE takes x_{t0} = prior x_T for Gaussian data: the affine map
    x0 = MU + S (x_t0 - alpha0 MU) / sqrt(alpha0^2 S^2 + sigma0^2) (deterministic samplers must land here)."""
    grid = sampler.grid(process)
    a, s = grid.alpha[0], grid.sigma[0]
    return MU + S * (grid.prior * x_T - a * MU) / math.sqrt(a * a * S * S + s * s)


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Max error relative to the distance from the data mean. Discretization leaves <= 4% (heun on a rho = 7
    grid from ksigma 4096); a wrong mean, std, prior or conversion misses by far more."""
    return float(((out - exact).abs() / ((exact - MU).abs() + 0.05)).max())


def pooled_moments(out: torch.Tensor) -> tuple[float, float]:
    """Max |mean - MU| over pixels and the std of (out - MU) / S pooled over pixels."""
    return float((out.mean(0) - MU.squeeze(0)).abs().max()), float(((out - MU) / S).std())


PROCESSES = {
    "linear": lambda: get_process("linear"),
    "cosine": lambda: get_process("cosine"),
    "zero_snr": lambda: get_process("scaled_linear", rescale_zero_terminal_snr=True),
    "edm": lambda: get_process("ve"),
    "flow": lambda: get_process("rectified_flow"),
    "flow_shift3": lambda: get_process("rectified_flow", shift=3.0),
}
# grids that start at the prior (t_max): diffusers' 'leading' spacing starts below it (t = 798 of 1000 with 400
# steps), where x_T ~ N(0, I) lacks the signal, so its samples are biased (Lin et al. 2023): not an oracle case
GRIDS_OF = {
    "discrete": ["trailing", "linspace", "karras", "uniform", "exponential"],
    "continuous": [None, "karras", "uniform", "exponential"],
}
# steps for ~1% discretization error: first-order solvers shrink the std by O(1 / N) (DDIM's per-step ratio
# (s^2 + sigma sigma') / (s^2 + sigma^2) is below the exact sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)))
SECOND_ORDER = {"heun", "edm", "flow_heun"}
MULTISTEP = {"dpmpp_2m", "unipc"}
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde"}


ROTATION = ("eps", "v", "x0", "flow", "edm")  # every registered objective (test_every_registry_entry...)


def _objective_for(process_key: str, i: int):
    """Rotate the objectives over the cases; eps is undefined where alpha = 0 (zero terminal SNR, flow t = 1)."""
    name = ROTATION[i % len(ROTATION)]
    if process_key in ("zero_snr", "flow", "flow_shift3") and name == "eps":
        name = "v"
    return get_objective(name)


ORACLE_CASES = [  # stochastic samplers need thousands of samples: on each process's first grid only
    (sampler, proc, grid)
    for sampler in sorted(denoiser_samplers())
    for proc in PROCESSES
    for grid in GRIDS_OF["discrete" if proc in ("linear", "cosine", "zero_snr") else "continuous"][
        : 1 if sampler in STOCHASTIC | {"edm"} else None
    ]
]


@pytest.mark.parametrize("sampler_name,process_key,grid", ORACLE_CASES)
def test_every_sampler_process_and_grid_reproduces_gaussian_data(sampler_name, process_key, grid):
    """With the exact denoiser of N(MU, S^2) data, deterministic samplers land on the exact ODE solution of each
    x_T; stochastic ones (and EDM's churn) give 4000 samples with the data's mean and std."""
    process = PROCESSES[process_key]()
    objective = _objective_for(process_key, ORACLE_CASES.index((sampler_name, process_key, grid)))
    opts = {} if grid is None else {"grid": grid}
    if sampler_name in STOCHASTIC or sampler_name == "edm":
        if sampler_name == "edm":
            opts["s_churn"] = 10.0
        sampler = get_sampler(sampler_name, steps=100 if sampler_name == "edm" else 400, **opts)
        _, out = draw(sampler, process, objective, n=2000)
        mean_err, std = pooled_moments(out)
        assert mean_err < 0.04 and abs(std - 1) < 0.05, (mean_err, std, objective)
    else:
        steps = 100 if sampler_name in SECOND_ORDER | MULTISTEP else 400
        sampler = get_sampler(sampler_name, steps=steps, **opts)
        x_T, out = draw(sampler, process, objective, n=64)
        assert relative_error(out, exact_flow(sampler, process, x_T)) < 0.05


@pytest.mark.parametrize("prediction_type", list(OBJECTIVES))
@pytest.mark.parametrize("process_key", ["linear", "edm", "flow"])
def test_every_objective_samples_gaussian_data_on_every_process(prediction_type, process_key):
    if prediction_type == "eps" and process_key == "flow":
        pytest.skip("eps prediction is undefined at flow's t = 1 (alpha = 0); DiffusionSystem refuses it")
    process = PROCESSES[process_key]()
    sampler = get_sampler("heun", steps=100)
    x_T, out = draw(
        sampler,
        process,
        get_objective(prediction_type, **({"sigma_data": 0.7} if prediction_type == "edm" else {})),
        n=256,
    )
    assert relative_error(out, exact_flow(sampler, process, x_T)) < 0.05


@pytest.mark.parametrize(
    "name,order", [("ddim", 1), ("heun", 2), ("dpmpp_2m", 2), ("unipc", 2), ("flow_heun", 2)]
)
def test_solvers_converge_at_their_order(name, order):
    """Doubling the steps divides the error by ~2^order (a wrong coefficient would stall at first order)."""
    process, objective = get_process("linear"), get_objective("v")
    errors = []
    for steps in (20, 40, 80):
        sampler = get_sampler(name, steps=steps, grid="karras")
        x_T, out = draw(sampler, process, objective, n=64)
        errors.append(relative_error(out, exact_flow(sampler, process, x_T)))
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(r < 2.0**-order * 1.6 for r in ratios), (errors, ratios)


def test_ddim_euler_and_flow_euler_are_one_method_on_every_process():
    """DDIM (eta 0), Euler in k-diffusion sigma and Euler on the flow ODE are the same first-order method."""
    for key in ("linear", "edm", "flow"):
        process = PROCESSES[key]()
        objective = get_objective("v")
        net = gaussian_oracle(process, objective, s=0.3)
        x_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
        outs = [
            get_sampler(name, steps=7, grid="karras")(net, x_T, process, objective=objective)
            for name in ("ddim", "euler", "flow_euler")
        ]
        torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=0)
        torch.testing.assert_close(outs[0], outs[2], atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers' EDM and flow-matching schedulers


def _diffusers():
    """diffusers is a test oracle only (the dev extra): the parity tests skip without it, the others run."""
    return pytest.importorskip("diffusers")


def toy_flow_net(x, t):
    """A fixed nonlinear velocity field of (x, 1000 t)."""
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    return 0.8 * x - (1 - s) * MU + 0.05 * torch.sin(3 * x)


def toy_edm_net(x, c_noise):
    """A fixed nonlinear raw output F of (c_in x, c_noise)."""
    return 0.7 * x + 0.1 * c_noise.view(-1, 1, 1, 1) + 0.05 * torch.sin(3 * x)


def run_scheduler(scheduler, net, x, steps, *, grid=None, **set_kwargs):
    """diffusers' loop from x * init_noise_sigma (the flow schedulers: x_T), or with ``grid`` from where our
    sampler starts on it (x_T * sigma_max on the Karras grid, as EDM; diffusers' EDM schedulers use
    sqrt(sigma_max^2 + 1))."""
    scheduler.set_timesteps(steps, **set_kwargs) if set_kwargs else scheduler.set_timesteps(steps)
    x = grid.start(x) if grid is not None else x * getattr(scheduler, "init_noise_sigma", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(net(model_in, t.repeat(len(x))), t, x).prev_sample
    return x


def x_T(seed: int = 1, n: int = 3):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_flow_euler_matches_diffusers_flow_match_euler(steps):
    d = _diffusers()
    expected = run_scheduler(d.FlowMatchEulerDiscreteScheduler(), toy_flow_net, x_T(), steps)
    ours = get_sampler("flow_euler", steps=steps)(
        toy_flow_net, x_T(), get_process("rectified_flow"), objective="flow"
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_flow_shift_matches_diffusers_shifted_sigmas():
    """SD3's shift applied to the same unit grid (diffusers shifts the sigmas it is given once)."""
    d = _diffusers()
    steps, shift = 8, 3.0
    sigmas = torch.linspace(1.0, 1 / 1000, steps).tolist()
    expected = run_scheduler(
        d.FlowMatchEulerDiscreteScheduler(shift=shift), toy_flow_net, x_T(), None, sigmas=sigmas
    )
    process = get_process("rectified_flow", shift=shift)
    ours = get_sampler("flow_euler", steps=steps)(toy_flow_net, x_T(), process, objective="flow")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    grid = make_grid(process, steps, "uniform")
    torch.testing.assert_close(
        torch.tensor(grid.t[:-1], dtype=torch.float64),
        shift_time(torch.tensor(sigmas, dtype=torch.float64), shift),
        atol=1e-7,
        rtol=0,
    )


@pytest.mark.parametrize("steps", [2, 10])
def test_flow_heun_matches_diffusers_flow_match_heun(steps):
    d = _diffusers()
    expected = run_scheduler(d.FlowMatchHeunDiscreteScheduler(), toy_flow_net, x_T(), steps)
    sampler = get_sampler("flow_heun", steps=steps)
    calls = []

    def counted(x, t):
        calls.append(1)
        return toy_flow_net(x, t)

    ours = sampler(counted, x_T(), get_process("rectified_flow"), objective="flow")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert len(calls) == sampler.nfe == 2 * steps - 1


@pytest.mark.parametrize("steps", [1, 5, 18])
def test_euler_on_edm_matches_diffusers_edm_euler(steps):
    d = _diffusers()
    sampler, process = get_sampler("euler", steps=steps), get_process("ve")
    expected = run_scheduler(d.EDMEulerScheduler(), toy_edm_net, x_T(), steps, grid=sampler.grid(process))
    ours = sampler(toy_edm_net, x_T(), process, objective="edm")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_dpmpp_2m_on_edm_matches_diffusers_edm_dpmsolver(steps):
    d = _diffusers()
    sampler, process = get_sampler("dpmpp_2m", steps=steps), get_process("ve")
    scheduler = d.EDMDPMSolverMultistepScheduler()
    expected = run_scheduler(scheduler, toy_edm_net, x_T(), steps, grid=sampler.grid(process))
    ours = sampler(toy_edm_net, x_T(), process, objective="edm")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Hand computations: grids, EDM preconditioning and loss, flow loss, noise-level distributions


def test_karras_grid_by_hand():
    """EDM's t_i = (80^(1/7) + i / 17 (0.002^(1/7) - 80^(1/7)))^7, then 0 (Karras et al. 2022, eq. 5)."""
    grid = make_grid(get_process("ve"), 18, "karras")
    expected = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)] + [0.0]
    assert grid.ksigma == pytest.approx(expected, rel=1e-12, abs=0)
    assert grid.t[:-1] == pytest.approx(expected[:-1], rel=1e-12)  # VE: t = sigma
    assert grid.alpha == pytest.approx([1.0] * 19)
    # on a VP schedule the same sigmas map to fractional timesteps with alpha = 1 / sqrt(1 + sigma^2)
    vp = get_process("linear")
    g = make_grid(vp, 5, "karras", rho=7.0)
    assert g.ksigma[0] == pytest.approx(vp.sigma_max) and g.ksigma[4] == pytest.approx(vp.sigma_min)
    assert vp.sigma_at(torch.tensor(g.t[:-1], dtype=torch.float64)).tolist() == pytest.approx(
        list(g.ksigma[:-1]), rel=1e-9
    )
    assert g.alpha[:-1] == pytest.approx([(1 + s**2) ** -0.5 for s in g.ksigma[:-1]], rel=1e-9)


def test_edm_preconditioning_by_hand():
    """c_skip, c_out, c_in, c_noise of EDM Table 1 (NVlabs/edm EDMPrecond) on the VE process."""
    sd, obj, proc = 0.5, get_objective("edm", sigma_data=0.5), get_process("ve")
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)
    a, s = proc.alpha_sigma(sigma, x)
    x_in, c_noise = obj.net_input(x, sigma, a, s, proc)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + s**2).sqrt()
    torch.testing.assert_close(x_in, c_in * x)
    torch.testing.assert_close(c_noise.double(), sigma.log() / 4, rtol=1e-6, atol=1e-7)
    F = torch.randn_like(x)
    torch.testing.assert_close(obj.denoised(F, x, a, s)[0], c_skip * x + c_out * F)


def test_edm_loss_by_hand():
    """EDMLoss: sigma = exp(N(-1.2, 1.2^2)), weight (sigma^2 + sd^2) / (sigma sd)^2 on |D(y + n) - y|^2."""
    sd, proc, obj = 0.5, get_process("ve"), get_objective("edm", sigma_data=0.5)
    y = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))

    def net(x_in, c_noise, **cond):
        return 0.3 * x_in + 0.2 * c_noise.view(-1, 1, 1, 1)

    loss = training_loss(
        net,
        y,
        process=proc,
        objective=obj,
        noise_levels=get_noise_levels("log_normal", p_mean=-1.2, p_std=1.2),
        weighting=get_loss_weighting("uniform"),
        generator=torch.Generator().manual_seed(2),
    )
    g = torch.Generator().manual_seed(2)  # replay the draws: sigma, then the noise
    sigma = (torch.randn(8, generator=g) * 1.2 - 1.2).exp().view(-1, 1, 1, 1)
    n = torch.randn(y.shape, generator=g) * sigma
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
    D = c_skip * (y + n) + c_out * net(c_in * (y + n), c_noise.flatten())
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = (weight * (D - y) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_flow_matching_loss_by_hand():
    """Rectified flow: t ~ sigmoid(N(0, 1)), x_t = (1 - t) x0 + t eps, |net(x_t, 1000 t) - (eps - x0)|^2."""
    x0 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))

    def net(x, level, **cond):
        return 0.5 * x + level.view(-1, 1, 1, 1) / 1000

    loss = training_loss(
        net,
        x0,
        process=get_process("rectified_flow"),
        objective=get_objective("flow"),
        noise_levels=get_noise_levels("logit_normal"),
        weighting=get_loss_weighting("uniform"),
        generator=torch.Generator().manual_seed(2),
    )
    g = torch.Generator().manual_seed(2)
    t = torch.sigmoid(torch.randn(8, generator=g)).view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=g)
    x_t = (1 - t) * x0 + t * eps
    expected = (net(x_t, 1000 * t.flatten()) - (eps - x0)).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_mean_the_same_x0_objective_for_flow_and_edm():
    proc = get_process("rectified_flow")
    t = torch.tensor([0.05, 0.3, 0.7, 0.99])
    snr = proc.snr(t)
    x0 = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(4)).double()
    eps = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5)).double()
    a, s = proc.alpha_sigma(t.double(), x0)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=x0.dtype)
    for name in ("flow", "edm"):
        obj = get_objective(name)
        eps_hat = (a * x0 + s * eps - a * x0_hat) / s
        err = (obj.target(x0_hat, eps_hat, a, s) - obj.target(x0, eps, a, s)).pow(2).flatten(1).mean(1)
        w = get_loss_weighting("min_snr", gamma=5.0)(snr, objective=obj).double()
        expected = snr.double().clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(w * err, expected, rtol=1e-5, atol=1e-8)


def test_noise_level_distributions():
    n, g = 200_000, torch.Generator().manual_seed(0)
    sig = get_noise_levels("log_normal", p_mean=-1.2, p_std=1.2)(get_process("ve"), n, generator=g)
    assert sig.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sig.log().std().item() == pytest.approx(1.2, abs=0.01)
    t = get_noise_levels("logit_normal")(get_process("rectified_flow"), n, generator=g)
    logit = (t / (1 - t)).log()
    assert logit.mean().item() == pytest.approx(0.0, abs=0.01) and logit.std().item() == pytest.approx(
        1.0, abs=0.01
    )
    shifted = get_noise_levels("logit_normal")(get_process("rectified_flow", shift=3.0), n, generator=g)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)  # shift(0.5) = 3 * 0.5 / (1 + 2 * 0.5)
    ti = get_noise_levels("uniform")(get_process("linear"), n, generator=g)
    assert ti.dtype == torch.long and ti.min() == 0 and ti.max() == 999
    tv = get_noise_levels("log_normal")(get_process("cosine"), 1000, generator=g)
    assert tv.dtype == torch.long  # discrete schedules get table indices
    tu = get_noise_levels("uniform")(get_process("rectified_flow"), n, generator=g)
    assert tu.min() >= 1e-3 and tu.max() <= 1 and tu.mean().item() == pytest.approx(0.5, abs=0.01)


def test_processes_by_hand():
    edm, flow, vp = get_process("ve"), get_process("rectified_flow"), get_process("linear")
    t = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    a, s = flow.coefficients(t)
    assert a.tolist() == pytest.approx([0.8, 0.5, 0.0]) and s.tolist() == t.tolist()
    assert flow.ksigma(t).tolist() == pytest.approx([0.25, 1.0, 1 / ALPHA_FLOOR])
    assert flow.t_from_ksigma(torch.tensor([0.25, 1.0])).tolist() == pytest.approx([0.2, 0.5])
    assert flow.noise_level(t).tolist() == pytest.approx([200, 500, 1000])
    assert edm.noise_level(torch.tensor([1.0, math.e**4])).tolist() == pytest.approx([0.0, 1.0])
    assert edm.sigma_max == 80 and edm.sigma_min == 0.002
    ts = torch.tensor([0.0, 10.0, 500.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(vp.t_from_ksigma(vp.sigma_at(ts)), ts)  # the inverse of the interpolation
    a, s = vp.coefficients(ts)
    torch.testing.assert_close(a**2 + s**2, torch.ones(4, dtype=torch.float64))


def test_every_registry_entry_has_its_yaml_and_back():
    """One registered function + one YAML: names on both sides must agree."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from diffusion_lab.diffusion import LOSS_WEIGHTINGS
    from diffusion_lab.diffusion import PROCESSES as REGISTERED

    conf = Path(__file__).resolve().parents[1] / "diffusion_lab" / "conf"

    def names(folder: str, key: str) -> tuple[set, set]:
        files = sorted((conf / folder).glob("*.yaml"))
        return {f.stem for f in files}, {OmegaConf.load(f)[key] for f in files}

    stems, values = names("process", "name")
    assert values == set(REGISTERED) and set(REGISTERED) <= stems
    stems, values = names("sampler", "name")
    assert stems == values == set(SAMPLERS)
    stems, values = names("sampler/grid", "name")
    assert stems == values == set(GRIDS)
    stems, values = names("model/objective", "objective")
    few_step = {SAMPLERS.get(s).formulation for s in SAMPLERS} - {None}  # objectives with their own sampler
    assert stems == values == set(OBJECTIVES) and set(OBJECTIVES) - few_step == set(ROTATION)
    stems, values = names("model/noise_levels", "noise_levels")
    assert stems == values == set(NOISE_LEVELS)
    stems, values = names("model/loss_weighting", "loss_weighting")
    assert stems == values == set(LOSS_WEIGHTINGS)
    assert {f.stem for f in (conf / "formulation").glob("*.yaml")} == {"ddpm", "edm", "flow"} | few_step


def test_data_sets_text_encoders_and_feature_extractors_have_their_yaml_and_back(tmp_path, tiny_overrides):
    """The same both ways for what is chosen by `_target_`: every data module (conf/data), text encoder
    (conf/model/text_encoder) and registered FID feature extractor (conf/callbacks/fid*.yaml)."""
    import importlib
    import pkgutil
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import diffusion_lab.data
    from diffusion_lab.data.base import BaseDataModule
    from diffusion_lab.imports import locate
    from diffusion_lab.metrics.features import FEATURE_EXTRACTORS
    from diffusion_lab.nets.text import TextEncoder

    from conftest import compose

    conf = Path(__file__).resolve().parents[1] / "diffusion_lab" / "conf"
    for module in pkgutil.iter_modules(diffusion_lab.data.__path__):
        importlib.import_module(f"diffusion_lab.data.{module.name}")

    def ours(base: type) -> set[type]:  # the package's subclasses (not the tests' stand-ins)
        found = {c for c in base.__subclasses__() if c.__module__.startswith("diffusion_lab.")}
        return found.union(*(ours(c) for c in found))

    def targets(pattern: str, *keys: str) -> set:
        nodes = [OmegaConf.select(OmegaConf.load(f), ".".join(keys)) if keys else OmegaConf.load(f)
                 for f in sorted(conf.glob(pattern))]  # fmt: skip
        return {locate(node._target_) for node in nodes}

    assert targets("data/*.yaml") == ours(BaseDataModule)
    assert targets("model/text_encoder/*.yaml") == ours(TextEncoder)
    assert targets("callbacks/fid*.yaml", "fid", "feature") == {
        FEATURE_EXTRACTORS.get(n) for n in FEATURE_EXTRACTORS
    }
    for name in ("fid", "fid_classifier", "fid_random"):  # each composes, sampling with the run's sampler
        cfg = compose("train", [*tiny_overrides, f"callbacks=[default,{name}]"], tmp_path)
        assert cfg.callbacks.fid.sampler.name == cfg.sampler.name == "flow_euler"
    assert instantiate(cfg.callbacks.fid).key == "fid_random"  # the one without weights also builds


def test_callbacks_diffusion_takes_image_logger_steps(tmp_path, tiny_overrides):
    """`callbacks=diffusion callbacks.image_logger.steps=25` composes (#17 indented its `steps: null`)."""
    from hydra.utils import instantiate

    from conftest import compose

    over = [o for o in tiny_overrides if not o.startswith("callbacks.class_accuracy")]
    cfg = compose("train", [*over, "callbacks=diffusion", "callbacks.image_logger.steps=25"], tmp_path)
    assert "class_accuracy" not in cfg.callbacks and cfg.callbacks.image_logger.steps == 25
    logger = instantiate(cfg.callbacks.image_logger)
    assert (logger.sampler.name, logger.sampler.steps, logger.every_n_steps) == ("flow_euler", 25, 2)


# ----------------------------------------------------------------------------------------------------------
# Guidance refinements


class TwoHeads:
    """eps-net with a class-dependent offset; records every call's batch."""

    def __init__(self, offset: float):
        self.offset, self.calls = offset, []

    def __call__(self, x, t, *, class_labels):
        self.calls.append(class_labels.clone())
        return 0.1 * x + self.offset * (class_labels.view(-1, 1, 1, 1).float() + 1)


def _denoiser(net, **guidance):
    return Denoiser(
        net,
        process=get_process("linear"),
        cond={"class_labels": torch.tensor([1, 2])},
        uncond={"class_labels": torch.tensor([9, 9])},
        guidance=Guidance(**guidance),
    )


def test_guidance_rescale_matches_lin_et_al():
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    a, s = 0.6, 0.8
    plain = _denoiser(TwoHeads(0.3), scale=4.0)(x, 500, a, s)[0]
    cond_only = _denoiser(TwoHeads(0.3), scale=1.0)(x, 500, a, s)[0]
    full = _denoiser(TwoHeads(0.3), scale=4.0, rescale=1.0)(x, 500, a, s)[0]
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dims), cond_only.std(dims))  # phi = 1: the conditional std
    torch.testing.assert_close(
        full, plain * cond_only.std(dims, keepdim=True) / plain.std(dims, keepdim=True)
    )
    half = _denoiser(TwoHeads(0.3), scale=4.0, rescale=0.7)(x, 500, a, s)[0]
    torch.testing.assert_close(half, 0.7 * full + 0.3 * plain)


def test_guidance_interval_guides_only_inside():
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    net = TwoHeads(0.3)
    d = _denoiser(net, scale=3.0, interval=[0.5, 2.0])
    inside = d(x, 400, 0.6, 0.8)[0]  # ksigma 1.33
    assert net.calls[-1].tolist() == [9, 9, 1, 2]  # one batched call
    outside = d(x, 999, 0.1, 0.995)[0]  # ksigma 9.95
    assert net.calls[-1].tolist() == [1, 2]  # conditional only
    torch.testing.assert_close(outside, _denoiser(TwoHeads(0.3))(x, 999, 0.1, 0.995)[0])
    torch.testing.assert_close(inside, _denoiser(TwoHeads(0.3), scale=3.0)(x, 400, 0.6, 0.8)[0])
    with pytest.raises(ValueError, match="guidance_interval"):
        _denoiser(net, interval=[2.0, 1.0])


def test_autoguidance_is_guide_plus_scaled_difference():
    """Karras et al. 2024: D = D_guide + w (D_main - D_guide), both with the condition."""
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    main, guide = TwoHeads(0.3), TwoHeads(0.1)
    d = Denoiser(
        main,
        process=get_process("linear"),
        cond={"class_labels": torch.tensor([1, 2])},
        guidance=Guidance(scale=2.5, guide=guide),
    )
    out = d(x, 300, 0.6, 0.8)[0]
    assert main.calls[-1].tolist() == guide.calls[-1].tolist() == [1, 2]
    x0 = {
        k: Denoiser(n, process=get_process("linear"), cond={"class_labels": torch.tensor([1, 2])})(
            x, 300, 0.6, 0.8
        )[0]
        for k, n in (("main", TwoHeads(0.3)), ("guide", TwoHeads(0.1)))
    }
    torch.testing.assert_close(out, x0["guide"] + 2.5 * (x0["main"] - x0["guide"]))


# ----------------------------------------------------------------------------------------------------------
# End to end: `formulation=` on the quickstart, then sampling from the checkpoint (also autoguided)


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_formulation_trains_and_samples_end_to_end(formulation, tmp_path, tiny_overrides):
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.train import train

    from conftest import compose

    cfg = compose("train", [*tiny_overrides, f"formulation={formulation}"], tmp_path / "run")
    summary = train(cfg)
    assert math.isfinite(summary["final_train_loss"]) and summary["steps"] == 4
    model, config = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert config["model"]["objective"] == formulation
    assert model.process.name == {"edm": "ve", "flow": "rectified_flow"}[formulation]
    assert config["sampler"]["name"] == {"edm": "edm", "flow": "flow_euler"}[formulation]
    x = model.sample(
        sampler=get_sampler("dpmpp_2m", steps=3),
        num_samples=2,
        cond={"class_labels": torch.tensor([0, 1])},
        guidance=Guidance(scale=2.0, rescale=0.7, interval=(0.1, 10.0)),
    )
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_sample_cli_with_guidance_refinements_and_a_guide(tmp_path, tiny_overrides):
    """`sample ... guide_ckpt= guidance_rescale= guidance_interval=`; a guide of another formulation is refused."""
    import json
    import subprocess
    import sys

    from diffusion_lab.train import train

    from conftest import compose

    for name, extra in (("main", []), ("guide", ["trainer.max_steps=2"]), ("other", ["formulation=edm"])):
        train(compose("train", [*tiny_overrides, *extra], tmp_path / name))
    ckpt = {n: tmp_path / n / "checkpoints" / "last.ckpt" for n in ("main", "guide", "other")}
    run = [sys.executable, "-m", "diffusion_lab.sample", f"ckpt={ckpt['main']}", "n=4", "sampler.steps=3"]
    done = subprocess.run(
        [
            *run,
            f"guide_ckpt={ckpt['guide']}",
            "guidance_rescale=0.5",
            "guidance_interval=[0.2,50]",
            f"out={tmp_path / 's'}",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert info["guide_ckpt"] == str(ckpt["guide"]) and info["guidance_interval"] == [0.2, 50.0]
    bad = subprocess.run(
        [*run, f"guide_ckpt={ckpt['other']}", f"out={tmp_path / 'b'}"], capture_output=True, text=True
    )
    said = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "another process" in said and "Traceback" not in said


def test_eps_is_refused_where_alpha_vanishes():
    import functools

    from diffusion_lab.systems.diffusion import DiffusionSystem

    with pytest.raises(ValueError, match="eps prediction cannot recover x0"):
        DiffusionSystem(
            net=torch.nn.Identity(),
            process=get_process("rectified_flow"),
            objective="eps",
            image_size=8,
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        )
