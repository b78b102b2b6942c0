"""Two-time nets (issue 26): UNet and DiT with `two_time=True` embed a second time next to the first."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.nets.dit import DiT
from diffusion_lab.nets.unet import UNet


def _unet(**kw):
    return UNet(
        in_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=8,
        num_classes=3,
        **kw,
    )


def _dit(**kw):
    return DiT(in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3, **kw)


NETS = {"unet": _unet, "dit": _dit}


def _perturb_outputs(net: torch.nn.Module) -> None:
    """Give the zero-initialised output layers random weights, so the net's output is not 0 everywhere."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The one-time and the two-time net of `kind`, built from the same seed."""
    torch.manual_seed(0)
    one = NETS[kind]()
    torch.manual_seed(0)
    return one, NETS[kind](two_time=True)


@pytest.mark.parametrize("kind", NETS)
def test_one_time_net_keeps_its_parameters_and_refuses_a_second_level(kind):
    one, two = _pair(kind)
    assert not one.accepts_second_level and two.accepts_second_level
    one_sd, two_sd = one.state_dict(), two.state_dict()
    # the one-time net's names, in order, are the two-time net's first ones, with the same random init
    assert list(two_sd)[: len(one_sd)] == list(one_sd)
    assert all(torch.equal(one_sd[k], two_sd[k]) for k in one_sd)
    assert [k for k in two_sd if k not in one_sd] and all(
        k.startswith("second_level_mlp.") for k in two_sd if k not in one_sd
    )
    assert not any("second_level" in k for k in one_sd)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="two_time=True"):
        one(x, torch.tensor([1.0, 2.0]), second_level=torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("kind", NETS)
def test_two_time_net_starts_as_the_one_time_net_and_then_depends_on_the_second_level(kind):
    one, two = _pair(kind)
    _perturb_outputs(one)
    _perturb_outputs(two)  # same generator: the shared parameters get the same values
    # the second-level MLP's output layer is zero, so any second level leaves the output as the one-time net's
    assert two.second_level_mlp[2].weight.abs().sum() > 0  # _perturb_outputs touched it too ...
    with torch.no_grad():
        two.second_level_mlp[2].weight.zero_()
        two.second_level_mlp[2].bias.zero_()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 1, 3])
    ref = one(x, t, class_labels=y)
    assert ref.abs().mean() > 1e-3
    for level in (None, torch.tensor([0.0, 250.0, 900.0]), torch.tensor(300.0)):
        torch.testing.assert_close(two(x, t, class_labels=y, second_level=level), ref, rtol=0, atol=0)
    # a trained second-level MLP moves the output, and a 0-d level equals the broadcast one
    with torch.no_grad():
        two.second_level_mlp[2].weight.normal_(0, 0.1)
    a = two(x, t, class_labels=y, second_level=torch.tensor([0.0, 0.0, 0.0]))
    b = two(x, t, class_labels=y, second_level=torch.tensor([500.0, 500.0, 500.0]))
    assert (a - b).abs().mean() > 1e-4
    torch.testing.assert_close(two(x, t, class_labels=y, second_level=torch.tensor(500.0)), b)
    torch.testing.assert_close(two(x, t, class_labels=y), a)  # no second level: 0, the instantaneous one


def test_unet_init_kwargs_name_the_flag_only_when_set():
    assert "two_time" not in _unet().init_kwargs
    assert _unet(two_time=True).init_kwargs["two_time"] is True
