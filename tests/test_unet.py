"""UNet contract: call signature, zero-init output, class and text conditioning, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.nets.layers import Upsample, timestep_embedding
from diffusion_lab.nets.unet import UNet


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_output_layer_starts_at_zero_and_shapes_match():
    net = UNet(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    net = UNet(
        in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=3, num_heads=2
    )
    _perturb(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    a = net(x, t, class_labels=torch.tensor([0, 0]))
    b = net(x, t, class_labels=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    # no labels = the null class id num_classes
    torch.testing.assert_close(net(x, t), net(x, t, class_labels=torch.tensor([3, 3])))


def test_cross_attention_ignores_masked_tokens():
    torch.manual_seed(0)
    net = UNet(
        in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, context_dim=6, num_heads=2
    )
    _perturb(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    ctx = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    other = ctx.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 6) * 10  # change only the padding tokens
    torch.testing.assert_close(
        net(x, t, context=ctx, context_mask=mask), net(x, t, context=other, context_mask=mask)
    )
    # ...while a real token does change the output
    changed = ctx.clone()
    changed[0, 0] += 1.0
    assert not torch.allclose(
        net(x, t, context=ctx, context_mask=mask), net(x, t, context=changed, context_mask=mask)
    )


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channel_mult=(1, 2), attention_levels=(3,))
    net = UNet(
        in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_heads=2
    )
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="context_dim"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), context=torch.randn(1, 2, 4))


@pytest.mark.parametrize("size", [1, 3, 8])
def test_upsample_equals_nearest_interpolation_then_conv(size):
    """Upsample's transposed-convolution form computes conv3x3(nearest x2) exactly, gradients included."""
    torch.manual_seed(size)
    up = Upsample(5)
    x = torch.randn(2, 5, size, size + 1, dtype=torch.float64, requires_grad=True)
    up = up.double()
    out = up(x)
    ref = F.conv2d(
        F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1
    )
    assert out.shape == (2, 5, 2 * size, 2 * (size + 1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, up.conv.weight, up.conv.bias])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, up.conv.weight, up.conv.bias])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
