"""MeanFlow (issue 26): closed-form Gaussian average velocity through the sampler and the loss, the jvp against
central differences on a real UNet and DiT, CFG in the target, refusals, and an end-to-end tiny run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import (
    Guidance,
    LossInputs,
    get_noise_levels,
    get_objective,
    get_process,
    get_sampler,
)
from diffusion_lab.diffusion import meanflow as mf
from diffusion_lab.diffusion.losses import get_loss_weighting
from diffusion_lab.nets.dit import DiT
from diffusion_lab.nets.unet import UNet

MU, S = 0.3, 0.6  # Gaussian data N(MU, S^2) per pixel
SHAPE = (1, 4, 4)


def exact_u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """The exact average velocity of N(mu, s^2) data on the rectified flow, (phi_r(z) - z) / (r - t), with the
    flow map phi_r(z) = m_r + sd_r / sd_t (z - m_t) (m_t = (1 - t) mu, sd_t^2 = (1 - t)^2 s^2 + t^2), written
    without the division by r - t: (sd_r - sd_t) / (r - t) = (s^2 (r + t - 2) + r + t) / (sd_r + sd_t)."""
    shape = (-1, *([1] * (z.ndim - 1)))
    r, t = r.reshape(shape), t.reshape(shape)
    sd_t = ((1 - t) ** 2 * s**2 + t**2).sqrt()
    sd_r = ((1 - r) ** 2 * s**2 + r**2).sqrt()
    slope = (s**2 * (r + t - 2) + r + t) / ((sd_r + sd_t) * sd_t)
    return -mu + slope * (z - (1 - t) * mu)


class GaussianMeanFlowNet(nn.Module):
    """A stand-in two-time net that returns the exact u for N(mu, s^2) data (levels 1000 t and 1000 (t - r))."""

    accepts_second_level = True

    def __init__(self, mu: float = MU, s: float = S, *, offset: float = 0.0) -> None:
        super().__init__()
        self.mu, self.s, self.offset = mu, s, offset

    def forward(self, z, level, *, second_level=None, class_labels=None):
        t = level / 1000
        r = t - (torch.zeros_like(t) if second_level is None else second_level / 1000)
        u = exact_u(z.double(), r.double().expand(len(z)), t.double().expand(len(z)), self.mu, self.s)
        return (u + self.offset).to(z.dtype)


def _inputs(net, x0, generator, **kw) -> LossInputs:
    return LossInputs(
        net=net,
        x0=x0,
        process=get_process("rectified_flow"),
        noise_levels=get_noise_levels("logit_normal"),
        weighting=get_loss_weighting("uniform"),
        generator=generator,
        **kw,
    )


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_the_exact_average_velocity_lands_on_the_data_distribution(steps):
    """phi_0 of N(0, 1) is x -> MU + S x, so every x_T lands exactly on MU + S x_T: the data's mean and std."""
    x_T = torch.randn(2000, *SHAPE, generator=torch.Generator().manual_seed(0))
    sampler = get_sampler("meanflow", steps=steps)
    out = sampler(GaussianMeanFlowNet(), x_T, get_process("rectified_flow"), objective="meanflow")
    torch.testing.assert_close(out, MU + S * x_T, atol=2e-5, rtol=0)
    assert sampler.nfe == steps
    assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < 0.01


def test_sampler_steps_are_the_average_velocity_steps():
    """Two steps on a net that is not a flow map: z_1/2 = z_1 - u(z_1, 1/2, 1) / 2, z_0 = z_1/2 - u(z_1/2, 0, 1/2) / 2,
    each called with levels (1000 t, 1000 (t - r)); callbacks see each step's z and x0_hat = z_t - t u."""
    calls = []

    class Probe(GaussianMeanFlowNet):
        def forward(self, z, level, *, second_level=None, class_labels=None):
            calls.append((level.tolist(), float(second_level)))
            return torch.sin(3 * z) + level[:, None, None, None] / 1000

    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    seen = []
    out = get_sampler("meanflow", steps=2)(
        Probe(),
        x_T,
        get_process("rectified_flow"),
        objective="meanflow",
        callback=lambda i, x, x0: seen.append((x, x0)),
    )
    z_half = x_T - 0.5 * (torch.sin(3 * x_T) + 1.0)
    expected = z_half - 0.5 * (torch.sin(3 * z_half) + 0.5)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert calls == [([1000.0] * 3, 500.0), ([500.0] * 3, 500.0)]
    torch.testing.assert_close(seen[0][0], z_half, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[0][1], x_T - (torch.sin(3 * x_T) + 1.0), atol=1e-6, rtol=0)


def test_loss_of_the_exact_average_velocity_is_zero_and_of_a_wrong_one_is_not():
    """For point-mass data (s = 0) the conditional velocity is the marginal one, so the MeanFlow target
    v - (t - r) du/dt built from the exact u by the jvp equals u: the loss vanishes; an offset net's does not."""
    x0 = torch.full((64, *SHAPE), MU, dtype=torch.float32)
    objective = get_objective("meanflow", adaptive_p=0.0)
    g = torch.Generator().manual_seed(0)
    exact = objective.loss(_inputs(GaussianMeanFlowNet(MU, 0.0), x0, g))
    assert exact < 1e-12  # float64 nets; t, r are drawn in float32
    wrong = objective.loss(
        _inputs(GaussianMeanFlowNet(MU, 0.0, offset=0.1), x0, torch.Generator().manual_seed(0))
    )
    # target = u* + 0.1 - (t - r) d(u* + 0.1)/dt = u*, so the error is the offset in each of the 16 pixels
    assert math.isclose(float(wrong), 16 * 0.01, rel_tol=1e-6)  # the error is summed in float32


def test_loss_matches_a_hand_computation_with_the_adaptive_weight():
    """A net that outputs 0 has du/dt = 0: target = v = eps - x0 and loss = mean(e / (e + c)^p), e = ||v||^2,
    with (t, r) and eps drawn as the objective draws them."""
    objective = get_objective("meanflow", adaptive_p=0.75, adaptive_c=1e-3)
    x0 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5))

    class Zero(GaussianMeanFlowNet):
        def forward(self, z, level, *, second_level=None, class_labels=None):
            return 0 * z + 0 * level.view(-1, 1, 1, 1) + 0 * second_level.view(-1, 1, 1, 1)

    loss = objective.loss(_inputs(Zero(), x0, torch.Generator().manual_seed(9)))
    g = torch.Generator().manual_seed(9)
    mf.sample_two_times(8, t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, share_equal=0.25, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    e = (eps - x0).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(loss, (e / (e + 1e-3) ** 0.75).mean())


def test_two_time_sampler_draws_logit_normals_with_a_share_of_r_equal_t():
    g = torch.Generator().manual_seed(0)
    t, r = mf.sample_two_times(
        20000, t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, share_equal=0.25, generator=g
    )
    assert (r <= t).all() and ((t > 0) & (t < 1)).all()
    assert abs((r == t).float().mean() - 0.25) < 0.02 + 0.75 * 0.15  # plus the independent draws with r >= t
    logit = torch.logit(t.double())
    assert abs(logit.median() - (-0.6)) < 0.15  # median of max(t, r') for r' mostly tiny: t's own
    # exactly r = t where the share says so
    g = torch.Generator().manual_seed(0)
    t1, r1 = mf.sample_two_times(
        1000, t_mean=0.0, t_std=1.0, r_mean=0.0, r_std=1.0, share_equal=1.0, generator=g
    )
    assert torch.equal(t1, r1)


def test_cfg_is_folded_into_the_target_for_the_samples_that_kept_their_condition():
    """v~ = w v + k u(z, t, t | c) + (1 - w - k) u(z, t, t | null) where the label was kept, v where dropped."""

    class ByClass(GaussianMeanFlowNet):
        def forward(self, z, level, *, second_level=None, class_labels=None):
            assert second_level is not None and (second_level == 0).all()  # u at r = t
            return z * 0 + class_labels.view(-1, 1, 1, 1).float()  # u = the class id

    objective = get_objective("meanflow", cfg_scale=2.0, cfg_mix=0.25)
    labels = torch.tensor([1, 2, 10, 3])  # 10: the null class (dropped)
    inputs = _inputs(
        ByClass(),
        torch.zeros(4, *SHAPE),
        None,
        cond={"class_labels": labels},
        null_condition=lambda b: {"class_labels": torch.full((b,), 10)},
    )
    v = torch.randn(4, *SHAPE)
    out = objective.guided_velocity(inputs, torch.randn(4, *SHAPE), torch.full((4,), 500.0), v)
    for i, y in enumerate(labels.tolist()):
        expected = v[i] if y == 10 else 2.0 * v[i] + 0.25 * y + (1 - 2.0 - 0.25) * 10
        torch.testing.assert_close(out[i], expected)
    assert get_objective("meanflow").guided_velocity(inputs, v, torch.full((4,), 500.0), v) is v


def _real_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(
            in_channels=1,
            base_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(0, 1),
            num_heads=2,
            norm_groups=8,
            num_classes=3,
            two_time=True,
        )
    else:
        net = DiT(
            in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3, two_time=True
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised layers random, so every path (second level too) matters
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net.double()


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_jvp_agrees_with_a_central_difference_on_a_real_net(kind):
    """du/dt along (v, 0, 1) by the jvp (through SDPA attention: the math kernel where the fused one has no
    forward-mode rule) equals (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h, h = 5e-3, in float64 with the
    formulation's levels t and t - r."""
    net = _real_net(kind)
    g = torch.Generator().manual_seed(2)
    z, v = (
        torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64),
    )
    t, r = (
        torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64),
        torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64),
    )
    labels = torch.tensor([0, 2, 3])

    def u_of(z, t, r):  # formulation=meanflow's levels: t and t - r (process.time_scale = 1)
        return net(z, t, second_level=t - r, class_labels=labels)

    u, dudt = mf.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    h = 5e-3
    with torch.no_grad():
        central = (u_of(z + h * v, t + h, r) - u_of(z - h * v, t - h, r)) / (2 * h)
        torch.testing.assert_close(u, u_of(z, t, r))
    assert dudt.abs().mean() > 1e-3  # a real derivative, not 0
    err = (dudt - central).norm() / central.norm()
    assert err < 1e-3, err  # central differences are O(h^2): ~2e-4 here
    # and not merely the z part: leaving out d/dt is visibly wrong
    _, dz_only = mf.jvp(u_of, (z, t, r), (v, torch.zeros_like(t), torch.zeros_like(r)))
    assert (dz_only - central).norm() / central.norm() > 10 * err


def test_loss_backpropagates_through_the_jvp_into_every_parameter_of_a_two_time_unet():
    net = _real_net("unet").float()
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    loss = get_objective("meanflow").loss(
        _inputs(net, x0, torch.Generator().manual_seed(4), cond={"class_labels": torch.tensor([0, 1, 2, 3])})
    )
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == [] or all("class_emb" in n for n in missing), missing


def test_meanflow_refuses_one_time_nets_other_objectives_and_processes():
    flow = get_process("rectified_flow")
    one_time = UNet(
        in_channels=1,
        base_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_levels=(),
        norm_groups=4,
    )
    x_T = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs a two-time net .*model.net.two_time: true"):
        get_sampler("meanflow", steps=1)(one_time, x_T, flow, objective="meanflow")
    with pytest.raises(ValueError, match="samples nets trained with objective=meanflow .*got objective flow"):
        get_sampler("meanflow", steps=1)(GaussianMeanFlowNet(), x_T, flow, objective="flow")
    with pytest.raises(ValueError, match="needs the rectified-flow process"):
        get_sampler("meanflow", steps=1)(GaussianMeanFlowNet(), x_T, get_process("ve"), objective="meanflow")
    with pytest.raises(ValueError, match="needs a two-time net"):
        get_objective("meanflow").loss(_inputs(one_time, x_T, None))
    with pytest.raises(ValueError, match="share_equal must be in"):
        get_objective("meanflow", share_equal=1.5)


def test_sampler_guides_with_cfg_in_one_batched_call():
    """Guidance goes through the Denoiser: u_null + s (u_cond - u_null), the second level broadcast over the CFG batch."""

    class ByClass(GaussianMeanFlowNet):
        def forward(self, z, level, *, second_level=None, class_labels=None):
            assert second_level.ndim == 0 and len(z) == 4  # [uncond; cond] of 2 samples
            return z * 0 + class_labels.view(-1, 1, 1, 1).float()

    x_T = torch.zeros(2, *SHAPE)
    out = get_sampler("meanflow", steps=1)(
        ByClass(),
        x_T,
        get_process("rectified_flow"),
        objective="meanflow",
        cond={"class_labels": torch.tensor([1, 2])},
        uncond={"class_labels": torch.tensor([5, 5])},
        guidance=Guidance(scale=3.0),
    )
    guided = torch.tensor([5 + 3 * (1 - 5), 5 + 3 * (2 - 5)], dtype=torch.float32)
    torch.testing.assert_close(out, -guided.view(2, 1, 1, 1).expand_as(out))


def test_meanflow_formulation_trains_and_samples_end_to_end(tmp_path):
    """formulation=meanflow composes, trains a few steps of a tiny two-time UNet, and samples in 1 step."""
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.train import train

    from conftest import TINY, compose

    run = tmp_path / "run"
    cfg = compose("train", [*TINY, "formulation=meanflow"], run)
    assert cfg.formulation == "meanflow" and cfg.model.net.two_time and cfg.sampler.name == "meanflow"
    train(cfg)
    model, config = load_system(run / "checkpoints" / "last.ckpt")
    assert config["model"]["objective"] == "meanflow" and model.net.accepts_second_level
    x_T = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    img = model.sample(
        sampler=get_sampler("meanflow", steps=1), x_T=x_T, cond={"class_labels": torch.tensor([0, 1, 2, 3])}
    )
    assert torch.isfinite(img).all() and img.abs().max() <= 1 and img.std() > 0


def test_fashion_mnist_experiment_composes_with_meanflow(tmp_path):
    from conftest import compose

    cfg = compose("train", ["experiment=fashion_mnist", "formulation=meanflow"], tmp_path)
    assert cfg.formulation == "meanflow" and cfg.model.objective == "meanflow"
    assert cfg.model.net.two_time and cfg.process.name == "rectified_flow" and cfg.sampler.name == "meanflow"


@pytest.mark.slow
def test_jvp_loss_under_ddp_syncs_gradients(tmp_path):
    """Two gloo processes: the meanflow loss (a jvp) computed in the DDP-wrapped module's forward, as Lightning
    calls training_step, gives every rank exactly the mean of the per-rank gradients; calling the wrapped
    module directly (the pitfall of jvp on model.module) leaves each rank with its own, unsynced."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("meanflow_ddp_probe.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "grads"), str(port)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = dict(kv.split("=") for kv in proc.stdout.split()[-3:])
    assert float(values["synced_vs_mean_rel"]) < 1e-6
    assert float(values["ranks_differ_rel"]) > 1e-2  # the ranks' own gradients differ: the sync is visible
    assert float(values["bypass_equals_local_abs"]) == 0.0


def test_meanflow_loss_on_a_compiled_net_equals_the_eager_one():
    """model.compile: true (the net compiled in place) trains meanflow with the eager net's loss and gradients.
    (torch 2.13: dynamo runs the net's frames eagerly inside the jvp; compiling the jvp itself fails in
    group_norm's forward-mode rule under fake tensors, a PyTorch bug: README, 'Few-step generation'.)"""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python / platform")
    nets = [_real_net("unet").float() for _ in range(2)]
    nets[0].compile(backend="aot_eager")  # no C++ compiler needed; inductor behaves the same here
    grads, losses = [], []
    try:
        for net in nets:
            x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
            cond = {"class_labels": torch.tensor([0, 1, 2, 0])}
            loss = get_objective("meanflow").loss(
                _inputs(net, x0, torch.Generator().manual_seed(4), cond=cond)
            )
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    finally:  # dynamo marked the UNet's frames 'skip' under the jvp: later fullgraph compiles must not inherit it
        torch._dynamo.reset()
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_jvp_under_bf16_autocast_runs_in_float32_and_matches_the_plain_call():
    """experiment=fashion_mnist trains under bf16-mixed: autocast casts the weights but not the tangents, which
    made forward mode fail on a dtype mismatch; the jvp leaves autocast and returns the float32 values."""
    net = _real_net("unet").float()
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, r = torch.tensor([0.8, 0.4]), torch.tensor([0.2, 0.4])
    labels = torch.tensor([1, 0])

    def u_of(z, t, r):
        return net(z, t, second_level=t - r, class_labels=labels)

    expected = mf.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mf.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    for e, x in zip(expected, got, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, e)
