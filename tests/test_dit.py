"""DiT: adaLN-Zero identity at init, one block by hand, diffusers' DiTTransformer2DModel with our weights, the
DenoisingNet contract, and training on every formulation, in pixel space and on latents with text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from diffusion_lab.nets.base import DenoisingNet, check_denoising_net
from diffusion_lab.nets.dit import DiT, DiTBlock, sincos_2d
from diffusion_lab.nets.unet import UNet

from conftest import CONF_DIR, compose


def _randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every parameter random (zero-initialised gates and outputs too), so nothing is hidden by a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


def test_adaln_zero_blocks_are_the_identity_and_the_net_predicts_zero_at_init():
    torch.manual_seed(0)
    net = DiT(
        in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=5, context_dim=12
    )
    x = torch.randn(2, 3, 8, 8)
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    context, mask = torch.randn(2, 4, 12), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for block in net.blocks:
        assert torch.equal(block(tokens, c, context, mask), tokens)
    out = net(
        x, torch.tensor([0.3, 700.0]), class_labels=torch.tensor([1, 5]), context=context, context_mask=mask
    )
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    # ...and they are not the identity once trained: a gate moved is a block that acts
    _randomize(net.blocks[0])
    assert not torch.allclose(net.blocks[0](tokens, c, context, mask), tokens)


def _layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def _attention(q_in, kv_in, wq, bq, wkv, bkv, wo, bo, heads, mask=None):
    """Multi-head attention written out: softmax(Q K^T / sqrt(d)) V per head, masked keys at -inf."""
    d = q_in.shape[-1]
    q = q_in @ wq.T + bq
    k, v = (kv_in @ wkv.T + bkv).split(d, dim=-1)
    dh = d // heads
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh)  # (B, N, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        out.append(scores.softmax(-1) @ v[..., sl])
    return torch.cat(out, -1) @ wo.T + bo


def test_one_block_equals_a_hand_computation():
    torch.manual_seed(0)
    d, heads = 8, 2
    block = DiTBlock(d, num_heads=heads, mlp_ratio=2.0, context_dim=6).double()
    _randomize(block, std=0.4)
    x, c = torch.randn(2, 3, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    context = torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)

    m = block.modulation[1]
    mod = F.silu(c) @ m.weight.T + m.bias  # (B, 6 D)
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        mod[:, i * d : (i + 1) * d, None].transpose(1, 2) for i in range(6)
    )
    a = block.attn
    h = _layer_norm(x) * (1 + scale1) + shift1
    x1 = x + gate1 * _attention(
        h, h, a.to_q.weight, a.to_q.bias, a.to_kv.weight, a.to_kv.bias, a.proj.weight, a.proj.bias, heads
    )
    ca, nc = block.cross_attn, block.norm_cross
    hc = _layer_norm(x1, 1e-5) * nc.weight + nc.bias
    x2 = x1 + _attention(
        hc,
        context,
        ca.to_q.weight,
        ca.to_q.bias,
        ca.to_kv.weight,
        ca.to_kv.bias,
        ca.proj.weight,
        ca.proj.bias,
        heads,
        mask,
    )
    h2 = _layer_norm(x2) * (1 + scale2) + shift2
    u = h2 @ block.mlp[0].weight.T + block.mlp[0].bias
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    expected = x2 + gate2 * (gelu @ block.mlp[2].weight.T + block.mlp[2].bias)  # fmt: skip

    torch.testing.assert_close(block(x, c, context, mask), expected, atol=1e-12, rtol=1e-12)
    assert (expected - x).abs().mean() > 0.1  # the branches really contributed


def test_positions_are_dit_and_diffusers_sincos_layout():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    theirs = get_2d_sincos_pos_embed(16, 4, base_size=4, output_type="pt")  # (16, 16), row-major tokens
    torch.testing.assert_close(sincos_2d(4, 4, 16).float(), theirs.float(), atol=1e-6, rtol=0)
    pos = sincos_2d(2, 3, 8)  # token (row 1, col 2): [sin(2 w), cos(2 w), sin(w), cos(w)], w = (1, 1/100)
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(pos[5], torch.cat([(2 * w).sin(), (2 * w).cos(), w.sin(), w.cos()]))


@pytest.mark.parametrize("patch_size", [1, 2])
def test_equals_diffusers_dit_with_our_weights(patch_size):
    """diffusers' DiTTransformer2DModel, built by the bench's twin at the same size with our weights copied in
    (its per-block (t, y) embedders all get our one; its timestep frequencies set to DiT's 10000^(-i/128) from
    its 10000^(-i/127)), computes our function, class labels and the CFG null class included."""
    from diffusion_lab import bench

    kw = dict(in_channels=3, patch_size=patch_size, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    torch.manual_seed(0)
    ours = DiT(**kw)
    _randomize(ours, std=0.1)
    twin = bench.copy_dit_weights(ours, bench.diffusers_dit_twin(kw, image_size=8)).eval()
    assert bench.count_params(twin) == bench.count_params(ours) + (kw["depth"] - 1) * (
        sum(p.numel() for p in ours.time_mlp.parameters()) + ours.class_emb.weight.numel()
    )  # the per-block embedders, nothing else
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([3.7, 812.0, 0.05])
    labels = torch.tensor([0, 4, 5])
    expected = ours(x, t, class_labels=labels)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(twin(x, t, class_labels=labels).sample, expected, atol=2e-5, rtol=1e-4)


def test_float_noise_levels_classes_null_class_and_masked_context():
    torch.manual_seed(0)
    net = DiT(in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3, context_dim=6)
    _randomize(net, std=0.2)
    x = torch.randn(2, 2, 4, 6)  # not square: positions are computed for any grid
    ctx, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = net(x, torch.tensor([-0.3, -0.3]), context=ctx, context_mask=mask)
    assert out.shape == x.shape
    # EDM's c_noise = ln(sigma) / 4 is a small float: nearby levels give different outputs
    assert not torch.allclose(out, net(x, torch.tensor([-0.25, -0.25]), context=ctx, context_mask=mask))
    # no labels = the null class id num_classes
    torch.testing.assert_close(
        out, net(x, torch.tensor(-0.3), class_labels=torch.tensor([3, 3]), context=ctx, context_mask=mask)
    )
    assert not torch.allclose(
        out,
        net(x, torch.tensor([-0.3, -0.3]), class_labels=torch.tensor([0, 1]), context=ctx, context_mask=mask),
    )
    other = ctx.clone()
    other[~mask] = 10 * torch.randn(int((~mask).sum()), 6)  # only the padding tokens change
    torch.testing.assert_close(out, net(x, torch.tensor([-0.3, -0.3]), context=other, context_mask=mask))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 2, 5, 4), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="without num_classes"):
        DiT(in_channels=1, hidden_size=8, depth=1, num_heads=2)(torch.randn(1, 1, 4, 4), torch.tensor([1.0]), class_labels=torch.tensor([0]))  # fmt: skip
    with pytest.raises(ValueError, match="without context_dim"):
        DiT(in_channels=1, hidden_size=8, depth=1, num_heads=2)(torch.randn(1, 1, 4, 4), torch.tensor([1.0]), context=ctx[:1])  # fmt: skip


def test_every_net_config_builds_a_denoising_net_and_systems_refuse_others():
    nets = sorted(Path(CONF_DIR, "model", "net").glob("*.yaml"))
    assert {"unet", "unet_small", "unet_fashion", "dit_tiny", "dit_s"} <= {p.stem for p in nets}
    from diffusion_lab.imports import locate

    for path in nets:
        cfg = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
        cfg["in_channels"] = 3  # ${data.channels}
        net = locate(cfg.pop("_target_"))(**cfg)
        assert isinstance(net, DenoisingNet) and check_denoising_net(net) is net
        assert net.out_channels == 3 and net.input_multiple in (1, 2, 4, 8)
    assert UNet(channel_mult=(1, 2, 2, 2)).input_multiple == 8 and DiT(patch_size=4).input_multiple == 4
    with pytest.raises(TypeError, match="Linear is not a denoising net: it lacks in_channels, out_channels"):
        check_denoising_net(nn.Linear(2, 2))


def test_an_experiments_unet_setting_under_a_dit_says_how_to_drop_it():
    """experiment=fashion_mnist keeps its UNet in model/net=unet_fashion, so model/net=dit_tiny swaps it whole (the
    design's sweep `-m experiment=fashion_mnist model/net=unet_fashion,dit_tiny`); a UNet argument set on top of a
    DiT is one line that says how to drop it."""
    from omegaconf import OmegaConf

    from diffusion_lab.config_types import config_errors

    def errors(overrides):
        cfg = compose("train", ["experiment=fashion_mnist", *overrides], Path("unused"))
        return config_errors(OmegaConf.to_container(cfg.model.net, resolve=True), "model.net")

    assert errors(["model/net=dit_tiny"]) == [] == errors([])
    assert errors(["model/net=dit_tiny", "+model.net.attention_levels=[2]"]) == [
        "model.net.attention_levels is not an argument of DiT (it takes: context_dim, depth, frequency_dim, "
        "hidden_size, in_channels, mlp_ratio, num_classes, num_heads, out_channels, patch_size, two_time; a config "
        "setting it for another net is undone by '~model.net.attention_levels')"
    ]


DIT_TINY = [
    "model/net=dit_tiny",
    "model.net.patch_size=2",
    "model.net.hidden_size=16",
    "model.net.depth=1",
    "model.net.num_heads=2",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "data.image_size=8",
    "data.batch_size=8",
    "sampler.steps=2",
    "callbacks.image_logger.num_samples=10",
    "callbacks.image_logger.every_n_steps=3",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.class_accuracy.num_per_class=1",
    "callbacks.class_accuracy.sampler.steps=2",
]


@pytest.mark.parametrize("formulation", ["ddpm", "edm", "flow"])
def test_dit_trains_and_samples_with_every_formulation(formulation, tmp_path):
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.diffusion import Guidance, get_sampler
    from diffusion_lab.train import train

    summary = train(compose("train", [*DIT_TINY, f"formulation={formulation}"], tmp_path / "run"))
    assert math.isfinite(summary["final_train_loss"]) and summary["steps"] == 3
    model, config = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, DiT) and config["model"]["net"]["_target_"] == "diffusion_lab.nets.dit.DiT"
    x = model.sample(sampler=get_sampler("euler", steps=2), num_samples=2, cond={"class_labels": torch.tensor([0, 9])}, guidance=Guidance(scale=3.0))  # fmt: skip
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.std() > 0


def test_dit_on_latents_with_text(tmp_path):
    """experiment=shapes_ldm_text with model/net=dit_tiny: cross-attention to the caption tokens, on 8x8x4 latents."""
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.train import train

    from experiment_fixtures import TINY_SHAPES, TINY_TEXT, tiny_autoencoder_ckpt

    over = [
        "experiment=shapes_ldm_text",
        *[o for o in DIT_TINY if not o.startswith(("data.image_size", "callbacks.class_accuracy"))],
        "model.net.patch_size=1",
        f"autoencoder_ckpt={tiny_autoencoder_ckpt(tmp_path / 'ae.ckpt')}",
        f"model.latent_cache={tmp_path / 'latent_cache'}",
        *TINY_SHAPES,
        *TINY_TEXT,
        "callbacks.prompt_adherence=null",
    ]
    train(compose("train", over, tmp_path / "run"))
    model, _ = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, DiT) and model.net.context_dim == 16 and model.net.in_channels == 4
    assert model.net.blocks[0].cross_attn is not None
    from diffusion_lab.diffusion import Guidance, get_sampler

    cond = model.condition(prompts=["a red circle", "a large blue square"])
    images = model.sample(
        sampler=get_sampler("ddim", steps=2), num_samples=2, cond=cond, guidance=Guidance(scale=3.0)
    )
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
