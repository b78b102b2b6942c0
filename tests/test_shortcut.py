"""Shortcut models: the self-consistency target against the exact flow map of Gaussian data, the loss's wiring
(dyadic steps, t grid, flow rows at d = 0) by hand, the k-step sampler (exact with the exact net), end to end."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.diffusion import LossInputs, get_noise_levels, get_objective, get_process, get_sampler
from diffusion_lab.diffusion.shortcut import dyadic_bootstrap_steps, shortcut_target

MU, S = 0.3, 0.5  # data N(MU, S^2) elementwise


def mean_std(t):
    """Mean and std of x_t = (1 - t) x0 + t eps for x0 ~ N(MU, S^2)."""
    return (1 - t) * MU, ((1 - t) ** 2 * S**2 + t**2) ** 0.5


def flow_map(x, t, s):
    """The flow ODE's map from time t to time s for Gaussian data (affine: it matches the marginals)."""
    (m_t, sd_t), (m_s, sd_s) = mean_std(t), mean_std(s)
    return m_s + (x - m_t) * sd_s / sd_t


def exact_velocity(x, t, d):
    """The exact velocity of a step of size d: (x - phi_{t - d}(x)) / d; d = 0: dx/dt of the flow ODE."""
    t, d = (v.double().view(-1, *[1] * (x.ndim - 1)) for v in (t, d))
    x = x.double()
    m_t, sd_t = mean_std(t)
    instant = -MU + (x - m_t) * (-(1 - t) * S**2 + t) / sd_t**2
    step = (x - flow_map(x, t, t - d)) / d.clamp(min=1e-30)
    return torch.where(d > 0, step, instant)


class ExactNet:
    """The exact shortcut net of the Gaussian data: t = level / 1000, d = second_level / 1000; records calls."""

    accepts_second_level = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, level, *, second_level, **cond):
        t = level.double().expand(len(x)) / 1000
        d = second_level.double().expand(len(x)) / 1000
        self.calls.append((x.clone(), t, d))
        return exact_velocity(x, t, d).float()


def flow_inputs(net, x0, generator, **extra) -> LossInputs:
    """A training batch on the rectified flow with uniform t (the loss weighting is unused by shortcut)."""
    process, levels = get_process("rectified_flow"), get_noise_levels("uniform")
    return LossInputs(
        net=net, x0=x0, process=process, noise_levels=levels, weighting=None, generator=generator, **extra
    )


def test_the_target_from_two_exact_half_steps_is_the_exact_full_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, 0.75, 0.5, 0.5, 0.25], dtype=torch.float64)
    two_d = torch.tensor([1.0, 0.5, 0.25, 0.5, 0.125, 0.25], dtype=torch.float64)
    target = shortcut_target(exact_velocity, x, t, two_d / 2, clip=None)
    torch.testing.assert_close(target, exact_velocity(x, t, two_d), rtol=1e-10, atol=1e-10)
    half = exact_velocity(x, t, two_d / 2)  # one half step is not the full step: the test can fail
    assert (half - exact_velocity(x, t, two_d)).abs().max() > 1e-2


def test_dyadic_steps_and_the_step_level():
    assert dyadic_bootstrap_steps(7, 1 / 8).tolist() == [1.0, 0.5, 0.25, 1.0, 0.5, 0.25, 1.0]
    obj, process = get_objective("shortcut", min_step=1 / 8), get_process("rectified_flow")
    level = obj.step_level(torch.tensor([1.0, 0.25, 0.125, 0.0], dtype=torch.float64), process)
    assert level.tolist() == [1000.0, 250.0, 0.0, 0.0]  # the finest step is the flow velocity (d = 0)
    with pytest.raises(ValueError, match="min_step must be 1 / 2"):
        get_objective("shortcut", min_step=0.3)


def test_loss_by_hand_with_the_exact_net():
    """Flow rows see d = 0 and regress eps - x0; bootstrap rows see 2d on the dyadic grid at t on its multiples,
    and with the exact net their targets are met (up to the finest level's O(d) Euler error)."""
    obj = get_objective("shortcut", min_step=1 / 1024, bootstrap_share=0.5)
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(40, 1, 2, 2, generator=g)
    net = ExactNet()
    loss = obj.loss(flow_inputs(net, x0, g))
    (x_flow, t_flow, d_flow), *teacher, (x_boot, t_boot, d_boot) = net.calls
    assert len(teacher) == 2 and (d_flow == 0).all() and len(x_flow) == len(x_boot) == 20
    two_d = dyadic_bootstrap_steps(20, 1 / 1024)
    torch.testing.assert_close(d_boot, two_d.float().double())  # the net learns the 2d-step
    assert sorted(set(two_d.tolist())) == [2.0**-k for k in range(9, -1, -1)]  # 1 .. 2 / M, all ten levels
    j = t_boot / two_d
    torch.testing.assert_close(j, j.round(), atol=1e-4, rtol=0)  # t on the multiples of 2d
    assert ((t_boot - two_d) >= -1e-6).all() and (t_boot <= 1).all()
    eps = (x_flow.double() - (1 - t_flow.view(-1, 1, 1, 1)) * x0[20:].double()) / t_flow.view(-1, 1, 1, 1)
    flow_err = (exact_velocity(x_flow, t_flow, d_flow) - (eps - x0[20:].double())).pow(2).flatten(1).mean(1)
    assert loss.item() == pytest.approx(flow_err.sum().item() / 40, rel=2e-3)


def test_sampler_with_the_exact_net_lands_on_the_flow_map_in_1_2_and_4_steps():
    process = get_process("rectified_flow")
    x_T = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    exact = flow_map(x_T.double(), 1.0, 0.0)
    for steps in (1, 2, 4):
        sampler = get_sampler("shortcut", steps=steps)
        assert sampler.nfe == steps
        out = sampler(ExactNet(), x_T, process, objective=get_objective("shortcut", min_step=1 / 128))
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - S) < 0.03


def test_shortcut_sampler_refuses_other_objectives_and_one_time_nets():
    sampler, process = get_sampler("shortcut", steps=1), get_process("rectified_flow")
    with pytest.raises(ValueError, match="samples nets trained with objective=shortcut .*got objective flow"):
        sampler(ExactNet(), torch.randn(2, 1, 2, 2), process, objective="flow")
    with pytest.raises(ValueError, match="needs a two-time net"):
        sampler(lambda x, t, **k: x, torch.randn(2, 1, 2, 2), process, objective="shortcut")


def test_formulation_shortcut_trains_and_samples(tmp_path, tiny_overrides):
    from experiment_fixtures import train_few_step

    model, _ = train_few_step("shortcut", tiny_overrides, tmp_path / "sc")
    assert model.process.name == "rectified_flow" and model.net.accepts_second_level


class LabelledNet(ExactNet):
    """The exact net plus 0.1 * class label: conditional velocities differ by class, the null class (10) most."""

    def __call__(self, x, level, *, second_level, class_labels):
        out = super().__call__(x, level, second_level=second_level)
        self.calls[-1] = (*self.calls[-1], class_labels.clone())
        return out + 0.1 * class_labels.view(-1, 1, 1, 1).float()


def test_cfg_is_folded_into_the_finest_targets_by_hand():
    """cfg_scale w: at the finest level the teacher's velocities are u_null + w (u_cond - u_null) (the paper's
    bootstrap_cfg); the loss equals the hand-computed flow and bootstrap errors with those targets."""
    obj = get_objective(
        "shortcut", min_step=1 / 2, bootstrap_share=0.5, cfg_scale=3.0
    )  # every target is finest
    g = torch.Generator().manual_seed(3)
    x0, labels = MU + S * torch.randn(8, 1, 2, 2, generator=g), torch.arange(8) % 3
    net = LabelledNet()
    null = {"null_condition": lambda n: {"class_labels": torch.full((n,), 10)}}
    loss = obj.loss(flow_inputs(net, x0, g, cond={"class_labels": labels}, **null))
    assert len(net.calls) == 6  # flow, (u1, u1 null), (u2, u2 null), bootstrap
    assert all((c[-1] == 10).all() for c in (net.calls[2], net.calls[4]))
    (x_f, t_f, d_f, l_f), *_, (x_b, t_b, d_b, l_b) = net.calls

    def guided(x, t, d):
        cond = exact_velocity(x, t, torch.zeros_like(t)) + 0.1 * l_b.view(-1, 1, 1, 1)
        return cond + (3.0 - 1) * (cond - (exact_velocity(x, t, torch.zeros_like(t)) + 1.0))

    target = shortcut_target(guided, x_b.double(), t_b, torch.full_like(t_b, 0.5))
    out_b = exact_velocity(x_b, t_b, d_b) + 0.1 * l_b.view(-1, 1, 1, 1)
    eps = (x_f.double() - (1 - t_f.view(-1, 1, 1, 1)) * x0[4:].double()) / t_f.view(-1, 1, 1, 1)
    out_f = exact_velocity(x_f, t_f, d_f) + 0.1 * l_f.view(-1, 1, 1, 1)
    errors = torch.cat(
        [(out_b - target).pow(2).flatten(1).mean(1), (out_f - (eps - x0[4:])).pow(2).flatten(1).mean(1)]
    )
    assert loss.item() == pytest.approx(errors.mean().item(), rel=1e-4)
