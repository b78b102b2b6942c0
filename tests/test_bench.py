"""The benchmark: a matched diffusers twin, FLOP and memory accounting, and the JSON / table it writes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import sdpa_backward_flop_count

from diffusion_lab import bench
from diffusion_lab.nets.unet import UNet

# tiny sizes for the tests, beside the shipped presets (`bench.PRESETS`)
TINY = {
    # a tiny size for tests
    "tiny": bench.Preset(
        name="tiny",
        image_size=8,
        net=bench.net_yaml(
            "unet_small",
            in_channels=1,
            base_channels=16,
            channel_mult=[1, 2],
            num_heads=2,
            num_classes=3,
            norm_groups=8,
        ),
        batch_cpu=4,
        batch_gpu=4,
        sample_steps=2,
        sample_batch_cpu=2,
        sample_batch_gpu=2,
    ),
    # a tiny DiT for tests, beside the tiny UNet
    "tiny_dit": bench.Preset(
        name="tiny_dit",
        image_size=8,
        kind="dit",
        versus="tiny",
        net=bench.net_yaml(
            "dit_tiny", in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3
        ),
        batch_cpu=4,
        batch_gpu=4,
        sample_steps=2,
        sample_batch_cpu=2,
        sample_batch_gpu=2,
    ),
}


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    for name, preset in TINY.items():
        monkeypatch.setitem(bench.PRESETS, name, preset)


def _layers(net: nn.Module) -> Counter:
    return Counter(type(m).__name__ for m in net.modules() if isinstance(m, nn.Conv2d | nn.GroupNorm))


@pytest.mark.parametrize("preset", ["quickstart", "cifar", "tiny"])
def test_diffusers_twin_matches_our_unet(preset):
    """Same convolutions and norms, layer for layer, and parameter counts within 0.5% (attention biases)."""
    pytest.importorskip("diffusers")  # the twin's library: a test oracle only (the dev extra)
    kw = bench.PRESETS[preset].net
    ours, twin = UNet(**kw), bench.diffusers_twin(kw)
    assert _layers(ours) == _layers(twin)
    conv_shapes = sorted(tuple(m.weight.shape) for m in ours.modules() if isinstance(m, nn.Conv2d))
    assert conv_shapes == sorted(tuple(m.weight.shape) for m in twin.modules() if isinstance(m, nn.Conv2d))
    n_ours, n_twin = bench.count_params(ours), bench.count_params(twin)
    assert abs(n_ours - n_twin) / n_twin < 0.005
    x, t = torch.randn(2, kw["in_channels"], 16, 16), torch.tensor([3, 700])
    cond = {"class_labels": torch.tensor([0, 1])} if kw.get("num_classes") else {}
    assert bench.DiffusersAsOurs(twin)(x, t, **cond).shape == ours(x, t, **cond).shape


def test_activation_bytes_counts_saved_tensors():
    """A linear layer saves its input for the weight gradient: exactly that tensor's bytes."""
    lin = nn.Linear(8, 4)
    x = torch.randn(16, 8)
    assert bench.activation_bytes(lambda: lin(x)) == 16 * 8 * 4


def test_bench_writes_json_and_table(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    result = bench.main(
        ["--preset", "tiny", "tiny_dit", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["presets"][0]["preset"] == "tiny" == result["presets"][0]["preset"]
    p = saved["presets"][0]
    for key in ("ours", "diffusers"):
        assert p["train_step_s"][key]["n"] == 2 and p["train_step_s"][key]["median"] > 0
        assert p["sampling"]["forward_calls_per_step"][key] == 1.0  # CFG: one batched forward per step
    ratio = p["train_step_s"]["diffusers"]["median"] / p["train_step_s"]["ours"]["median"]
    assert p["train_speed_ratio"] == pytest.approx(ratio)
    # the transposed-convolution upsampling does 16 instead of 36 multiply-adds per input pixel
    assert p["flops_train_step"]["ours"] < p["flops_train_step"]["diffusers"]
    assert saved["framework"]["loader_headroom"] > 1.0
    assert "| tiny 8px |" in out.with_suffix(".md").read_text()
    # the DiT preset: ours vs diffusers' DiT (the same function: same FLOPs), and our UNet on the same batch
    d = saved["presets"][1]
    assert (
        d["net"] == "dit"
        and d["versus"] == "tiny"
        and set(d["train_step_s"]) == {"ours", "diffusers", "unet"}
    )
    assert d["flops_train_step"]["unet"] == p["flops_train_step"]["ours"]
    assert d["unet_over_dit_step"] == pytest.approx(
        d["train_step_s"]["unet"]["median"] / d["train_step_s"]["ours"]["median"]
    )
    assert "| tiny_dit vs tiny 8px, batch 4 |" in out.with_suffix(".md").read_text()


def test_flops_count_attention_on_the_cpu():
    """torch's FLOP counter has no formula for the CPU's fused attention kernel; the bench adds it: 4 B H N^2 d
    forward (QK^T and AV) and torch's own formula for the backward (which recomputes the scores: 3.5x in all)."""
    b, h, n, d = 2, 3, 16, 8

    class Attend(nn.Module):
        def forward(self, x, t, **_):
            q = x.view(b, h, n, d)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    x = torch.randn(b, h * n * d, requires_grad=True)
    batch = {"x": x, "t": torch.zeros(b)}
    flops = bench.count_flops(Attend(), batch, bench.Settings(device=torch.device("cpu")))
    shape = (b, h, n, d)
    assert flops == 4 * b * h * n * n * d + sdpa_backward_flop_count(shape, shape, shape, shape)
    assert flops == 3.5 * 4 * b * h * n * n * d


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown preset"):
        bench.main(["--preset", "huge", "--out", str(tmp_path / "b.json")])


def test_a_failing_framework_step_keeps_the_nets_timings(tmp_path, monkeypatch):
    """`--compile` on a CPU whose inductor fails in the framework step used to lose the whole output."""
    pytest.importorskip("diffusers")

    def fail(*args, **kwargs):
        raise RuntimeError("InductorError: cannot determine truth value of Relational\nmore lines")

    monkeypatch.setattr(bench, "bench_framework", fail)
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--no-sampling", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["presets"][0]["train_step_s"]["ours"]["n"] == 1
    assert saved["framework"] == {
        "error": "RuntimeError: InductorError: cannot determine truth value of Relational"
    }
    assert "framework quickstart step: failed (RuntimeError" in out.with_suffix(".md").read_text()
