"""Samplers: parity with diffusers' schedulers, and contracts every registered sampler must keep."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lab.diffusion import Denoiser, Guidance, get_objective, get_process, get_sampler
from diffusion_lab.diffusion.samplers import denoiser_samplers


def _diffusers():
    """diffusers is a test oracle only (the dev extra): the parity tests skip without it, the contracts run."""
    return pytest.importorskip("diffusers")


B, SHAPE = 2, (3, 4, 4)
MU = torch.linspace(-1, 1, 48).reshape(1, *SHAPE)
DIFFUSERS_BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(seed))


def vp_coefficients(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at (possibly fractional) t, consistent with the samplers' sigma interpolation."""
    sig = schedule.sigma_at(t.double()).float()
    alpha = (1 + sig**2) ** -0.5
    return alpha.view(-1, 1, 1, 1), (sig * alpha).view(-1, 1, 1, 1)


def gaussian_toy(schedule, prediction_type: str):
    """A fixed nonlinear net: the posterior mean of x0 ~ N(MU, 0.5^2 I) plus 0.05 sin(3 x_t)."""

    def model(x, t):
        alpha, sigma = vp_coefficients(schedule, t)
        x0 = (alpha * 0.25 * x + sigma**2 * MU) / (alpha**2 * 0.25 + sigma**2) + 0.05 * torch.sin(3 * x)
        return get_objective(prediction_type).target(x0, (x - alpha * x0) / sigma, alpha, sigma)

    return model


def point_mass(schedule, prediction_type: str, c: torch.Tensor):
    """The exact denoiser of the data distribution delta(x0 = c), e.g. eps = (x_t - alpha_t c) / sigma_t."""

    def model(x, t, **cond):
        alpha, sigma = vp_coefficients(schedule, t)
        return get_objective(prediction_type).target(c.expand_as(x), (x - alpha * c) / sigma, alpha, sigma)

    return model


def run_diffusers(scheduler, model, x, steps: int, *, grid=None, **step_kwargs) -> torch.Tensor:
    """The standard diffusers pipeline loop (scale input, call net, step), noise from step(generator=...).

    It starts from x * init_noise_sigma, or with ``grid`` where our sampler starts on it (the grid's one
    convention; diffusers' Euler schedulers use another on linspace / trailing), in the scheduler's coordinates:
    x / alpha for the sigma-space ones (Euler, Heun), x_t for the others."""
    scheduler.set_timesteps(steps)
    if grid is None:
        x = x * scheduler.init_noise_sigma
    else:
        sigma_space = any(k in type(scheduler).__name__ for k in ("Euler", "Heun"))
        x = grid.start(x, "k" if sigma_space else "process")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, t), t.repeat(len(x)))
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


# (our sampler, our options, diffusers scheduler class, its extra config, its step() kwargs, stochastic)
PARITY = [
    ("ddpm", {}, "DDPMScheduler", dict(clip_sample=False), {}, True),
    ("ddim", {}, "DDIMScheduler", dict(clip_sample=False), {}, False),
    ("ddim", {"eta": 0.7}, "DDIMScheduler", dict(clip_sample=False), {"eta": 0.7}, True),
    ("euler", {}, "EulerDiscreteScheduler", {}, {}, False),
    ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {}, {}, True),
    ("heun", {}, "HeunDiscreteScheduler", {}, {}, False),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {}, {}, False),
    ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}, True),
    ("unipc", {}, "UniPCMultistepScheduler", {}, {}, False),
]
PARITY_IDS = [p[0] + ("_eta" if p[1] else "") for p in PARITY]


def check_parity(case, schedule_name, prediction_type, steps, *, spacing=None, rescale=False, atol=1e-5):
    name, opts, cls, config, step_kwargs, stochastic = case
    cls = getattr(_diffusers(), cls)
    config = dict(config, **DIFFUSERS_BETAS[schedule_name], prediction_type=DIFFUSERS_PRED[prediction_type])
    if spacing is not None:
        config["timestep_spacing"] = spacing
        opts = dict(opts, grid=spacing)
    if rescale:
        config["rescale_betas_zero_snr"] = True
    schedule = get_process(schedule_name, rescale_zero_terminal_snr=rescale)
    model = gaussian_toy(schedule, prediction_type)
    if stochastic:  # both draw their noise from identically seeded generators, in the same order
        step_kwargs = dict(step_kwargs, generator=torch.Generator().manual_seed(0))
    sampler = get_sampler(name, steps=steps, **opts)
    expected = run_diffusers(cls(**config), model, x_T(), steps, grid=sampler.grid(schedule), **step_kwargs)
    ours = sampler(
        model, x_T(), schedule, objective=prediction_type, generator=torch.Generator().manual_seed(0)
    )
    assert ours.dtype == torch.float32
    assert torch.isfinite(expected).all() and expected.abs().max() > 1e-2  # a real sample
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("case", PARITY, ids=PARITY_IDS)
def test_parity_with_diffusers(case, schedule_name, prediction_type):
    check_parity(case, schedule_name, prediction_type, steps=10)


# Cosine and zero-terminal-SNR tables hold 1 - ab_t ~ 4e-5 near t = 0, which diffusers computes in float32
# (catastrophic cancellation, ~1e-3 relative); we keep float64 tables, so agreement is ~2e-5 there.
@pytest.mark.parametrize("case", PARITY, ids=PARITY_IDS)
def test_parity_cosine_leading(case):
    check_parity(case, "cosine", "eps", steps=10, spacing="leading", atol=5e-5)


@pytest.mark.parametrize(
    "case", [c for c in PARITY if c[0] != "heun"], ids=[i for i in PARITY_IDS if i != "heun"]
)
def test_parity_zero_terminal_snr_v_trailing(case):
    """Lin et al. 2023's recipe (zero terminal SNR + v + trailing); diffusers' Heun has no rescale option."""
    check_parity(case, "scaled_linear", "v", steps=10, spacing="trailing", rescale=True, atol=5e-5)


@pytest.mark.parametrize(
    "case",
    [c for c in PARITY if c[0] != "euler_ancestral"],
    ids=[i for i in PARITY_IDS if i != "euler_ancestral"],
)
def test_parity_x0_prediction(case):
    """x0 ('sample') prediction; diffusers' EulerAncestral does not implement it."""
    check_parity(case, "linear", "x0", steps=10, spacing="trailing")


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", PARITY, ids=PARITY_IDS)
def test_parity_few_steps(case, steps):
    """Warm-up and lower-order final steps of the multistep solvers; Heun's last Euler step."""
    if case[0] == "heun" and steps > 1:
        pytest.skip(
            "a Heun step from sigma 157 to 0.01 is ill-conditioned in float32 (~1e-3 apart); see 10 steps"
        )
    check_parity(case, "linear", "v", steps=steps)


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler")])
def test_clip_x0_matches_diffusers_clip_sample(name, cls):
    schedule = get_process("linear")
    model = gaussian_toy(schedule, "eps")
    g = torch.Generator().manual_seed(0)
    # with clipping, eps_hat follows the clipped x0_hat (DDIM: diffusers' use_clipped_model_output=True;
    # DDPM's posterior mean uses x0_hat and x_t only)
    extra = {"use_clipped_model_output": True} if name == "ddim" else {}
    expected = run_diffusers(
        getattr(_diffusers(), cls)(clip_sample=True), model, 3 * x_T(), 10, generator=g, **extra
    )
    ours = get_sampler(name, steps=10)(
        model, 3 * x_T(), schedule, clip_x0=True, generator=torch.Generator().manual_seed(0)
    )
    unclipped = get_sampler(name, steps=10)(
        model, 3 * x_T(), schedule, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert ours.abs().max() <= 1.0 + 1e-6 < unclipped.abs().max()


def test_ddim_skips_to_the_next_listed_timestep():
    """Documented deviation: diffusers' DDIM steps to t - T // steps even when the spacing lists another
    timestep (trailing / linspace with steps not dividing T); ours steps to the next listed timestep, so
    the last step lands on x0_hat exactly (checked by the point-mass test) and the two differ here."""
    schedule = get_process("linear")
    model = gaussian_toy(schedule, "eps")
    scheduler = _diffusers().DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    expected = run_diffusers(scheduler, model, x_T(), 7)
    ours = get_sampler("ddim", steps=7, grid="trailing")(model, x_T(), schedule)
    assert (ours - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Contracts, parametrised over the registry: a newly registered sampler is tested here automatically.

ALL = denoiser_samplers()  # the few-step formulations' own samplers: tests/test_meanflow.py, ...


@pytest.mark.parametrize("name", ALL)
def test_seeded_generator_is_deterministic(name):
    schedule = get_process("linear")
    sampler = get_sampler(name, steps=6)
    model = gaussian_toy(schedule, "eps")
    runs = [sampler(model, x_T(), schedule, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert runs[0].shape == (B, *SHAPE) and runs[0].dtype == torch.float32
    assert torch.isfinite(runs[0]).all()


# every schedule and every prediction type at least once; eps is undefined at zero terminal SNR (alpha_T = 0)
POINT_MASS_CASES = [
    ("linear", False, "eps"),
    ("linear", False, "v"),
    ("linear", False, "x0"),
    ("cosine", False, "eps"),
    ("scaled_linear", False, "x0"),
    ("sigmoid", False, "v"),
    ("linear", True, "v"),
    ("cosine", True, "x0"),
]


@pytest.mark.parametrize("schedule_name,rescale,prediction_type", POINT_MASS_CASES)
@pytest.mark.parametrize("name", ALL)
def test_perfect_denoiser_of_a_point_mass_returns_it(name, schedule_name, rescale, prediction_type):
    schedule = get_process(schedule_name, rescale_zero_terminal_snr=rescale)
    c = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(5))
    x0 = get_sampler(name, steps=8)(
        point_mass(schedule, prediction_type, c),
        x_T(),
        schedule,
        objective=prediction_type,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(x0, c.expand_as(x0), atol=1e-4, rtol=0)


class CountingNet:
    """A class-conditional toy net that records each call's batch size and class labels."""

    def __init__(self, schedule):
        self.base = gaussian_toy(schedule, "eps")
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t, *, class_labels):
        self.calls.append(class_labels.clone())
        return self.base(x, t) + 0.1 * class_labels.view(-1, 1, 1, 1).float()


@pytest.mark.parametrize("name", ALL)
def test_guidance_is_one_batched_call_per_evaluation(name):
    schedule = get_process("cosine")
    sampler = get_sampler(name, steps=5)
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([10, 10])}
    net = CountingNet(schedule)
    guided = sampler(
        net,
        x_T(),
        schedule,
        cond=cond,
        uncond=uncond,
        guidance=Guidance(scale=3.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(net.calls) == sampler.nfe  # NFE does not double under CFG
    for labels in net.calls:  # one forward on [uncond; cond]
        assert labels.tolist() == [10, 10, 1, 2]

    def combined(x, t):  # the same guided output, computed by hand with two plain calls
        u = net.base(x, t) + 0.1 * uncond["class_labels"].view(-1, 1, 1, 1)
        c = net.base(x, t) + 0.1 * cond["class_labels"].view(-1, 1, 1, 1)
        return u + 3.0 * (c - u)

    expected = sampler(combined, x_T(), schedule, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_guidance_scale_one_equals_no_guidance(name):
    schedule = get_process("linear")
    sampler = get_sampler(name, steps=5)
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([10, 10])}
    net_a, net_b = CountingNet(schedule), CountingNet(schedule)
    a = sampler(
        net_a,
        x_T(),
        schedule,
        cond=cond,
        uncond=uncond,
        guidance=Guidance(scale=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    b = sampler(net_b, x_T(), schedule, cond=cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(net_a.calls) == len(net_b.calls) == sampler.nfe
    assert all(labels.tolist() == [1, 2] for labels in net_a.calls)


@pytest.mark.parametrize("name", ALL)
def test_callback_runs_every_step_and_sees_the_result(name):
    schedule = get_process("linear")
    sampler = get_sampler(name, steps=4)
    seen = []
    out = sampler(
        gaussian_toy(schedule, "v"),
        x_T(),
        schedule,
        objective="v",
        callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())),
        generator=torch.Generator().manual_seed(0),
    )
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(seen[-1][1], out, atol=1e-6, rtol=0)
    assert all(x0.shape == out.shape for _, _, x0 in seen)


@pytest.mark.parametrize("name", ALL)
def test_low_precision_net_output_gives_float32(name):
    schedule = get_process("linear")
    base = gaussian_toy(schedule, "eps")
    out = get_sampler(name, steps=3)(lambda x, t: base(x, t).bfloat16(), x_T().bfloat16(), schedule)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_stochastic_samplers_follow_the_generator():
    schedule = get_process("linear")
    model = gaussian_toy(schedule, "eps")
    for name, opts in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_ancestral", {}), ("dpmpp_2m_sde", {})]:
        sampler = get_sampler(name, steps=5, **opts)
        a, b = (sampler(model, x_T(), schedule, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
        assert (a - b).abs().max() > 1e-2, name


def test_ddim_eta_zero_ignores_the_generator():
    schedule = get_process("cosine")
    model = gaussian_toy(schedule, "eps")
    sampler = get_sampler("ddim", steps=10, eta=0.0)
    a = sampler(model, x_T(), schedule, generator=torch.Generator().manual_seed(0))
    b = sampler(model, x_T(), schedule, generator=torch.Generator().manual_seed(123))
    c = sampler(model, x_T(), schedule)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_nfe_formulas():
    assert {n: get_sampler(n, steps=10).nfe for n in ALL} == {
        "ddim": 10,
        "ddpm": 10,
        "dpmpp_2m": 10,
        "dpmpp_2m_sde": 10,
        "edm": 19,
        "euler": 10,
        "euler_ancestral": 10,
        "flow_euler": 10,
        "flow_heun": 19,
        "heun": 19,
        "unipc": 10,
    }


def test_sampler_object_and_progress_bar(capsys):
    sampler = get_sampler("ddim", steps=3, eta=0.5)
    assert (sampler.name, sampler.steps, sampler.opts, sampler.nfe) == ("ddim", 3, {"eta": 0.5}, 3)
    schedule = get_process("linear", num_timesteps=20)
    sampler(gaussian_toy(schedule, "eps"), x_T(), schedule, progress=True)
    assert "ddim" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Failing loudly


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'nope'; valid choices: .*ddim.*dpmpp_2m"):
        get_sampler("nope", steps=10)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="unknown option.*etaa.*valid options: eta, set_alpha_to_one, grid"):
        get_sampler("ddim", steps=10, etaa=0.5)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_counts_fail_with_one_line(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1") as info:
        get_sampler("ddim", steps=steps)
    assert "\n" not in str(info.value)


def test_more_steps_than_timesteps_fails():
    schedule = get_process("linear", num_timesteps=10)
    with pytest.raises(ValueError, match="steps=11 exceeds the schedule's num_timesteps=10"):
        get_sampler("ddpm", steps=11)(gaussian_toy(schedule, "eps"), x_T(), schedule)


def test_negative_guidance_fails():
    schedule = get_process("linear")
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        get_sampler("euler", steps=3)(
            gaussian_toy(schedule, "eps"), x_T(), schedule, guidance=Guidance(scale=-1.0)
        )


def test_bad_options_and_prediction_type_fail():
    with pytest.raises(TypeError, match="spacing is no longer a sampler option: it is the grid option"):
        get_sampler("ddim", steps=5, spacing="trailing")
    with pytest.raises(TypeError, match=r"clip_x0 is no longer a sampler option: it is a call argument"):
        get_sampler("ddim", steps=5, clip_x0=True)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim", steps=5, eta=-0.1)
    schedule = get_process("linear")
    with pytest.raises(
        ValueError,
        match="unknown objective 'epsilon'; valid choices: consistency, edm, eps, flow, meanflow, shortcut, v, x0",
    ):
        get_sampler("ddim", steps=5)(gaussian_toy(schedule, "eps"), x_T(), schedule, objective="epsilon")
    with pytest.raises(ValueError, match="repeats timesteps"):  # diffusers would divide by zero here
        get_sampler("dpmpp_2m", steps=1000, grid="leading")(gaussian_toy(schedule, "eps"), x_T(), schedule)


# ----------------------------------------------------------------------------------------------------------
# CFG in the one denoiser wrapper


def test_cfg_batches_every_condition_tensor():
    seen = {}

    def net(x, t, *, context, context_mask, class_labels):
        seen.update(x=x, t=t, context=context, mask=context_mask, labels=class_labels)
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x = torch.ones(2, 1, 2, 2)
    ctx, null_ctx = torch.full((2, 3, 4), 2.0), torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cond = {"context": ctx, "context_mask": mask, "class_labels": torch.tensor([0, 1])}
    uncond = {"context": null_ctx, "context_mask": mask, "class_labels": torch.tensor([9, 9])}

    def guided(scale: float, uncond=uncond) -> torch.Tensor:  # x0 objective: x0_hat is the raw output
        denoise = Denoiser(net, process=get_process("linear"), objective="x0", cond=cond, uncond=uncond,
                           guidance=Guidance(scale=scale))  # fmt: skip
        return denoise(x, 5, 0.6, 0.8)[0]

    out = guided(4.0)
    assert seen["x"].shape == (4, 1, 2, 2) and seen["t"].tolist() == [5, 5, 5, 5]
    assert seen["labels"].tolist() == [9, 9, 0, 1] and seen["context"].shape == (4, 3, 4)
    assert seen["mask"].shape == (4, 3)
    torch.testing.assert_close(out, torch.full_like(x, 0.0 + 4.0 * (2.0 - 0.0)))
    torch.testing.assert_close(guided(0.0), torch.zeros_like(x))  # scale 0 = the unconditional output
    with pytest.raises(ValueError, match="same keys"):
        guided(2.0, uncond={"context": null_ctx})
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        guided(-0.5)
