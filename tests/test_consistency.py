"""Consistency training and sampling: c_skip / c_out, the curriculum, the pair distributions, the pseudo-Huber loss
and the multistep sampler against hand computations and the exact consistency function of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion import get_objective, get_process, get_sampler
from diffusion_lab.diffusion.consistency import (
    consistency_scalings,
    ect_ratio,
    ict_discretisation,
    karras_sigmas,
    lognormal_pair_probs,
    pseudo_huber,
)

SD, S_MIN = 0.5, 0.002


def test_scalings_by_hand_and_the_boundary_condition():
    s = torch.tensor([S_MIN, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out = consistency_scalings(s, sigma_data=SD, sigma_min=S_MIN)
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, s_min) = x
    assert c_skip[1].item() == pytest.approx(0.25 / (0.998**2 + 0.25), rel=1e-12)
    assert c_out[1].item() == pytest.approx(0.5 * 0.998 / math.sqrt(1.25), rel=1e-12)
    assert c_skip[2].item() == pytest.approx(0.25 / (79.998**2 + 0.25), rel=1e-12)
    assert c_out[2].item() == pytest.approx(0.5 * 79.998 / math.sqrt(6400.25), rel=1e-12)


def test_ict_curriculum_by_hand():
    """K = 1000, s0 = 10, s1 = 1280: K' = floor(1000 / 8) = 125, N doubles every 125 steps from 11 to 1281."""
    n = [ict_discretisation(k, 1000) for k in (0, 124, 125, 249, 250, 500, 874, 875, 999)]
    assert n == [11, 11, 21, 21, 41, 161, 641, 1281, 1281]
    assert ict_discretisation(10, 20, s0=2, s1=4) == 5  # K' = floor(20 / 2) = 10: 2 * 2 + 1


def test_karras_sigmas_and_lognormal_pair_probabilities():
    from scipy.stats import norm

    sig = karras_sigmas(11, sigma_min=S_MIN, sigma_max=80.0)
    assert sig[0].item() == pytest.approx(S_MIN, rel=1e-12) and sig[-1].item() == pytest.approx(
        80.0, rel=1e-12
    )
    mid = ((S_MIN ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert sig[5].item() == pytest.approx(mid, rel=1e-12)
    p = lognormal_pair_probs(sig, p_mean=-1.1, p_std=2.0)
    cdf = norm.cdf(sig.log().numpy(), loc=-1.1, scale=2.0)
    expected = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    torch.testing.assert_close(p, torch.from_numpy(expected), rtol=1e-10, atol=0)


def test_ect_ratio_and_pseudo_huber_by_hand():
    r = ect_ratio(torch.tensor([1.0, 1e-6, 50.0], dtype=torch.float64), stage=0, q=4.0, k=8.0, b=1.0)
    assert r[0].item() == pytest.approx(1 - 0.25 * (1 + 8 / (1 + math.e)), rel=1e-12)
    assert r[1].item() == 0  # 1 - 0.25 * 5 < 0: clamped, the target is x0
    assert r[2].item() == pytest.approx(0.75, abs=1e-12)
    assert ect_ratio(torch.tensor([50.0]), stage=2, q=2.0).item() == pytest.approx(1 - 1 / 8, abs=1e-6)
    x, y = torch.zeros(2, 2), torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(pseudo_huber(x, y, 0.0), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(
        pseudo_huber(x, y, 0.5), torch.tensor([math.sqrt(25.25) - 0.5, math.sqrt(1.25) - 0.5])
    )


def test_ict_pairs_follow_the_curriculum_and_the_lognormal():
    obj = get_objective("consistency", s0=10, s1=40, total_steps=300)
    g = torch.Generator().manual_seed(0)
    s, s_prev, w = obj.pair(40000, step=0, generator=g)
    sig = karras_sigmas(11, sigma_min=S_MIN, sigma_max=80.0)
    i = torch.searchsorted(sig, s_prev)
    torch.testing.assert_close(s_prev, sig[i]) and torch.testing.assert_close(s, sig[i + 1])
    torch.testing.assert_close(w, 1 / (s - s_prev))
    freq = torch.bincount(i, minlength=10).double() / len(i)
    assert (freq - lognormal_pair_probs(sig)).abs().max() < 0.01
    late, _, _ = obj.pair(1000, step=299, generator=g)  # K' = 300 / 3 = 100: N = 41 from step 200 on
    assert set(late.tolist()) <= set(karras_sigmas(41, sigma_min=S_MIN, sigma_max=80.0).tolist())
    assert not set(late.tolist()) <= set(karras_sigmas(21, sigma_min=S_MIN, sigma_max=80.0).tolist())


def test_ect_pairs_by_hand():
    obj = get_objective("consistency", schedule="ect", stage_steps=100, q=2.0)
    s, s_prev, w = obj.pair(1000, step=250, generator=torch.Generator().manual_seed(1))  # stage 2
    torch.testing.assert_close(s_prev, s * ect_ratio(s, stage=2, q=2.0))
    torch.testing.assert_close(w, (s * s + SD**2) / (s * SD) ** 2)
    assert abs(s.log().mean().item() + 1.1) < 0.15 and abs(s.log().std().item() - 2.0) < 0.15


class Zero(torch.nn.Module):
    def forward(self, x, level, **cond):
        return torch.zeros_like(x)


def test_pair_loss_by_hand_with_f_equal_c_skip_x():
    """A net that outputs 0 makes f(x, s) = c_skip(s) x: the loss is weight * phuber(c_skip(s) x_s, c_skip(s') x_s')."""
    obj, process = get_objective("consistency", huber_c=0.03), get_process("ve")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    s = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    s_prev = torch.tensor([0.3, 0.0, 6.0], dtype=torch.float64)  # s' = 0: the target is x0 itself
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss = obj.pair_loss(Zero(), x0, eps, s, s_prev, w, process=process)
    per = []
    for j in range(3):
        cs = consistency_scalings(s[j], sigma_data=SD, sigma_min=S_MIN)[0].item()
        online = cs * (x0[j] + s[j].item() * eps[j])
        if s_prev[j] > 0:
            cp = consistency_scalings(s_prev[j], sigma_data=SD, sigma_min=S_MIN)[0].item()
            target = cp * (x0[j] + s_prev[j].item() * eps[j])
        else:
            target = x0[j]
        d = ((online - target) ** 2).sum().item()
        per.append(w[j].item() * (math.sqrt(d + 0.03**2) - 0.03))
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-5)


def point_mass_consistency_net(mu: torch.Tensor, process):
    """The exact consistency model of data = mu (any process): f(x, s) = mu + (x - mu) s_min / s in k-diffusion
    space, returned as the raw F the objective reads: (f - c_skip x) / c_out from (c_in x, c_noise)."""

    def net(x_in, c_noise, **cond):
        s = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (s * s + SD**2).sqrt()  # k-diffusion x = x_t / alpha
        f = mu + (x - mu) * S_MIN / s
        c_skip, c_out = consistency_scalings(s, sigma_data=SD, sigma_min=S_MIN)
        return ((f - c_skip * x) / c_out).float()

    return net


@pytest.mark.parametrize("process_name", ["ve", "rectified_flow"])
def test_exact_consistency_model_has_zero_ict_loss_and_a_perturbed_one_does_not(process_name):
    process, obj = get_process(process_name), get_objective("consistency")
    mu = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3)).double()
    x0 = mu.float().expand(16, -1, -1, -1).contiguous()
    net = point_mass_consistency_net(mu, process)
    g = torch.Generator().manual_seed(4)
    assert obj.training_loss(net, x0, process=process, generator=g, step=3000).item() < 1e-4
    wrong = obj.training_loss(lambda x, c, **k: net(x, c) + 0.1, x0, process=process, generator=g)
    assert wrong.item() > 1e-2


def gaussian_consistency_net(mu: float, std: float):
    """The exact consistency model of N(mu, std^2) data on VE: the PF-ODE maps x at s to
    mu + (x - mu) sqrt(std^2 + s_min^2) / sqrt(std^2 + s^2) at s_min."""

    def f(x, s):
        return mu + (x - mu) * math.sqrt(std**2 + S_MIN**2) / (std**2 + s * s) ** 0.5

    def net(x_in, c_noise, **cond):
        s = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (s * s + SD**2).sqrt()
        c_skip, c_out = consistency_scalings(s, sigma_data=SD, sigma_min=S_MIN)
        return ((f(x, s) - c_skip * x) / c_out).float()

    return net, f


def test_sampler_one_step_is_f_at_sigma_max_and_more_steps_keep_the_data_moments():
    process, mu, std = get_process("ve"), 0.3, 0.4
    net, f = gaussian_consistency_net(mu, std)
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    one = get_sampler("consistency", steps=1)
    assert one.nfe == 1
    out = one(net, x_T, process, objective="consistency")
    torch.testing.assert_close(out.double(), f(80.0 * x_T.double(), 80.0), rtol=1e-5, atol=1e-5)
    for steps in (2, 4):
        sampler = get_sampler("consistency", steps=steps)
        assert sampler.nfe == steps
        out = sampler(net, x_T, process, objective="consistency", generator=torch.Generator().manual_seed(6))
        assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - std) < 0.02, steps


def test_consistency_sampler_refuses_other_objectives_in_one_line():
    sampler = get_sampler("consistency", steps=1)
    with pytest.raises(
        ValueError, match="samples nets trained with objective=consistency .*got objective edm"
    ) as err:
        sampler(Zero(), torch.randn(2, 1, 2, 2), get_process("ve"), objective="edm")
    assert "\n" not in str(err.value)


def test_consistency_objective_inverts_its_target_and_keeps_the_boundary():
    obj = get_objective("consistency")
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(3, 2, generator=g).double(), torch.randn(3, 2, generator=g).double()
    alpha = torch.ones(3, 1, dtype=torch.float64)
    sigma = torch.tensor([[0.01], [1.0], [50.0]], dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = obj.denoised(obj.target(x0, eps, alpha, sigma).double(), x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat.double(), x0, rtol=1e-5, atol=1e-5)
    x0_b, _ = obj.denoised(torch.randn(3, 2), x_t.float(), 1.0, S_MIN)  # f(x, s_min) = x whatever F
    torch.testing.assert_close(x0_b, x_t.float())


# ----------------------------------------------------------------------------------------------------------
# End to end: formulation=consistency trains through the seam and samples in 1 and 2 steps; ECT's init_ckpt=


def test_formulation_consistency_trains_samples_and_starts_from_an_edm_run(tmp_path, tiny_overrides):
    from hydra.utils import instantiate

    from diffusion_lab.checkpoints import read_checkpoint, sub_state
    from diffusion_lab.train import train

    from conftest import compose
    from experiment_fixtures import train_few_step

    model, _ = train_few_step("consistency", tiny_overrides, tmp_path / "ct")
    assert model.process.name == "ve"

    edm = tmp_path / "edm"
    train(compose("train", [*tiny_overrides, "formulation=edm"], edm))
    ect = [
        "formulation=consistency",
        "model.objective_opts.schedule=ect",
        f"init_ckpt={edm}/checkpoints/last.ckpt",
    ]
    system = instantiate(compose("train", [*tiny_overrides, *ect], tmp_path / "ect").model, _convert_="all")
    start = sub_state(read_checkpoint(edm / "checkpoints" / "last.ckpt")["state_dict"], "net.")
    assert start and all(torch.equal(system.net.state_dict()[k], v) for k, v in start.items())
    with pytest.raises(
        Exception, match="init_ckpt not found: /nowhere.ckpt"
    ):  # hydra wraps the CheckpointError
        instantiate(
            compose("train", [*tiny_overrides, "init_ckpt=/nowhere.ckpt"], tmp_path / "x").model,
            _convert_="all",
        )


def test_fashion_mnist_and_the_few_step_ablation_compose_with_the_consistency_curriculum(tmp_path):
    """experiment=fashion_mnist formulation=consistency composes and builds, the curriculum's K = the run's steps;
    a time-limited run without total_steps fails naming the key."""
    from hydra.utils import instantiate

    from conftest import compose

    cfg = compose("train", ["experiment=fashion_mnist", "formulation=consistency"], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    assert (model.objective.name, model.objective.total_steps) == ("consistency", cfg.trainer.max_steps)
    timed = compose("train", ["formulation=consistency", "trainer.max_steps=-1"], tmp_path)
    with pytest.raises(Exception, match="sets model.objective_opts.total_steps"):
        instantiate(timed.model, _convert_="all")
