"""Benchmark: our nets' training step and sampling against diffusers' twins (UNet2DModel, DiTTransformer2DModel).

`python -m diffusion_lab.bench [--preset quickstart cifar fashion_dit dit_s] [--best] [--repeats 7] [--out FILE]`

For each preset our net (UNet or DiT) and diffusers' twin are built with the same widths, depth, attention
and conditioning (`diffusers_twin`, `diffusers_dit_twin`), and in one run, interleaved repeat by repeat, we time:
- the training step: forward + MSE loss + backward + AdamW step, same batch, same optimizer settings;
- sampling: DDIM with classifier-free guidance through our sampler (one batched forward per step);
- activation memory (bytes autograd saves for backward) and, on CUDA, peak allocated memory;
- FLOPs of one forward + backward (`torch.utils.flop_counter`) and, on a known GPU, MFU.
Ratios are diffusers' median time over ours (> 1: ours is faster). A DiT preset with `versus` also times our UNet of
that preset on the same batch (the backbone comparison: parameters, FLOPs, step time). `--best` turns on bf16 autocast,
channels_last, torch.compile and fused AdamW for both nets (the GPU comparison "at their best settings").
Ours also runs as the framework trains it (`DiffusionSystem.diffusion_step`), and the quickstart's data
loader is timed against the step, so a starving loader shows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from diffusion_lab import conf
from diffusion_lab.files import write_text_atomic
from diffusion_lab.generate import resolve_device
from diffusion_lab.nets.dit import DiT
from diffusion_lab.nets.unet import UNet

# Dense peak FLOP/s by device-name fragment and compute dtype (vendor data sheets, no sparsity).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM; PCIe is ~25% lower
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
}


@dataclass(frozen=True)
class Preset:
    """One benchmark size: our net (`kind`: unet or dit) and its constructor arguments plus batch sizes per device;
    `versus`: a UNet preset on the same data, timed beside a DiT."""

    name: str
    image_size: int
    net: dict[str, Any]
    batch_cpu: int
    batch_gpu: int
    kind: str = "unet"
    versus: str | None = None
    sample_steps: int = 10
    sample_batch_cpu: int = 32
    sample_batch_gpu: int = 256


def net_yaml(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of `conf/model/net/<name>.yaml`, with `overrides` (what the data sets: channels)."""
    node = OmegaConf.load(Path(conf.__file__).parent / "model" / "net" / f"{name}.yaml")
    node = OmegaConf.merge(node, overrides)
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}


PRESETS: dict[str, Preset] = {
    p.name: p  # Preset(name, image_size, net, batch_cpu, batch_gpu, kind="unet", ...)
    for p in (
        # the quickstart's net (conf/model/net/unet_small.yaml) on 16x16 digits, class-conditional
        Preset("quickstart", 16, net_yaml("unet_small", in_channels=1), 64, 256),
        # the DDPM CIFAR-10 net (conf/model/net/unet.yaml: 35.7M parameters), unconditional, 32x32
        Preset("cifar", 32, net_yaml("unet", in_channels=3), 8, 128, sample_batch_cpu=8),
        # experiment=fashion_mnist's UNet: unet_small with attention at 8x8, class-conditional, 32 px, batch 32
        Preset("fashion", 32, net_yaml("unet_fashion", in_channels=1), 32, 256),
        # conf/model/net/dit_tiny.yaml on the same data, against the fashion UNet (similar FLOPs)
        Preset("fashion_dit", 32, net_yaml("dit_tiny", in_channels=1), 32, 256, "dit", versus="fashion"),
        # DiT-S/2 (conf/model/net/dit_s.yaml) on 32x32x4 latents with ImageNet's 1000 classes
        Preset(
            "dit_s", 32, net_yaml("dit_s", in_channels=4, num_classes=1000), 8, 256, "dit", sample_batch_cpu=8
        ),
    )
}
NETS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}


# ------------------------------------------------------------------ the matched diffusers net
def diffusers_twin(unet: dict[str, Any]) -> nn.Module:
    """diffusers' UNet2DModel with our UNet's widths, depth, attention levels, heads and class embedding."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # the `dev` extra installs it
        raise SystemExit("error: the benchmark compares against diffusers: pip install diffusers") from e
    mult = tuple(unet["channel_mult"])
    widths = tuple(unet["base_channels"] * m for m in mult)
    attn = set(unet.get("attention_levels", ()))
    heads = unet.get("num_heads", 4)
    if len({widths[i] // heads for i in attn} | {widths[-1] // heads}) != 1:
        raise ValueError("diffusers takes one attention_head_dim: attention widths / num_heads must agree")
    classes = unet.get("num_classes")
    return UNet2DModel(
        sample_size=None,
        in_channels=unet["in_channels"],
        out_channels=unet.get("out_channels") or unet["in_channels"],
        block_out_channels=widths,
        layers_per_block=unet["num_res_blocks"],  # diffusers' up blocks add one, as ours do
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(mult))),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(mult)))
        ),
        attention_head_dim=widths[-1] // heads,
        norm_num_groups=unet.get("norm_groups", 32),
        attn_norm_num_groups=unet.get("norm_groups", 32),  # ours normalises before the middle attention too
        norm_eps=1e-6,
        resnet_time_scale_shift="scale_shift" if unet.get("scale_shift", True) else "default",
        num_class_embeds=None if classes is None else classes + 1,  # + the CFG null class
        flip_sin_to_cos=True,  # [cos, sin] like ours
        freq_shift=0,
        downsample_padding=1,
        dropout=unet.get("dropout", 0.0),
    )


def diffusers_dit_twin(dit: dict[str, Any], image_size: int) -> nn.Module:
    """diffusers' DiTTransformer2DModel at our DiT's size (patch, width, depth, heads, classes, norms), its
    sinusoidal timestep frequencies set to DiT's (10000^(-i / 128); diffusers' DiT divides by 127): with our
    weights copied in (`copy_dit_weights`) it computes the same function. Layouts that do not allow it: no
    cross-attention (text), no unconditional DiT, MLP ratio 4 and 256 frequencies only."""
    try:
        from diffusers import DiTTransformer2DModel
        from diffusers.models.embeddings import Timesteps
    except ImportError as e:  # the `dev` extra installs it
        raise SystemExit("error: the benchmark compares against diffusers: pip install diffusers") from e
    if dit.get("num_classes") is None or dit.get("context_dim") is not None:
        raise ValueError(
            "diffusers' DiTTransformer2DModel is class-conditional only, without cross-attention"
        )
    if dit.get("mlp_ratio", 4.0) != 4.0 or dit.get("frequency_dim", 256) != 256:
        raise ValueError("diffusers' DiT has mlp_ratio 4 and 256 timestep frequencies")
    hidden, heads = dit["hidden_size"], dit["num_heads"]
    twin = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=dit["in_channels"],
        out_channels=dit.get("out_channels"),
        num_layers=dit["depth"],
        sample_size=image_size,
        patch_size=dit["patch_size"],
        num_embeds_ada_norm=dit["num_classes"],  # + the CFG null class (class_dropout_prob > 0)
        norm_eps=1e-6,  # DiT's LayerNorms (diffusers' default is 1e-5)
    )
    for block in twin.transformer_blocks:  # each block embeds (t, y) itself; ours once
        block.norm1.emb.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    return twin


@torch.no_grad()
def copy_dit_weights(ours: DiT, twin: nn.Module) -> nn.Module:
    """Our DiT's weights into its diffusers twin (each twin block gets our one time MLP and class table; our
    fused key-value projection is split into to_k / to_v). Returns the twin."""

    def put(dst: nn.Module, src: nn.Module | torch.Tensor, bias: torch.Tensor | None = None) -> None:
        dst.weight.copy_(src if isinstance(src, torch.Tensor) else src.weight)
        b = bias if bias is not None or isinstance(src, torch.Tensor) else getattr(src, "bias", None)
        if b is not None:
            dst.bias.copy_(b)

    put(twin.pos_embed.proj, ours.patch_embed)
    d = ours.hidden_size
    for mine, theirs in zip(ours.blocks, twin.transformer_blocks, strict=True):
        emb = theirs.norm1.emb
        put(emb.timestep_embedder.linear_1, ours.time_mlp[0])
        put(emb.timestep_embedder.linear_2, ours.time_mlp[2])
        put(emb.class_embedder.embedding_table, ours.class_emb)
        put(theirs.norm1.linear, mine.modulation[1])
        put(theirs.attn1.to_q, mine.attn.to_q)
        kv_w, kv_b = mine.attn.to_kv.weight, mine.attn.to_kv.bias
        put(theirs.attn1.to_k, kv_w[:d], kv_b[:d])
        put(theirs.attn1.to_v, kv_w[d:], kv_b[d:])
        put(theirs.attn1.to_out[0], mine.attn.proj)
        put(theirs.ff.net[0].proj, mine.mlp[0])
        put(theirs.ff.net[2], mine.mlp[2])
    put(twin.proj_out_1, ours.final.modulation[1])
    put(twin.proj_out_2, ours.final.linear)
    return twin


def build_nets(preset: Preset) -> dict[str, nn.Module]:
    """Our net and diffusers' twin (same weights for a DiT), plus the `versus` preset's UNet if it has one."""
    ours = NETS[preset.kind](**preset.net)
    if preset.kind == "dit":
        twin = copy_dit_weights(ours, diffusers_dit_twin(preset.net, preset.image_size))
    else:
        twin = diffusers_twin(preset.net)
    nets = {"ours": ours, "diffusers": DiffusersAsOurs(twin)}
    if preset.versus is not None:
        other = PRESETS[preset.versus]
        same = ("in_channels", "num_classes")
        if other.image_size != preset.image_size or any(other.net.get(k) != preset.net.get(k) for k in same):
            raise ValueError(
                f"preset {preset.name} and its versus {other.name} must share the data and classes"
            )
        nets["unet"] = NETS[other.kind](**other.net)
    return nets


class DiffusersAsOurs(nn.Module):
    """Call a diffusers UNet2DModel or DiTTransformer2DModel with our net contract
    `net(x, noise_level, *, class_labels=...)`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, noise_level, *, class_labels=None, **_):
        return self.net(x, noise_level, class_labels=class_labels).sample


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------ timing
@dataclass
class Settings:
    """What a run turns on (for both nets alike)."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False

    def describe(self) -> str:
        on = [n for n in ("bf16", "channels_last", "compile", "fused_adam") if getattr(self, n)]
        return ", ".join(on) or "fp32 eager"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(s: Settings):
    if s.bf16:
        return torch.autocast(device_type=s.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Contender:
    """One net set up for timing: its train step, sampling call and measurements."""

    name: str
    net: nn.Module
    step: Callable[[], None]
    train_times: list[float] = field(default_factory=list)
    train_cpu_times: list[float] = field(default_factory=list)
    sample_times: list[float] = field(default_factory=list)


def make_batch(preset: Preset, batch: int, s: Settings, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, n = preset.net["in_channels"], preset.image_size
    out = {
        "x": torch.randn(batch, c, n, n, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "target": torch.randn(batch, c, n, n, generator=g),
    }
    if preset.net.get("num_classes"):
        out["class_labels"] = torch.randint(0, preset.net["num_classes"] + 1, (batch,), generator=g)
    out = {k: v.to(s.device) for k, v in out.items()}
    if s.channels_last:
        out["x"] = out["x"].contiguous(memory_format=torch.channels_last)
    return out


def prepare(net: nn.Module, s: Settings) -> nn.Module:
    net = net.to(s.device)
    if s.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if s.compile:
        net.compile()  # in place: parameter names (and checkpoints) unchanged
    return net


def train_step_fn(net: nn.Module, batch: dict[str, torch.Tensor], s: Settings) -> Callable[[], None]:
    """forward + MSE + backward + AdamW step, the unit the comparison times."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-3, fused=s.fused_adam or None)
    cond = {"class_labels": batch["class_labels"]} if "class_labels" in batch else {}

    def step() -> None:
        with _autocast(s):
            out = net(batch["x"], batch["t"], **cond)
            loss = F.mse_loss(out.float(), batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w, time.process_time() - c


def activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during `fn` (the training step's activation memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.requires_grad and t.grad_fn is None and t.is_leaf:  # parameters are not activations
            return t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().mean().backward()
    return sum(seen.values())


def count_flops(net: nn.Module, batch: dict[str, torch.Tensor], s: Settings) -> int:
    """FLOPs of one forward + backward, counted by torch.utils.flop_counter (matmuls, convolutions, attention:
    the CPU's fused attention kernel is counted by torch's formula for the GPU kernels, which it lacks)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    cond = {"class_labels": batch["class_labels"]} if "class_labels" in batch else {}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter, _autocast(s):
        net(batch["x"], batch["t"], **cond).float().mean().backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, s: Settings) -> float | None:
    """The device's dense peak FLOP/s for the compute dtype, when known (GPUs in PEAK_FLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype = "bf16" if s.bf16 else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[dtype]
    return None


# ------------------------------------------------------------------ one preset
def bench_preset(preset: Preset, s: Settings, *, repeats: int, warmup: int, sampling: bool = True) -> dict:
    gpu = s.device.type == "cuda"
    batch_size = preset.batch_gpu if gpu else preset.batch_cpu
    batch = make_batch(preset, batch_size, s)
    torch.manual_seed(0)
    nets = build_nets(preset)
    n_ours, n_theirs = count_params(nets["ours"]), count_params(nets["diffusers"])
    flops, acts = probe_nets(nets, batch, s)
    contenders = []
    for name, net in nets.items():
        net = prepare(net, s)
        contenders.append(Contender(name, net, train_step_fn(net, batch, s)))
    peak_mem = time_training(contenders, s, repeats=repeats, warmup=warmup)

    out: dict[str, Any] = {
        "preset": preset.name,
        "image_size": preset.image_size,
        "batch_size": batch_size,
        "net": preset.kind,
        "net_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.net.items()},
        "params": {name: count_params(net) for name, net in nets.items()},
        "params_rel_diff": (n_ours - n_theirs) / n_theirs,
        "flops_train_step": flops,
        "activation_bytes": acts,
    }
    if peak_mem:
        out["peak_memory_bytes"] = peak_mem
    med = {c.name: statistics.median(c.train_times) for c in contenders}
    out["train_step_s"] = {c.name: _stats(c.train_times) for c in contenders}
    out["train_step_cpu_s"] = {c.name: _stats(c.train_cpu_times) for c in contenders}
    out["train_images_per_s"] = {k: batch_size / v for k, v in med.items()}
    out["train_speed_ratio"] = med["diffusers"] / med["ours"]
    out["train_speed_ratio_cpu_time"] = statistics.median(contenders[1].train_cpu_times) / statistics.median(
        contenders[0].train_cpu_times
    )
    peak = peak_flops(s.device, s)
    if peak:
        out["mfu"] = {k: flops[k] / med[k] / peak for k in med}
        out["peak_flops"] = peak
    out["achieved_tflops"] = {k: flops[k] / med[k] / 1e12 for k in med}

    if sampling:  # DDIM + CFG through our sampler: one batched forward of 2B per step
        out["sampling"] = time_sampling(preset, contenders, s, repeats=repeats)
    if preset.versus is not None:  # the backbone comparison: our UNet's step time over our DiT's
        out["versus"] = preset.versus
        out["unet_over_dit_step"] = med["unet"] / med["ours"]
    return out


def probe_nets(
    nets: dict[str, nn.Module], batch: dict[str, torch.Tensor], s: Settings
) -> tuple[dict[str, int], dict[str, int]]:
    """(FLOPs of one training step, activation bytes) per net, each measured on a copy."""
    flops = {name: count_flops(copy.deepcopy(net).to(s.device), batch, s) for name, net in nets.items()}
    acts = {}
    for name, net in nets.items():
        probe = copy.deepcopy(net).to(s.device)
        cond = {"class_labels": batch["class_labels"]} if "class_labels" in batch else {}
        with _autocast(s):
            acts[name] = activation_bytes(
                lambda probe=probe, cond=cond: probe(batch["x"], batch["t"], **cond)
            )
    return flops, acts


def time_training(contenders: list[Contender], s: Settings, *, repeats: int, warmup: int) -> dict[str, int]:
    """Warm up each contender, then time their training steps interleaved; the GPU peak memory per net."""
    gpu = s.device.type == "cuda"
    peak_mem = {}
    for c in contenders:  # warm-up (and compilation) outside the timed repeats
        if gpu:  # this net's step: activations, gradients, optimizer state, above what was resident
            _sync(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
            resident = torch.cuda.memory_allocated(s.device)
        for _ in range(warmup):
            c.step()
        _sync(s.device)
        if gpu:
            peak_mem[c.name] = torch.cuda.max_memory_allocated(s.device) - resident
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        for c in contenders:
            wall, cpu = time_call(c.step, s.device)
            c.train_times.append(wall)
            c.train_cpu_times.append(cpu)
    return peak_mem


def time_sampling(
    preset: Preset, contenders: list[Contender], s: Settings, *, repeats: int
) -> dict[str, Any]:
    """DDIM with classifier-free guidance through our sampler, timed per contender."""
    from diffusion_lab.diffusion import Guidance, get_process, get_sampler

    gpu = s.device.type == "cuda"
    schedule = get_process("linear", num_timesteps=1000)
    sampler = get_sampler("ddim", steps=preset.sample_steps)
    n = preset.sample_batch_gpu if gpu else preset.sample_batch_cpu
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(n, preset.net["in_channels"], preset.image_size, preset.image_size, generator=g)
    x_T = x_T.to(s.device)
    cond = uncond = None
    scale = 1.0
    if preset.net.get("num_classes"):
        k = preset.net["num_classes"]
        cond = {"class_labels": torch.arange(n, device=s.device) % k}
        uncond = {"class_labels": torch.full((n,), k, device=s.device)}
        scale = 3.0
    calls = {}
    for c in contenders:
        c.net.eval()
        counted = _CallCounter(c.net)

        def run(counted=counted):
            with torch.inference_mode(), _autocast(s):
                sampler(counted, x_T, schedule, cond=cond, uncond=uncond, guidance=Guidance(scale=scale))

        run()  # warm-up
        counted.calls = 0
        for _ in range(max(1, repeats // 2)):
            c.sample_times.append(time_call(run, s.device)[0])
        calls[c.name] = counted.calls / max(1, repeats // 2) / preset.sample_steps
    smed = {c.name: statistics.median(c.sample_times) for c in contenders}
    return {
        "sampler": f"ddim {preset.sample_steps} steps, guidance {scale}",
        "batch": n,
        "images_per_s": {k: n / v for k, v in smed.items()},
        "forward_calls_per_step": calls,
        "speed_ratio": smed["diffusers"] / smed["ours"],
    }


class _CallCounter(nn.Module):
    """Counts forward calls of a net (CFG must cost one batched call per step)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ------------------------------------------------------------------ the framework's own step and loader
def bench_framework(s: Settings, *, repeats: int, warmup: int) -> dict:
    """The quickstart as trained: DiffusionSystem.diffusion_step + AdamW, and its data loader's rate."""
    from diffusion_lab.data.digits import DigitsDataModule
    from diffusion_lab.diffusion import get_process
    from diffusion_lab.systems.diffusion import DiffusionSystem

    preset = PRESETS["quickstart"]
    dm = DigitsDataModule(image_size=16, batch_size=preset.batch_gpu if s.device.type == "cuda" else 64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    batch = {k: v.to(s.device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
    system = DiffusionSystem(
        net=prepare(UNet(**preset.net), s),
        process=get_process("linear"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-3),
        image_size=16,
    ).to(s.device)
    opt = torch.optim.AdamW(system.parameters(), lr=2e-3, weight_decay=1e-3, fused=s.fused_adam or None)

    def step():
        with _autocast(s):
            loss = system.diffusion_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    steps = [time_call(step, s.device)[0] for _ in range(repeats)]
    n_batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:  # batches the loader delivers per second
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
        n_batches += 1
    loader_rate = n_batches / (time.perf_counter() - start)
    step_rate = 1.0 / statistics.median(steps)
    return {
        "system_step_s": _stats(steps),
        "steps_per_s": step_rate,
        "loader_batches_per_s": loader_rate,
        "loader_headroom": loader_rate / step_rate,  # > 1: the loader never starves the step
    }


# ------------------------------------------------------------------ entry point
def run(
    presets: list[str],
    s: Settings,
    *,
    repeats: int,
    warmup: int,
    framework: bool = True,
    sampling: bool = True,
) -> dict:
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"error: unknown preset {unknown}; valid choices: {', '.join(PRESETS)}")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": s.describe(),
        "repeats": repeats,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "presets": [],
    }
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    for name in presets:
        print(f"[bench] {name}: timing ours vs diffusers ({s.describe()}, {repeats} repeats) ...", flush=True)
        result["presets"].append(
            bench_preset(PRESETS[name], s, repeats=repeats, warmup=warmup, sampling=sampling)
        )
    if framework:
        print("[bench] framework: DiffusionSystem step and data loader ...", flush=True)
        try:  # the nets' timings above are kept when the framework step cannot run in these settings
            result["framework"] = bench_framework(s, repeats=repeats, warmup=warmup)
        except Exception as e:  # e.g. torch.compile's inductor failing on the CPU (issue 23)
            result["framework"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(
                f"[bench] framework step failed ({result['framework']['error']}); the nets' timings are kept"
            )
    result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def format_table(result: dict) -> str:
    """A markdown table of the result (the README and closing notes paste it)."""
    lines = [
        f"device: {result['device']} | torch {result['torch']} | diffusers {result.get('diffusers', '?')} | "
        f"threads {result['threads']} | {result['settings']} | median of {result['repeats']} repeats",
        "",
        "| preset | batch | params ours / diffusers | train step ours | diffusers | speed ratio | "
        "GFLOP/step ours / diffusers | activations MiB ours / diffusers | sampling img/s ours / diffusers | MFU ours / diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["presets"]:
        t = p["train_step_s"]
        act = p["activation_bytes"]
        samp = p.get("sampling")
        s_txt = (
            f"{samp['images_per_s']['ours']:.1f} / {samp['images_per_s']['diffusers']:.1f}" if samp else "-"
        )
        mfu = p.get("mfu")
        m_txt = f"{mfu['ours']:.1%} / {mfu['diffusers']:.1%}" if mfu else "-"
        lines.append(
            f"| {p['preset']} {p['image_size']}px | {p['batch_size']} | "
            f"{p['params']['ours'] / 1e6:.2f}M / {p['params']['diffusers'] / 1e6:.2f}M ({p['params_rel_diff']:+.1%}) | "
            f"{t['ours']['median'] * 1e3:.1f} ms | {t['diffusers']['median'] * 1e3:.1f} ms | "
            f"**{p['train_speed_ratio']:.2f}x** | "
            f"{p['flops_train_step']['ours'] / 1e9:.1f} / {p['flops_train_step']['diffusers'] / 1e9:.1f} | "
            f"{act['ours'] / 2**20:.0f} / {act['diffusers'] / 2**20:.0f} | {s_txt} | {m_txt} |"
        )
    versus = [p for p in result["presets"] if p.get("versus")]
    if versus:
        lines += [
            "",
            "| backbones (same batch, interleaved) | params DiT / UNet | GFLOP/step DiT / UNet | "
            "train step DiT / UNet | UNet / DiT step time | sampling img/s DiT / UNet |",
            "|---|---|---|---|---|---|",
        ]
    for p in versus:
        t, f, n, samp = p["train_step_s"], p["flops_train_step"], p["params"], p.get("sampling")
        s_txt = f"{samp['images_per_s']['ours']:.1f} / {samp['images_per_s']['unet']:.1f}" if samp else "-"
        lines.append(
            f"| {p['preset']} vs {p['versus']} {p['image_size']}px, batch {p['batch_size']} | "
            f"{n['ours'] / 1e6:.2f}M / {n['unet'] / 1e6:.2f}M | {f['ours'] / 1e9:.1f} / {f['unet'] / 1e9:.1f} | "
            f"{t['ours']['median'] * 1e3:.1f} ms / {t['unet']['median'] * 1e3:.1f} ms | "
            f"**{p['unet_over_dit_step']:.2f}x** | {s_txt} |"
        )
    fw = result.get("framework")
    if fw and "error" in fw:
        lines += ["", f"framework quickstart step: failed ({fw['error']})"]
    elif fw:
        lines += [
            "",
            f"framework quickstart step (DiffusionSystem.diffusion_step + AdamW): "
            f"{fw['system_step_s']['median'] * 1e3:.1f} ms; data loader {fw['loader_batches_per_s']:.0f} batches/s "
            f"= {fw['loader_headroom']:.0f}x the step rate",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["race"]:  # the peer race (diffusion_lab/race.py)
        from diffusion_lab.race import main as race_main

        return race_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_lab.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", nargs="+", default=None, help=f"sizes to run: {', '.join(PRESETS)}")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per net (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both nets")
    parser.add_argument("--fused-adam", action="store_true")
    parser.add_argument(
        "--best", action="store_true", help="all of bf16, channels_last, compile, fused AdamW"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--no-framework", action="store_true")
    parser.add_argument("--out", default="outputs/bench/bench.json", help="JSON file (a .md table beside it)")
    parser.add_argument(
        "--load-time", metavar="CKPT", help="time loading CKPT vs its safetensors export, nothing else"
    )
    args = parser.parse_args(argv)
    if args.load_time:
        from diffusion_lab.export import format_load_times, time_loading

        if args.threads:
            torch.set_num_threads(args.threads)
        loads = time_loading(args.load_time, repeats=args.repeats)
        print(format_load_times(loads))
        return loads

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    s = Settings(
        device=device,
        bf16=args.bf16 or args.best,
        channels_last=args.channels_last or args.best,
        compile=args.compile or args.best,
        fused_adam=args.fused_adam or args.best,
    )
    presets = args.preset or (["quickstart", "cifar"])
    result = run(
        presets,
        s,
        repeats=args.repeats,
        warmup=args.warmup + (3 if s.compile else 0),
        framework=not args.no_framework,
        sampling=not args.no_sampling,
    )
    result["command"] = "python -m diffusion_lab.bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = format_table(result)
    print(table)
    out = write_text_atomic(args.out, json.dumps(result, indent=2) + "\n", what="benchmark result")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"[bench] wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
