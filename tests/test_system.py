"""DiffusionSystem: training targets and loss values, CFG condition dropout, guided sampling."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import Guidance, get_process, get_sampler
from diffusion_lab.systems.diffusion import DiffusionSystem


class Recorder(nn.Module):
    """A 'net' (honouring the DenoisingNet contract) that returns a fixed output and remembers its calls."""

    context_dim = None
    input_multiple = 1

    def __init__(self, num_classes: int | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = self.out_channels = in_channels
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, x, t, **cond):
        self.calls.append({"x": x, "t": t, **cond})
        return torch.zeros_like(x) + self.w


def _system(net, **kw) -> DiffusionSystem:
    return DiffusionSystem(
        net=net,
        process=get_process("linear", num_timesteps=1000),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        **{"image_size": 4, **kw},
    )


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_loss_is_mse_to_the_target(prediction_type):
    torch.manual_seed(0)
    system = _system(Recorder(), objective=prediction_type, cond_drop_prob=0.0)
    x0 = torch.rand(16, 1, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(1)
    loss = system.diffusion_step({"image": x0}, generator=g)
    # replay the same draws by hand: the zero net's loss is the mean squared target
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = system.process.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction_type]
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(system.net.calls[-1]["x"], a * x0 + s * noise, rtol=1e-5, atol=1e-6)


def test_condition_dropout_rate_matches_config():
    torch.manual_seed(0)
    system = _system(Recorder(num_classes=5), cond_drop_prob=0.25)
    system.train()
    labels = torch.randint(0, 5, (20000,))
    dropped = system.drop_condition({"class_labels": labels})["class_labels"]
    rate = (dropped == 5).float().mean().item()
    assert abs(rate - 0.25) < 0.015  # 20000 draws: std ~0.003
    kept = dropped != 5
    assert torch.equal(dropped[kept], labels[kept])
    system.cond_drop_prob = 0.0
    assert torch.equal(system.drop_condition({"class_labels": labels})["class_labels"], labels)


def test_guided_sampling_is_one_batched_call_per_step():
    net = Recorder(num_classes=3)
    system = _system(net)
    sampler = get_sampler("ddim", steps=4)
    out = system.sample(
        sampler=sampler,
        num_samples=2,
        cond={"class_labels": torch.tensor([0, 1])},
        guidance=Guidance(scale=3.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (2, 1, 4, 4)
    assert len(net.calls) == sampler.nfe == 4
    assert net.calls[0]["x"].shape[0] == 4  # cond and null condition in one batch
    assert sorted(net.calls[0]["class_labels"].tolist()) == [0, 1, 3, 3]


def test_bad_values_fail_early():
    with pytest.raises(ValueError, match="objective"):
        _system(Recorder(), objective="score")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        _system(Recorder(), cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="valid choices"):
        _system(Recorder(), loss_weighting="nope")


@pytest.mark.parametrize("switch", [{"compile": True}, {"channels_last": True}])
def test_speed_switches_keep_the_loss_and_gradients(switch):
    """model.compile (dynamo, full graph: no graph breaks) and model.channels_last change speed, not values."""
    from diffusion_lab.nets.unet import UNet

    def net():
        torch.manual_seed(0)
        return UNet(in_channels=1, base_channels=16, channel_mult=(1, 2), num_heads=2, num_classes=3)

    opts = {"compile_options": {"backend": "eager", "fullgraph": True}} if "compile" in switch else {}
    plain, fast = _system(net(), image_size=8), _system(net(), image_size=8, **switch, **opts)
    assert (fast.net._compiled_call_impl is not None) == ("compile" in switch)  # compiled when built
    batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])}
    losses = []
    for system in (plain, fast):
        g = torch.Generator().manual_seed(3)
        loss = system.diffusion_step(batch, generator=g)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.net.named_parameters(), fast.net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(plain.net.state_dict()) == list(fast.net.state_dict())  # checkpoints keep their keys


def test_image_logger_steps_override_keeps_the_sampler():
    """`callbacks.image_logger.steps`: the run's sampler and options with fewer steps (cheaper previews)."""
    from diffusion_lab.callbacks.image_logger import ImageLogger

    base = get_sampler("ddim", steps=50, eta=0.5, grid="trailing")
    assert ImageLogger(sampler=base).sampler is base
    preview = ImageLogger(sampler=base, steps=25).sampler
    assert (preview.name, preview.steps, preview.opts, preview.nfe) == ("ddim", 25, base.opts, 25)
    with pytest.raises(TypeError, match="registered sampler"):
        ImageLogger(sampler=lambda *a, **k: None, steps=25)
